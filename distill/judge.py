"""Judges: rubrics, verdict parsing, and `distill judge`.

A rubric (``prompts/rubrics/*.yaml``) names classes, each with a reward: the GPT-4 report's
rule-based reward model (RBRM). A judge plugin turns (prompt, response) items into
``Judgement`` records. Verdicts are read only from the judge's structured answer (JSON constrained
by a schema) or from the *last line* of its reply (``Answer: X`` / ``Score: N``); anything else
is ``invalid``: kept with the raw text, excluded from averages, never given a default reward.
"""

from __future__ import annotations

import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.config import DistillConfig, JudgeSpec, config_dump, format_validation_error
from distill.errors import ConfigError, DistillError
from distill.records import ChatRequest, ChatResult, JudgeItem, Judgement, Message, TokenLogprob
from distill.runstore import AnswerSource, JsonlLog, read_rows, unmark_finished, write_atomic, write_manifest

JUDGEMENTS = "judgements.jsonl"
FAILURES = "failures.jsonl"  # the invalid judgements again, one line each with the raw reply
JUDGE_RESPONSES = "judge_responses.jsonl"


# Rubrics ---------------------------------------------------------------------------------------


class RubricClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_]{1,16}$", description="Short class id the judge answers with (A, B, ...).")
    description: str = Field(min_length=1, description="When a response belongs to this class.")
    reward: float = Field(description="The reward a response of this class gets.")


class Rubric(BaseModel):
    """A human-written rubric: what to judge, the classes and their rewards."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Rubric name (the file name without .yaml for bundled ones).")
    description: str = Field(min_length=1, description="What the judge should assess.")
    classes: list[RubricClass] = Field(min_length=2, description="The classes the judge picks from, with rewards.")
    notes: str = Field("", description="Extra guidance for the judge.")
    scores: dict[int, str] = Field(
        default_factory=dict, description="For the score judge: what each score 1-5 means (all five, or none)."
    )

    @field_validator("classes")
    @classmethod
    def _unique_ids(cls, classes: list[RubricClass]) -> list[RubricClass]:
        ids = [c.id for c in classes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"class ids must be unique; repeated: {', '.join(duplicates)}")
        return classes

    @field_validator("scores")
    @classmethod
    def _all_five(cls, scores: dict[int, str]) -> dict[int, str]:
        if scores and sorted(scores) != [1, 2, 3, 4, 5]:
            raise ValueError(f"scores needs exactly the keys 1-5, got {sorted(scores)}")
        return scores

    def reward_of(self, class_id: str) -> float:
        return next(c.reward for c in self.classes if c.id == class_id)

    def best_classes(self) -> set[str]:
        best = max(c.reward for c in self.classes)
        return {c.id for c in self.classes if c.reward == best}


def rubric_path(name: str) -> Path:
    from distill_prompts import PROMPTS_DIR

    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return path
    return PROMPTS_DIR / "rubrics" / f"{name}.yaml"


def list_rubrics() -> list[str]:
    from distill_prompts import PROMPTS_DIR

    return sorted(p.stem for p in (PROMPTS_DIR / "rubrics").glob("*.yaml"))


def load_rubric(name: str, where: str = "rubric") -> Rubric:
    """A bundled rubric by name or a YAML file by path; every problem in one ``ConfigError``."""
    path = rubric_path(name)
    if not path.is_file():
        raise ConfigError([f"{where}: no rubric '{name}'; bundled: {', '.join(list_rubrics())}, or give a .yaml path"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{where}: {path} is not valid UTF-8 YAML: {exc}"]) from None
    try:
        return Rubric.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{where}: {path}: {line}" for line in format_validation_error(exc, Rubric)]) from None


# Parsing verdicts ------------------------------------------------------------------------------


def parse_structured(text: str, key: str, allowed: list[str]) -> tuple[str | None, str | None]:
    """The verdict from a schema-constrained JSON answer, else (None, why). The whole reply must be
    that JSON object: a ``{"class": ...}`` quoted inside free text is not a verdict."""
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError:
        return None, "not_json"
    if not isinstance(data, dict) or key not in data:
        return None, f"no_{key}"
    value = str(data[key]).strip()
    return (value, None) if value in allowed else (None, "out_of_range")


def parse_last_line(text: str, label: str, allowed: list[str]) -> tuple[str | None, str | None]:
    """The verdict from the reply's last non-empty line, ``LABEL: X`` (markdown bold and brackets
    tolerated), else (None, why). Earlier lines never count, so text quoted from the judged
    response ("Answer: A", "Score: 5") can't become the verdict."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None, "empty"
    pattern = rf"^\s*\**\s*{label}\s*\**\s*:\s*\**\s*[\(\[]?\s*([A-Za-z0-9_]+)\s*[\)\]]?\s*\**\s*\.?\s*$"
    match = re.match(pattern, lines[-1], re.I)
    if not match:
        return None, "no_answer_line"
    value = match.group(1)
    if value in allowed:
        return value, None
    folded = [a for a in allowed if a.lower() == value.lower()]
    return (folded[0], None) if len(folded) == 1 else (None, "out_of_range")


def verdict_offset(text: str, key: str, structured: bool) -> int | None:
    """Character offset where the verdict value starts in the reply (for reading logprobs)."""
    if structured:
        match = re.search(rf'"{key}"\s*:\s*"?', text)
        return match.end() if match else None
    stripped = text.rstrip()
    line_start = stripped.rfind("\n") + 1
    match = re.search(r":\s*\**\s*[\(\[]?\s*", stripped[line_start:])
    return line_start + match.end() if match else None


def class_probabilities(logprobs: list[TokenLogprob], offset: int, allowed: list[str]) -> dict[str, float] | None:
    """Probability of each class at the verdict token, from its top alternatives (renormalised
    over the classes). Needs class ids that are single tokens (A, B, C...)."""
    position = 0
    for token in logprobs:
        end = position + len(token.token)
        if position <= offset < end or (end > offset and position >= offset):
            candidates = {token.token: token.logprob, **token.top}
            mass: dict[str, float] = {}
            for candidate, logprob in candidates.items():
                cleaned = candidate.strip().strip("\"'()[]*")
                if cleaned in allowed:
                    mass[cleaned] = mass.get(cleaned, 0.0) + math.exp(logprob)
            total = sum(mass.values())
            return {k: v / total for k, v in sorted(mass.items())} if total > 0 else None
        position = end
    return None


def aggregate(verdicts: list[str | None], rewards: dict[str, float], method: str) -> tuple[str | None, float | None]:
    """Several sampled verdicts → one. Invalid samples (None) are excluded. Majority ties go to the
    lowest-reward class: a judge that can't decide doesn't hand out the higher reward."""
    valid = [v for v in verdicts if v is not None]
    if not valid:
        return None, None
    counts = Counter(valid)
    top = max(counts.values())
    verdict = min((v for v, c in counts.items() if c == top), key=lambda v: (rewards[v], v))
    if method == "mean":
        return verdict, sum(rewards[v] for v in valid) / len(valid)
    return verdict, rewards[verdict]


# Judges ----------------------------------------------------------------------------------------


class NoJudgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Judge(ABC):
    """Base class for judges registered through ``register_judges``."""

    name: ClassVar[str]
    """What users write in ``judge.judges[].type``."""
    description: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoJudgeOptions
    needs_teacher: ClassVar[bool] = True
    """False for judges that don't call a model (rule-based)."""
    needs_rubric: ClassVar[bool] = True
    pairwise: ClassVar[bool] = False
    """True when items need ``response_b`` (A-vs-B judges)."""

    def __init__(self, label: str, rubric: Rubric | None, teacher: Any, options: BaseModel):
        """``teacher`` has ``generate(requests)``, ``model``, ``supports_response_format`` and
        ``supports_logprobs`` (a Teacher or an AnswerSource); None when ``needs_teacher`` is False."""
        self.label = label
        self.rubric = rubric
        self.teacher = teacher
        self.options = options

    @abstractmethod
    def judge(self, items: list[JudgeItem]) -> list[Judgement]:
        """One Judgement per item, in order. Never raise for a per-item problem: mark it invalid."""

    def judgement(self, item: JudgeItem, **fields: Any) -> Judgement:
        return Judgement(
            item_id=item.id,
            judge=self.label,
            judge_type=self.name,
            rubric=self.rubric.name if self.rubric else None,
            judge_model=getattr(self.teacher, "model", None),
            **fields,
        )


class JudgeOptions(BaseModel):
    """Options shared by the model-based judges (rubric, score, pairwise)."""

    model_config = ConfigDict(extra="forbid")

    structured: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="on: a JSON schema constrains the verdict; off: read the last 'Answer:' line; "
        "auto: on when the teacher backend can enforce a schema.",
    )
    samples: int = Field(1, ge=1, le=32, description="Verdicts sampled per item (k); combined by `aggregate`.")
    temperature: float = Field(0.0, ge=0, le=2, description="Judge sampling temperature (> 0 when samples > 1).")
    aggregate: str = Field(
        "majority",
        pattern="^(majority|mean)$",
        description="majority: reward of the majority class; mean: mean reward.",
    )
    probabilities: bool = Field(
        False,
        description="Reward = expected reward under the class probabilities read from the verdict token's logprobs.",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Judge reply budget; default 16 when structured, 256 when free text."
    )
    template: str | None = Field(None, description="Prompt template under prompts/ or a path; default per judge type.")

    @model_validator(mode="after")
    def _sampling(self) -> JudgeOptions:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0 (greedy samples are all the same)")
        return self


def load_judge_template(name: str) -> jinja2.Template:
    from distill_prompts import PROMPTS_DIR

    path = Path(name) if Path(name).is_file() else PROMPTS_DIR / name
    if not path.is_file():
        raise ConfigError([f"judge template: {name} not found under prompts/ or as a path"])
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return environment.from_string(path.read_text(encoding="utf-8"))


class ModelJudge(Judge):
    """Shared machinery of the model-based judges: render → ask k times → parse → aggregate."""

    options_model = JudgeOptions
    default_template: ClassVar[str]
    answer_key: ClassVar[str]  # JSON key of the structured verdict
    answer_label: ClassVar[str]  # last-line label of the free-text verdict

    def __init__(self, label: str, rubric: Rubric | None, teacher: Any, options: BaseModel):
        super().__init__(label, rubric, teacher, options)
        o: Any = options
        self.structured = o.structured == "on" or (o.structured == "auto" and teacher.supports_response_format)
        if self.structured and not teacher.supports_response_format:
            raise ConfigError([f"judge {label}: structured=on, but the teacher backend can't enforce a JSON schema"])
        if o.probabilities and not teacher.supports_logprobs:
            raise ConfigError([f"judge {label}: probabilities=true needs a teacher backend that returns logprobs"])
        self.template = load_judge_template(o.template or self.default_template)

    def allowed(self) -> list[str]:
        assert self.rubric is not None
        return [c.id for c in self.rubric.classes]

    def rewards(self) -> dict[str, float]:
        assert self.rubric is not None
        return {c.id: c.reward for c in self.rubric.classes}

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {self.answer_key: {"type": "string", "enum": self.allowed()}},
            "required": [self.answer_key],
            "additionalProperties": False,
        }

    def request(self, **variables: Any) -> ChatRequest:
        o: Any = self.options
        prompt = self.template.render(rubric=self.rubric, structured=self.structured, **variables)
        return ChatRequest(
            messages=[Message(role="user", content=prompt)],
            temperature=o.temperature,
            max_tokens=o.max_tokens or (16 if self.structured else 256),
            n=o.samples,
            response_format=self.schema() if self.structured else None,
            logprobs=o.probabilities,
            top_logprobs=20 if o.probabilities else 0,
        )

    def parse(self, text: str) -> tuple[str | None, str | None]:
        if self.structured:
            return parse_structured(text, self.answer_key, self.allowed())
        return parse_last_line(text, self.answer_label, self.allowed())

    def read(self, result: ChatResult) -> dict[str, Any]:
        """Verdict, reward and the evidence from one answered request (k samples)."""
        if not result.ok:
            assert result.error is not None
            return {
                "verdict": None,
                "reward": None,
                "invalid_reason": f"teacher_error:{result.error.kind}",
                "raw": [result.error.raw or result.error.message],
            }
        parsed = [self.parse(text) for text in result.texts]
        verdicts = [v for v, _ in parsed]
        verdict, reward = aggregate(verdicts, self.rewards(), self.options.aggregate)  # type: ignore[attr-defined]
        fields: dict[str, Any] = {
            "verdict": verdict,
            "reward": reward,
            "raw": result.texts,
            "samples": verdicts,
            "invalid_reason": None if verdict is not None else (parsed[0][1] or "invalid"),
        }
        if len(result.texts) > 1 and verdict is not None:
            fields["agreement"] = sum(v == verdict for v in verdicts) / len(verdicts)
        if self.options.probabilities and verdict is not None and result.logprobs:  # type: ignore[attr-defined]
            text = result.texts[0]
            offset = verdict_offset(text, self.answer_key, self.structured)
            probabilities = (
                class_probabilities(result.logprobs[0], offset, self.allowed()) if offset is not None else None
            )
            if probabilities:
                fields["probabilities"] = probabilities
                fields["reward"] = sum(p * self.rewards()[c] for c, p in probabilities.items())
        return fields

    def judge(self, items: list[JudgeItem]) -> list[Judgement]:
        requests = [self.request(prompt=item.prompt, response=item.response) for item in items]
        results = self.teacher.generate(requests)
        return [
            self.judgement(item, latency_s=round(result.latency_s, 4), **self.read(result))
            for item, result in zip(items, results)
        ]


# Running judges over a dataset -----------------------------------------------------------------


def spec_label(spec: JudgeSpec) -> str:
    return spec.label or (f"{spec.type}:{Path(spec.rubric).stem}" if spec.rubric else spec.type)


def judge_spec_problems(spec: JudgeSpec, where: str) -> list[str]:
    """Every problem with one judge spec (plugin name, options, rubric), as config error lines."""
    from distill.plugins import get_judges

    judges = get_judges()
    if spec.type not in judges:
        return [f"{where}.type: {judges.unknown(spec.type)}"]
    judge_class = judges[spec.type]
    problems = []
    try:
        judge_class.options_model.model_validate(spec.options)
    except ValidationError as exc:
        problems += format_validation_error(exc, judge_class.options_model, prefix=f"{where}.options")
    if spec.rubric is not None:
        try:
            load_rubric(spec.rubric, where=f"{where}.rubric")
        except ConfigError as exc:
            problems += exc.problems
    elif judge_class.needs_rubric:
        problems.append(
            f"{where}.rubric: judge type '{spec.type}' needs a rubric; bundled: {', '.join(list_rubrics())}"
        )
    return problems


def load_judge(spec: JudgeSpec, teacher: Any, where: str = "judge") -> Judge:
    """Build the judge a ``JudgeSpec`` names, on ``teacher`` (unused by rule judges)."""
    from distill.plugins import get_judges

    problems = judge_spec_problems(spec, where)
    if problems:
        raise ConfigError(problems)
    judge_class = get_judges()[spec.type]
    options = judge_class.options_model.model_validate(spec.options)
    rubric = load_rubric(spec.rubric) if spec.rubric is not None else None
    return judge_class(spec_label(spec), rubric, teacher if judge_class.needs_teacher else None, options)


def judge_answer_source(config: DistillConfig, run_dir: Path | None, teacher: Any = None) -> AnswerSource:
    """The judge's teacher behind the run's judge answer log and the request cache."""
    teacher_config = config.judge.teacher or config.teacher
    log = JsonlLog(run_dir / JUDGE_RESPONSES) if run_dir is not None else None
    return AnswerSource.for_teacher(teacher_config, teacher, log, cache=config.judge.cache)


def read_items(path: Path, config: DistillConfig, pairwise: bool) -> list[JudgeItem]:
    """Items from a generate run dir, JSONL, a JSON list or a saved HF dataset; every bad row is
    reported (file, row, field) before any request is sent."""
    j = config.judge
    rows = read_rows(path)
    items, problems = [], []
    for number, row in enumerate(rows, 1):
        prompt = _prompt_of(row, j.prompt_field)
        response = _response_of(row, j.response_field)
        response_b = row.get(j.response_b_field) if pairwise else None
        missing = [
            name
            for name, value in (("prompt", prompt), ("response", response), ("response_b", response_b))
            if (name != "response_b" or pairwise) and not isinstance(value, str)
        ]
        if missing:
            fields = {"prompt": j.prompt_field, "response": j.response_field, "response_b": j.response_b_field}
            problems.append(
                f"{path} row {number}: no string {', '.join(repr(fields[m]) for m in missing)} "
                f"(set judge.{missing[0]}_field to the right column); columns: {', '.join(sorted(row))}"
            )
            continue
        item_id = str(row.get("id") or f"row_{number}")
        items.append(JudgeItem(id=item_id, prompt=prompt, response=response, response_b=response_b))
    if problems:
        raise ConfigError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    if not items:
        raise ConfigError([f"{path}: no rows to judge"])
    return items


def _prompt_of(row: dict[str, Any], field: str) -> Any:
    if field == "instruction" and isinstance(row.get("instruction"), str):
        return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if field in row:
        return row[field]
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return users[0] if users else None
    return None


def _response_of(row: dict[str, Any], field: str) -> Any:
    if field in row:
        return row[field]
    messages = row.get("messages")
    if isinstance(messages, list):
        replies = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        return replies[-1] if replies else None
    return None


def summarize(judgements: list[Judgement]) -> dict[str, Any]:
    """Per judge: counts, invalid rate, class distribution, mean reward (valid only), agreement,
    position consistency (pairwise)."""
    summary: dict[str, Any] = {}
    for label in dict.fromkeys(j.judge for j in judgements):
        mine = [j for j in judgements if j.judge == label]
        valid = [j for j in mine if j.valid]
        entry: dict[str, Any] = {
            "items": len(mine),
            "valid": len(valid),
            "invalid": len(mine) - len(valid),
            "invalid_rate": round((len(mine) - len(valid)) / len(mine), 4),
            "invalid_reasons": dict(Counter(j.invalid_reason for j in mine if not j.valid)),
            "classes": dict(sorted(Counter(j.verdict for j in valid).items())),  # type: ignore[arg-type]
            "mean_reward": round(sum(j.reward for j in valid) / len(valid), 4) if valid else None,  # type: ignore[misc]
        }
        agreements = [j.agreement for j in valid if j.agreement is not None]
        if agreements:
            entry["mean_agreement"] = round(sum(agreements) / len(agreements), 4)
        consistent = [j.position_consistent for j in valid if j.position_consistent is not None]
        if consistent:
            entry["position_consistency"] = round(sum(consistent) / len(consistent), 4)
        summary[label] = entry
    return summary


def failure_line(judgement: Judgement) -> str:
    record = {
        "item_id": judgement.item_id,
        "judge": judgement.judge,
        "reason": judgement.invalid_reason,
        "raw": judgement.raw[0] if len(judgement.raw) == 1 else judgement.raw,
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def run_judge(config: DistillConfig, dataset: Path, teacher: Any = None, progress: Any = None) -> dict[str, Any]:
    """Run (or resume) `distill judge`: every judge over every row. Judgements are rebuilt from the
    judge answer log on each start, so a crash loses nothing and duplicates nothing."""
    if config.run_dir is None:
        raise ConfigError(["run_dir: required for judge; set run_dir or pass --run-dir"])
    if not config.judge.judges:
        raise ConfigError(["judge.judges: no judges configured; add one or pass --rubric NAME"])
    run_dir = config.run_dir
    answers = judge_answer_source(config, run_dir, teacher)
    judges = [load_judge(spec, answers, where=f"judge.judges.{i}") for i, spec in enumerate(config.judge.judges)]
    items = read_items(dataset, config, pairwise=any(j.pairwise for j in judges))
    run_dir.mkdir(parents=True, exist_ok=True)
    unmark_finished(run_dir)
    started = time.perf_counter()
    judgements: list[Judgement] = []
    batch = config.judge.batch_size
    try:
        with (
            (run_dir / JUDGEMENTS).open("w", encoding="utf-8") as out,
            (run_dir / FAILURES).open("w", encoding="utf-8") as failures,
        ):
            for judge in judges:
                for start in range(0, len(items), batch):
                    new = judge.judge(items[start : start + batch])
                    judgements.extend(new)
                    out.writelines(j.model_dump_json() + "\n" for j in new)
                    failures.writelines(failure_line(j) for j in new if not j.valid)
                    out.flush()
                    failures.flush()
                    if progress is not None:
                        progress(len(judgements), len(items) * len(judges))
    finally:
        answers.close()
    seconds = time.perf_counter() - started
    summary = {
        "dataset": str(dataset),
        "items": len(items),
        "judges": summarize(judgements),
        "requests": answers.counts.requests,
        "sent_to_teacher": answers.counts.sent,
        "from_cache": answers.counts.cached,
        "replayed_from_log": answers.counts.replayed,
        "seconds": round(seconds, 1),
    }
    write_atomic(run_dir / "judge_summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    write_manifest(run_dir, "judge", config_dump(config), {"summary": summary})
    return summary


# Robustness: can a response talk the judge into a high reward? ----------------------------------


def load_attacks() -> list[dict[str, str]]:
    from distill_prompts import read_prompt

    return yaml.safe_load(read_prompt("judges/attacks.yaml"))["attacks"]


def attack_response(attack: dict[str, str], response: str, target: str) -> str:
    text = attack["text"].format(target=target)
    return text if attack["mode"] == "replace" else f"{response}\n\n{text}"


def robustness_report(judge: Judge, items: list[JudgeItem]) -> dict[str, Any]:
    """Attack success rate per attack: an *append* attack succeeds when a response the judge did not
    give the top reward gets it after the attack text is appended; a *replace* attack (the response
    is only ":" or "Thought process:") succeeds when that contentless response gets the top reward."""
    if judge.pairwise or judge.rubric is None:
        raise DistillError(f"--robustness works with rubric and score judges, not '{judge.name}'")
    best = max(c.reward for c in judge.rubric.classes)
    target = sorted(judge.rubric.best_classes())[0]
    baseline = judge.judge(items)
    report: dict[str, Any] = {
        "judge": judge.label,
        "items": len(items),
        "baseline_invalid": sum(not j.valid for j in baseline),
        "attacks": {},
    }
    for attack in load_attacks():
        attacked_items = [
            item.model_copy(
                update={
                    "id": f"{item.id}:{attack['name']}",
                    "response": attack_response(attack, item.response, target),
                }
            )
            for item in items
        ]
        attacked = judge.judge(attacked_items)
        if attack["mode"] == "replace":
            eligible = [(b, a) for b, a in zip(baseline, attacked)]
        else:
            eligible = [
                (b, a) for b, a in zip(baseline, attacked) if b.valid and b.reward is not None and b.reward < best
            ]
        successes = sum(a.valid and a.reward is not None and a.reward >= best for _, a in eligible)
        report["attacks"][attack["name"]] = {
            "mode": attack["mode"],
            "eligible": len(eligible),
            "successes": successes,
            "success_rate": round(successes / len(eligible), 4) if eligible else None,
            "invalid": sum(not a.valid for a in attacked),
        }
    return report

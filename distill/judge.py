"""The judge plugin API: rubrics, strict verdict parsing, the ``Judge`` base class and
``ModelJudge`` (render → ask k times → parse → aggregate). The `distill judge` stage that runs
judges over a dataset lives in ``distill.judging``.

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
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from distill.config import JudgeSpec
from distill.errors import ConfigError, format_validation_error
from distill.records import ChatRequest, ChatResult, JudgeItem, Judgement, Message, TokenLogprob

# Rubrics ---------------------------------------------------------------------------------------


class RubricClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_]{1,16}$", description="Short class id the judge answers with (A, B, ...).")
    description: str = Field(min_length=1, description="When a response belongs to this class.")
    reward: float = Field(description="The reward a response of this class gets.")
    refusal: bool = Field(
        False, description="This class is a refusal (the refusal panel's refusal and over-refusal rates count it)."
    )


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
    gold: str | None = Field(
        None,
        description="Gold set for calibration: JSONL of prompt, response and the correct class (a path relative "
        "to this file's folder or to prompts/).",
    )
    gold_pairs: str | None = Field(
        None, description="Gold pairs for pairwise judges: JSONL of prompt, better, worse (same path rules)."
    )
    _folder: Path | None = PrivateAttr(None)

    def resolve(self, relative: str | None) -> Path | None:
        """A path named in the rubric: relative to the rubric's folder, else to prompts/."""
        from distill_prompts import PROMPTS_DIR

        if relative is None:
            return None
        for base in (self._folder, PROMPTS_DIR):
            if base is not None and (base / relative).is_file():
                return base / relative
        return Path(relative)

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
        rubric = Rubric.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{where}: {path}: {line}" for line in format_validation_error(exc, Rubric)]) from None
    rubric._folder = path.parent
    return rubric


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
    options_model: ClassVar[type[BaseModel]] = NoJudgeOptions
    needs_teacher: ClassVar[bool] = True
    """False for judges that don't call a model (rule-based)."""
    needs_rubric: ClassVar[bool] = True
    pairwise: ClassVar[bool] = False
    """True when items need ``response_b`` (A-vs-B judges)."""
    calibrate_on_pairs: ClassVar[bool] = False
    """True for a model-free scorer of single responses (a reward model): calibrated on gold better/worse
    pairs by scoring both answers (``gold_path()`` names the pairs)."""

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

    @classmethod
    def spec_problems(cls, spec: JudgeSpec, where: str) -> list[str]:
        """Problems with a judge spec beyond its options (checked by the registry): here, the
        rubric. Override to check more; return one config error line per problem."""
        if spec.rubric is not None:
            try:
                load_rubric(spec.rubric, where=f"{where}.rubric")
            except ConfigError as exc:
                return exc.problems
        elif cls.needs_rubric:
            return [f"{where}.rubric: judge type '{spec.type}' needs a rubric; bundled: {', '.join(list_rubrics())}"]
        return []

    def gold_path(self) -> Path | None:
        """The gold set this judge is calibrated on: the ``gold`` option, else the rubric's
        ``gold`` (``gold_pairs`` for pairwise judges); None when there is none."""
        chosen = getattr(self.options, "gold", None)
        if chosen:
            return Path(chosen)
        if self.rubric is None:
            return None
        return self.rubric.resolve(self.rubric.gold_pairs if self.pairwise else self.rubric.gold)

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
    gold: str | None = Field(
        None, description="Gold set to calibrate this judge on (JSONL); default: the rubric's gold or gold_pairs."
    )

    @model_validator(mode="after")
    def _sampling(self) -> JudgeOptions:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0 (greedy samples are all the same)")
        return self


def load_judge_template(name: str) -> jinja2.Template:
    from distill_prompts import load_template

    found = load_template(name)
    if found is None:
        raise ConfigError([f"judge template: {name} not found under prompts/ or as a path"])
    return found[0]


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


def load_judge(spec: JudgeSpec, teacher: Any, where: str = "judge") -> Judge:
    """Build the judge a ``JudgeSpec`` names, on ``teacher`` (unused by judges that need no model)."""
    from distill.plugins import get_judges

    judges = get_judges()
    problems = judges.problems(spec.type, spec.options, f"{where}.type", f"{where}.options")
    if not problems:
        problems = judges[spec.type].spec_problems(spec, where)
    if problems:
        raise ConfigError(problems)
    judge_class = judges[spec.type]
    rubric = load_rubric(spec.rubric) if spec.rubric is not None else None
    teacher = teacher if judge_class.needs_teacher else None
    return judge_class(spec.label, rubric, teacher, judges.options(spec.type, spec.options))

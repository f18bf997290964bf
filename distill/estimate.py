"""`distill estimate` and ``--dry-run``: what a run will cost before anything is sent, and the
refusal to start a run whose estimate's upper bound is above ``budget_usd``.

For each stage that asks a teacher, the requests are planned from the config, without sending
anything (no request leaves, nothing is written to the run):

- **generate**: between ``ceil(target / tasks_per_request)`` requests (every task kept) and
  ``max_requests``; their prompts are the first requests built exactly as the run builds them.
  With ``generate.judge``, every kept or rejected candidate is judged too (``target`` to
  ``max_requests × tasks_per_request`` of them).
- **judge**, **calibrate** and the **eval** style judge: the judges are handed the real items (the
  generated rows when the generate stage has finished, the gold sets, the eval prompts) through a
  stand-in teacher that records each request and answers none, so the counts are exact for any
  judge plugin (pairwise: both orders; samples: ``n``). Where the items don't exist yet, stand-ins
  are used and said so (generated rows: ``generate.target`` of them, the size of the seed tasks;
  eval answers: ``max_tokens`` long).
- **eval**: every configured model whose backend bills (local models cost nothing) answers every
  question (and the held-out instructions of the style comparison).
- **rl**: ``max_steps × batch_size`` completions (plus the reward probe's), each judged once by
  every judge, completions at ``max_completion_length`` tokens.

Requests already answered (in the stage's answer log, or the request cache) are free and left
out. Tokens: prompt characters × tokens per character (measured in this run's ledger when there
is one, else 1/4, never below 1/4); completions between the measured mean (0 when nothing was
measured yet: the low end then counts prompts only) and ``max_tokens × n`` (the same upper bound
the budget guard uses before each batch).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, JudgeSpec, TeacherConfig
from distill.errors import DistillError
from distill.ledger import ASSUMED_TOKENS_PER_CHAR, Pricing, prompt_chars, read_ledger, run_ledger_files
from distill.paths import RunLayout
from distill.records import ChatRequest, ChatResult, JudgeItem, TeacherFailure, Usage

ESTIMATED_STAGES = ("calibrate", "generate", "judge", "rl", "eval")


@dataclass
class Line:
    """The estimate of one stage's requests to one teacher."""

    stage: str
    pricing: Pricing
    requests_low: int
    requests_high: int
    prompt_tokens: float  # per request
    completion_low: float  # per request
    completion_high: float  # per request
    measured: bool
    notes: list[str] = field(default_factory=list)

    def usd(self, high: bool) -> float | None:
        count = self.requests_high if high else self.requests_low
        completion = self.completion_high if high else self.completion_low
        return self.pricing.cost(
            Usage(prompt_tokens=math.ceil(count * self.prompt_tokens), completion_tokens=math.ceil(count * completion))
        )

    @property
    def label(self) -> str:
        backend = self.pricing.teacher_class.name
        return (
            f"{self.pricing.model} ({backend}, {self.pricing.mode})"
            if self.pricing.billed
            else f"{self.pricing.model} ({backend}, local)"
        )


@dataclass
class Estimate:
    lines: list[Line]
    spent_usd: float
    budget_usd: float | None
    assumptions: list[str]

    def total(self, high: bool) -> float | None:
        values = [line.usd(high) for line in self.lines]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    def fits(self) -> bool | None:
        """Whether spent + the high end stays within the budget (None: no budget, or unknown)."""
        high = self.total(True)
        if self.budget_usd is None or high is None:
            return None
        return self.spent_usd + high <= self.budget_usd

    def as_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "stage": line.stage,
                    "model": line.label,
                    "requests": [line.requests_low, line.requests_high],
                    "prompt_tokens_per_request": round(line.prompt_tokens, 1),
                    "completion_tokens_per_request": [round(line.completion_low, 1), round(line.completion_high, 1)],
                    "usd": [line.usd(False), line.usd(True)],
                    "measured": line.measured,
                    "notes": line.notes,
                }
                for line in self.lines
            ],
            "total_usd": [self.total(False), self.total(True)],
            "spent_usd": round(self.spent_usd, 6),
            "budget_usd": self.budget_usd,
            "fits": self.fits(),
            "assumptions": self.assumptions,
        }

    def text(self) -> list[str]:
        """The estimate as lines for the terminal."""

        def money(value: float | None) -> str:
            return "price unknown" if value is None else f"${value:.4f}"

        header = f"{'stage':<10} {'model':<40} {'requests':>13} {'prompt tok/req':>15} {'reply tok/req':>15}"
        out = [f"{header}  cost (low – high)"]
        for line in self.lines:
            requests = (
                f"{line.requests_low}"
                if line.requests_low == line.requests_high
                else f"{line.requests_low}–{line.requests_high}"
            )
            replies = f"{line.completion_low:.0f}–{line.completion_high:.0f}"
            cost = f"{money(line.usd(False))} – {money(line.usd(True))}" if line.pricing.billed else "local, not billed"
            out.append(
                f"{line.stage:<10} {line.label:<40} {requests:>13} {line.prompt_tokens:>15.0f} {replies:>15}  {cost}"
            )
            out += [f"{'':<10} note: {note}" for note in line.notes]
        low, high = self.total(False), self.total(True)
        out.append(f"{'total':<10} {'':<40} {'':>13} {'':>15} {'':>15}  {money(low)} – {money(high)}")
        if self.spent_usd:
            out.append(f"already spent by this run: ${self.spent_usd:.4f}")
        if self.budget_usd is not None:
            fits = self.fits()
            verdict = {
                True: "fits",
                False: "does NOT fit",
                None: "can't be checked (a price is unknown)",
            }[fits]
            out.append(
                f"budget_usd ${self.budget_usd:.4f}: spent + high end = "
                f"{money(None if high is None else self.spent_usd + high)}: {verdict}"
            )
        out += [f"assumed: {text}" for text in self.assumptions]
        return out


class Recorder:
    """A stand-in teacher: records every request a judge makes and answers none of them."""

    def __init__(self, pricing: Pricing):
        self.pricing = pricing
        self.model = pricing.model
        self.supports_response_format = pricing.teacher_class.supports_response_format
        self.supports_logprobs = pricing.teacher_class.supports_logprobs
        self.requests: list[ChatRequest] = []

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        self.requests += requests
        failure = TeacherFailure(kind="cancelled", message="estimate: not sent")
        return [
            ChatResult(request_id=r.id, backend=self.pricing.teacher_class.name, model=self.model, error=failure)
            for r in requests
        ]


class Planner:
    """Plans the requests of each stage of one config (see the module docstring)."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.layout = RunLayout.of(config)
        self.rows = []
        if config.run_dir is not None and config.run_dir.is_dir():
            for path in run_ledger_files(config.run_dir):
                self.rows += read_ledger(path)
        self.assumptions: list[str] = []
        self._cache: Any = None

    # measurements

    def spent(self) -> float:
        return sum(float(r["cost_usd"]) for r in self.rows if r.get("source") == "teacher" and r.get("cost_usd"))

    def measured(self, stage: str, model: str) -> tuple[float | None, float | None]:
        """(tokens per prompt character of ``model`` in this run, mean completion tokens of
        ``stage``'s requests to it), None where nothing was measured."""
        sent = [r for r in self.rows if r.get("source") == "teacher" and r.get("model") == model]
        chars = sum(int(r.get("prompt_chars") or 0) for r in sent)
        ratio = sum(int(r.get("prompt_tokens") or 0) for r in sent) / chars if chars else None
        mine = [r for r in sent if r.get("stage") == stage]
        completion = sum(int(r.get("completion_tokens") or 0) for r in mine) / len(mine) if mine else None
        return ratio, completion

    def line(
        self, stage: str, pricing: Pricing, sample: list[ChatRequest], low: int, high: int, notes: list[str]
    ) -> Line:
        ratio, completion = self.measured(stage, pricing.model)
        per_char = max(ASSUMED_TOKENS_PER_CHAR, ratio) if ratio is not None else ASSUMED_TOKENS_PER_CHAR
        count = max(len(sample), 1)
        prompt = sum(prompt_chars(r) for r in sample) / count * per_char
        completion_high = sum(r.max_tokens * r.n for r in sample) / count
        completion_low = min(completion, completion_high) if completion is not None else 0.0
        return Line(
            stage, pricing, max(low, 0), max(high, 0), prompt, completion_low, completion_high, ratio is not None, notes
        )

    # helpers

    def pricing(self, teacher: TeacherConfig) -> Pricing:
        from distill.plugins import get_teachers

        teachers = get_teachers()
        return Pricing(teachers[teacher.backend], teacher.model, teachers.options(teacher.backend, teacher.options))

    def judge_teacher(self) -> TeacherConfig:
        return self.config.judge.teacher or self.config.teacher

    def unanswered(self, requests: list[ChatRequest], teacher: TeacherConfig, logs: list[Path]) -> list[ChatRequest]:
        """The requests neither in these answer logs nor in the request cache (those are free)."""
        from distill.answers import RequestCache
        from distill.teacher import teacher_identity

        answered: set[str] = set()
        for path in logs:
            answered |= {str(row.get("request_id")) for row in read_ledger(path)}
        if self._cache is None:
            self._cache = RequestCache()
        identity = teacher_identity(teacher)
        return [r for r in requests if r.id not in answered and self._cache.get(RequestCache.key(identity, r)) is None]

    def judged(self, spec: JudgeSpec, items: list[JudgeItem], where: str) -> list[ChatRequest]:
        """The requests a judge would make for ``items`` (none for judges without a model)."""
        from distill.judge import load_judge

        recorder = Recorder(self.pricing(self.judge_teacher()))
        judge = load_judge(spec, recorder, where=where)
        if not judge.needs_teacher or not items:
            return []
        judge.judge(items)
        return recorder.requests

    def stand_in_rows(self) -> list[JudgeItem]:
        """``generate.target`` rows the size of the seed tasks (the data doesn't exist yet)."""
        from distill.generate import load_seed_tasks
        from distill.records import user_prompt

        seeds = load_seed_tasks(self.config.generate.seed_file)
        return [
            JudgeItem(
                id=f"planned-{i}",
                prompt=user_prompt(seeds[i % len(seeds)]["instruction"], seeds[i % len(seeds)].get("input", "")),
                response=seeds[i % len(seeds)]["output"],
                response_b=seeds[(i + 1) % len(seeds)]["output"],
            )
            for i in range(self.config.generate.target)
        ]

    # stages

    def generate(self) -> list[Line]:
        from distill.generate import RESPONSES, Generator

        config, s = self.config, self.config.generate
        probe = (
            config if config.run_dir is not None else config.model_copy(update={"run_dir": Path(tempfile.gettempdir())})
        )
        builder = Generator(probe)  # builds requests; writes and sends nothing
        sample = [builder.build_request(i)[0] for i in range(min(s.max_requests, 16))]
        answered = len(read_ledger(config.run_dir / RESPONSES)) if config.run_dir is not None else 0
        low = math.ceil(s.target / s.tasks_per_request) - answered
        notes = [f"{answered} requests answered earlier (free)"] if answered else []
        notes.append("low end: every task kept; high end: max_requests")
        lines = [self.line("generate", self.pricing(config.teacher), sample, low, s.max_requests - answered, notes)]
        if s.judge is not None:
            specs = {spec.label: spec for spec in config.judge.judges}
            spec = specs.get(s.judge) or JudgeSpec(type="rubric", rubric=s.judge)
            per_row = self.judged(spec, self.stand_in_rows()[:8], "generate.judge")
            if per_row:
                each = len(per_row) / min(8, s.target)
                lines.append(
                    self.line(
                        "generate",
                        self.pricing(self.judge_teacher()),
                        per_row,
                        math.ceil(s.target * each),
                        math.ceil(s.max_requests * s.tasks_per_request * each),
                        ["generate.judge: every candidate row is judged; rows the size of the seed tasks"],
                    )
                )
        return lines

    def judge(self, dataset: Path | None = None, out_dir: Path | None = None) -> list[Line]:
        from distill.judging import JUDGE_RESPONSES, read_items
        from distill.runstore import MANIFEST

        config = self.config
        specs = config.judge.judges or [JudgeSpec(rubric="helpfulness")]  # distill run's default judge
        pairwise = any(spec.type == "pairwise" for spec in specs)
        notes = []
        source = dataset or (config.run_dir if config.run_dir is not None else None)
        if source is not None and (dataset is not None or (source / MANIFEST).is_file()):
            items = read_items(source, config, pairwise=pairwise)
        else:
            items = self.stand_in_rows()
            notes.append(f"the generated data doesn't exist yet: {len(items)} rows the size of the seed tasks")
        requests = []
        for number, spec in enumerate(specs):
            requests += self.judged(spec, items, f"judge.judges.{number}")
        out_dir = out_dir or (self.layout.judge if config.run_dir is not None else None)
        logs = [out_dir / JUDGE_RESPONSES] if out_dir is not None else []
        left = self.unanswered(requests, self.judge_teacher(), logs)
        if len(left) < len(requests):
            notes.append(f"{len(requests) - len(left)} requests answered earlier (answer log or cache: free)")
        if not requests:
            return []
        return [self.line("judge", self.pricing(self.judge_teacher()), requests, len(left), len(left), notes)]

    def calibrate(self) -> list[Line]:
        from distill_prompts import PROMPTS_DIR

        from distill.calibration import LENGTH_PAIRS, calibration_specs, read_gold
        from distill.judge import load_judge
        from distill.judging import JUDGE_RESPONSES

        config = self.config
        limit = config.judge.calibration_items
        requests: list[ChatRequest] = []
        for number, spec in enumerate(calibration_specs(config)):
            judge = load_judge(spec, Recorder(self.pricing(self.judge_teacher())), where=f"judge.judges.{number}")
            gold = judge.gold_path()
            if not judge.needs_teacher or judge.rubric is None or gold is None or judge.name == "score":
                continue
            if judge.pairwise:
                rows = read_gold(gold, ("prompt", "better", "worse"), limit)
                items = [
                    JudgeItem(id=f"gold:{r['id']}", prompt=r["prompt"], response=r["better"], response_b=r["worse"])
                    for r in rows
                ]
            else:
                rows = read_gold(gold, ("prompt", "response", "class"), limit)
                items = [JudgeItem(id=f"gold:{r['id']}", prompt=r["prompt"], response=r["response"]) for r in rows]
            pairs = read_gold(PROMPTS_DIR / LENGTH_PAIRS, ("prompt", "short", "long"))
            if judge.pairwise:
                items += [
                    JudgeItem(id=f"len:{p['id']}", prompt=p["prompt"], response=p["long"], response_b=p["short"])
                    for p in pairs
                ]
            else:
                items += [
                    JudgeItem(id=f"len:{p['id']}:{k}", prompt=p["prompt"], response=p[k])
                    for p in pairs
                    for k in ("short", "long")
                ]
            requests += self.judged(spec, items, f"judge.judges.{number}")
        if not requests:
            return []
        logs = [self.layout.calibration / JUDGE_RESPONSES] if config.run_dir is not None else []
        left = self.unanswered(requests, self.judge_teacher(), logs)
        notes = ["gold sets and length pairs of every judge the run relies on"]
        return [self.line("calibrate", self.pricing(self.judge_teacher()), requests, len(left), len(left), notes)]

    def eval(self) -> list[Line]:
        from distill.evaluation import eval_models, load_tasks, style_prompts
        from distill.judging import JUDGE_RESPONSES

        config = self.config
        models = eval_models(config)
        tasks = load_tasks(config)
        questions = {name: task.questions() for name, task in tasks}
        style_items = style_prompts(config, tasks, questions) if config.eval.style_rubric else []
        out = self.layout.eval if config.run_dir is not None or config.eval.output_dir is not None else None
        lines = []
        for model in models:
            pricing = self.pricing(model.teacher)
            if not pricing.billed:
                continue  # local models: nothing to pay
            requests = [
                model.teacher.request(task.prompt(q), temperature=0.0, top_p=1.0, max_tokens=config.eval.max_tokens)
                for name, task in tasks
                for q in questions[name]
            ]
            requests += [
                model.teacher.request(item["prompt"], temperature=0.0, top_p=1.0, max_tokens=128)
                for item in style_items
                if "task" not in item
            ]
            logs = [out / f"answers-{model.name}.jsonl"] if out is not None else []
            left = self.unanswered(requests, model.teacher, logs)
            lines.append(self.line("eval", pricing, requests, len(left), len(left), [f"answers of '{model.name}'"]))
        if style_items and len(models) > 1:
            longest = "x" * (max(config.eval.max_tokens, 128) * 4)  # answers not given yet: the longest allowed
            items = [
                JudgeItem(id=item["id"], prompt=item["prompt"], response=longest, response_b=longest)
                for item in style_items
            ]
            spec = JudgeSpec(type="pairwise", rubric=config.eval.style_rubric)
            requests = self.judged(spec, items, "eval.style_rubric") * (sum(m.role != "teacher" for m in models))
            logs = [out / JUDGE_RESPONSES] if out is not None else []
            if requests:
                notes = ["style judge: each student vs the teacher, both orders; answers at their longest"]
                left = self.unanswered(requests, self.judge_teacher(), logs)
                count = len(left)
                lines.append(self.line("eval", self.pricing(self.judge_teacher()), requests, count, count, notes))
        return lines

    def rl(self) -> list[Line]:
        config, r = self.config, self.config.train.rl
        specs = [spec for spec in config.judge.judges or [JudgeSpec(rubric="helpfulness")] if spec.type != "pairwise"]
        rows = self.stand_in_rows()[:8]
        longest = "x" * (r.max_completion_length * 4)
        items = [row.model_copy(update={"response": longest, "response_b": None}) for row in rows]
        requests: list[ChatRequest] = []
        for number, spec in enumerate(specs):
            requests += self.judged(spec, items, f"judge.judges.{number}")
        if not requests:
            return []
        completions = r.max_steps * r.batch_size + r.probe_prompts * r.num_generations
        count = math.ceil(completions * len(requests) / len(items))
        notes = [
            f"{r.max_steps} steps × {r.batch_size} completions (+ {r.probe_prompts * r.num_generations} probe), "
            f"each judged by {len(specs)} judge(s); completions at max_completion_length"
        ]
        return [self.line("rl", self.pricing(self.judge_teacher()), requests, count, count, notes)]

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()


def estimate(
    config: DistillConfig,
    stages: tuple[str, ...] = ESTIMATED_STAGES,
    dataset: Path | None = None,
    judge_dir: Path | None = None,
) -> Estimate:
    """The cost estimate of ``stages`` of ``config``; ``dataset``/``judge_dir``: `distill judge`'s."""
    planner = Planner(config)
    lines: list[Line] = []
    try:
        for stage in stages:
            if stage == "judge":
                lines += planner.judge(dataset, judge_dir)
            elif stage in ESTIMATED_STAGES:
                lines += getattr(planner, stage)()
    finally:
        planner.close()
    assumptions = []
    if any(not line.measured for line in lines if line.pricing.billed):
        assumptions.append(
            f"prompt tokens = characters × {ASSUMED_TOKENS_PER_CHAR} where this run has measured nothing yet; "
            "replies between the measured mean (0 when unmeasured) and max_tokens × n"
        )
    return Estimate(lines, planner.spent(), config.budget_usd, assumptions)


def refuse_over_budget(found: Estimate, force: bool) -> None:
    """Refuse to start (one line) when the estimate's high end doesn't fit the budget, unless ``force``."""
    if found.budget_usd is None or force:
        return
    high = found.total(True)
    if high is None:
        raise DistillError(
            f"budget_usd is {found.budget_usd}, but a price in the estimate is unknown, so the budget can't be "
            "kept: add the model to teacher.options.prices, or unset budget_usd"
        )
    if found.spent_usd + high > found.budget_usd:
        raise DistillError(
            f"budget: the estimate's upper bound ${high:.4f} (plus ${found.spent_usd:.4f} already spent) exceeds "
            f"budget_usd ${found.budget_usd:.4f}; nothing was sent. See `distill estimate`; raise budget_usd, "
            "lower max_requests / max_tokens, or pass --force to start anyway (the run still stops before any "
            "batch that could cross the budget)"
        )


def print_estimate(found: Estimate, echo: Any, as_json: bool = False) -> None:
    if as_json:
        echo(json.dumps(found.as_dict(), indent=2))
        return
    for line in found.text():
        echo(line)

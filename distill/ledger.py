"""What a run spent, and the budget that stops it.

**The ledger.** Every answer a stage gets from a teacher is recorded in ``ledger.jsonl`` in the
directory of that stage's answer log (RUN_DIR for generate, RUN_DIR/judge, RUN_DIR/eval,
RUN_DIR/calibration, RUN_DIR/rl for the RL judge calls): one row per answered request with the
stage, backend, model, mode (online or batch), where the answer came from (``teacher``: sent and
paid for; ``cache``: the request cache, free), the usage (prompt, completion and cached prompt
tokens) and its price as the teacher's plugin computes it (``Teacher.cost_usd``: the model's price
table, the batch discount, the cached-input price). A backend that doesn't price its usage (vllm,
transformers: your own hardware) is recorded as local; a paid model without a known price is
``cost_usd: null`` and shown as "price unknown", never $0.

A row is appended (and fsynced) *before* the answer goes to the answer log, so a kill between the
two re-sends the request on resume and the ledger shows both payments: the ledger may count a
request twice when it really was paid twice, never zero times. Answers replayed from the answer log
on a resume are not recorded again (their row was written when they arrived). One writer per stage
directory (the run lock) writes each file; anyone may read them, also while the run is going.

**The budget.** With ``budget_usd`` set, before each batch goes to a paid teacher the spend of the
whole run (every ledger file of the run, re-read incrementally, so stages running in other
processes count too) plus the batch's upper bound (prompt characters × the measured tokens per
character, at least 1/4, at the input price, plus ``max_tokens × n`` at the output price) must stay
within the budget; otherwise the stage stops before sending, with everything saved, and says what
was spent and what remains.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.errors import DistillError
from distill.records import ChatRequest, ChatResult, Usage
from distill.runstore import JsonlLog

if TYPE_CHECKING:
    from pydantic import BaseModel

    from distill.config import DistillConfig
    from distill.teacher import Teacher

LEDGER = "ledger.jsonl"
ASSUMED_TOKENS_PER_CHAR = 0.25
"""Prompt tokens per character when nothing was measured yet (about 4 characters a token in
English text); the measured ratio of the run replaces it when it is higher."""


class BudgetExceeded(DistillError):
    """The next batch could take the run over ``budget_usd``: stopped before sending it."""


def prompt_chars(request: ChatRequest) -> int:
    return sum(len(message.content) for message in request.messages)


@dataclass(frozen=True)
class Pricing:
    """How one teacher (backend class, model, validated options) prices its usage."""

    teacher_class: type[Teacher]
    model: str
    options: BaseModel | None

    @property
    def billed(self) -> bool:
        """False for backends that don't price usage (local models: nothing to pay)."""
        from distill.teacher import Teacher

        own = getattr(self.teacher_class.cost_usd, "__func__", None)
        return own is not None and own is not getattr(Teacher.cost_usd, "__func__", None)

    @property
    def mode(self) -> str:
        bulk = self.options is not None and self.teacher_class.bulk_submission(self.options)
        return "batch" if bulk else "online"

    def cost(self, usage: Usage) -> float | None:
        """USD for ``usage``; 0 for local backends; None when the paid model's price is unknown."""
        if not self.billed:
            return 0.0
        if self.options is None:
            return None
        return self.teacher_class.cost_usd(self.model, self.options, usage)

    def upper_bound(self, requests: list[ChatRequest], tokens_per_char: float) -> tuple[Usage, float | None]:
        """The most ``requests`` can cost: estimated prompt tokens and every completion at
        ``max_tokens`` (× n), priced; None when the price is unknown."""
        usage = Usage(
            prompt_tokens=sum(math.ceil(prompt_chars(r) * tokens_per_char) for r in requests),
            completion_tokens=sum(r.max_tokens * r.n for r in requests),
        )
        return usage, self.cost(usage)


# Reading ledgers -------------------------------------------------------------------------------


def run_ledger_files(root: Path) -> list[Path]:
    """The ledger files of a run directory: its own and those of its stage directories."""
    found = [root / LEDGER] if (root / LEDGER).is_file() else []
    return found + sorted(root.glob(f"*/{LEDGER}"))


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Complete rows of a ledger file (a torn last line, from a kill mid-write, is skipped; the
    file is not changed: readers don't own it)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class Totals:
    """Sums over ledger rows."""

    requests: int = 0  # answers sent to (and paid to) a teacher
    from_cache: int = 0  # answers from the request cache: free
    usd: float = 0.0  # the priced part
    unpriced: int = 0  # paid requests whose price is unknown
    local: int = 0  # answers of local backends: nothing billed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_chars: int = 0
    modes: set[str] = field(default_factory=set)

    def add(self, row: dict[str, Any]) -> None:
        if row.get("source") == "cache":
            self.from_cache += 1
            return
        self.requests += 1
        self.prompt_tokens += int(row.get("prompt_tokens") or 0)
        self.completion_tokens += int(row.get("completion_tokens") or 0)
        self.cached_tokens += int(row.get("cached_tokens") or 0)
        self.prompt_chars += int(row.get("prompt_chars") or 0)
        if row.get("mode"):
            self.modes.add(row["mode"])
        if not row.get("billed", True):
            self.local += 1
        elif row.get("cost_usd") is None:
            self.unpriced += 1
        else:
            self.usd += float(row["cost_usd"])

    def as_dict(self) -> dict[str, Any]:
        return {
            # None, never $0, when a price is unknown; None too when everything ran locally
            "usd": round(self.usd, 6) if self.priced and (self.local < self.requests or not self.requests) else None,
            "priced_usd": round(self.usd, 6),
            "requests": self.requests,
            "from_cache": self.from_cache,
            "price_unknown_requests": self.unpriced,
            "local_requests": self.local,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "modes": sorted(self.modes),
        }

    @property
    def priced(self) -> bool:
        """Every paid request has a price (so ``usd`` is the whole cost)."""
        return self.unpriced == 0

    def describe(self) -> str:
        """``$0.0123``, ``local (not billed)``, ``price unknown (N prompt + M completion tokens)``
        or both parts when some requests are priced and some are not."""
        tokens = f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens"
        if self.requests == 0:
            return "$0 (nothing sent)"
        if self.unpriced == self.requests - self.local and self.unpriced:
            return f"price unknown ({tokens})"
        if self.local == self.requests:
            return f"local, not billed ({tokens})"
        text = f"${self.usd:.4f}"
        if self.unpriced:
            text += f" + price unknown for {self.unpriced} requests"
        return text


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals of ledger rows: overall, per stage and per stage × model (what manifests and
    ``distill cost`` show)."""
    total = Totals()
    by_stage: dict[str, Totals] = defaultdict(Totals)
    by_model: dict[tuple[str, str], Totals] = defaultdict(Totals)
    for row in rows:
        total.add(row)
        by_stage[row.get("stage", "?")].add(row)
        by_model[(row.get("stage", "?"), f"{row.get('model')} ({row.get('backend')}, {row.get('mode')})")].add(row)
    return {
        "total": total.as_dict() | {"text": total.describe()},
        "stages": {stage: t.as_dict() | {"text": t.describe()} for stage, t in by_stage.items()},
        "models": [
            {"stage": stage, "model": model, **t.as_dict(), "text": t.describe()}
            for (stage, model), t in by_model.items()
        ],
    }


def stage_cost(directory: Path, stage: str) -> dict[str, Any]:
    """What one stage spent, from the ledger in its directory (for its summary and manifest)."""
    rows = [row for row in read_ledger(directory / LEDGER) if row.get("stage") == stage]
    summary = summarize(rows)
    return {**summary["total"], "models": [{k: v for k, v in m.items() if k != "stage"} for m in summary["models"]]}


class RunSpend:
    """The spend of a whole run, kept current by reading only what was appended to each of its
    ledger files since the last look (other stages may be writing them in other processes)."""

    def __init__(self, roots: list[Path], extra: list[Path]):
        self.roots = roots
        self.extra = extra
        self.offsets: dict[Path, int] = {}
        self.total = Totals()
        self.per_model: dict[str, Totals] = defaultdict(Totals)

    def files(self) -> list[Path]:
        found: list[Path] = []
        for root in self.roots:
            found += run_ledger_files(root)
        found += [path for path in self.extra if path.is_file()]
        return list(dict.fromkeys(path.resolve() for path in found))

    def refresh(self) -> Totals:
        for path in self.files():
            offset = self.offsets.get(path, 0)
            try:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a line still being written is read next time
            for line in data[:end].splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.total.add(row)
                self.per_model[str(row.get("model"))].add(row)
            self.offsets[path] = offset + end
        return self.total

    def tokens_per_char(self, model: str) -> float:
        """Measured prompt tokens per prompt character of ``model`` in this run (chat templates
        included), but never below the assumed 1/4."""
        seen = self.per_model.get(model)
        if seen is None or not seen.prompt_chars:
            return ASSUMED_TOKENS_PER_CHAR
        return max(ASSUMED_TOKENS_PER_CHAR, seen.prompt_tokens / seen.prompt_chars)


# Writing: one stage's ledger, and the budget check -------------------------------------------


class Ledger:
    """The ledger of one stage (``directory/ledger.jsonl``), and the run's budget."""

    def __init__(self, directory: Path, stage: str, budget_usd: float | None = None, spend: RunSpend | None = None):
        self.path = directory / LEDGER
        self.stage = stage
        self.budget_usd = budget_usd
        self.spend = spend or RunSpend([], [self.path])
        self._log = JsonlLog(self.path)
        self._log.read()  # the writer (under the stage's lock) cuts a torn last line once

    @classmethod
    def for_stage(cls, config: DistillConfig, directory: Path | None, stage: str) -> Ledger | None:
        """The ledger of ``stage`` writing into ``directory`` (None: nowhere to write), with the
        run's ``budget_usd`` and every ledger of the run counting towards it."""
        if directory is None:
            return None
        from distill.paths import RunLayout

        layout = RunLayout.of(config)
        roots = [config.run_dir] if config.run_dir is not None else []
        extra = [directory / LEDGER]
        for name in ("eval", "rl"):  # their output_dir may lie outside run_dir
            try:
                extra.append(getattr(layout, name) / LEDGER)
            except DistillError:
                continue
        return cls(directory, stage, config.budget_usd, RunSpend(roots, extra))

    def record(
        self, pricing: Pricing, answered: Iterable[tuple[ChatRequest, ChatResult]], source: str, log: str | None
    ) -> None:
        """Append one row per answer (``source``: teacher or cache), fsynced."""
        now = datetime.now(timezone.utc).isoformat()
        rows = []
        for request, result in answered:
            usage = result.usage
            rows.append(
                {
                    "time": now,
                    "stage": self.stage,
                    "request_id": request.id,
                    "log": log,
                    "backend": pricing.teacher_class.name,
                    "model": pricing.model,
                    "mode": pricing.mode,
                    "source": source,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "cached_tokens": usage.cached_tokens,
                    "prompt_chars": prompt_chars(request),
                    "billed": pricing.billed and source == "teacher",
                    "cost_usd": 0.0 if source == "cache" else pricing.cost(usage),
                }
            )
        self._log.append(rows)

    def check_budget(self, pricing: Pricing, requests: list[ChatRequest]) -> None:
        """Raise ``BudgetExceeded`` when sending ``requests`` could take the run over the budget."""
        if self.budget_usd is None or not requests or not pricing.billed:
            return
        spent = self.spend.refresh()
        _, bound = pricing.upper_bound(requests, self.spend.tokens_per_char(pricing.model))
        if bound is None:
            raise BudgetExceeded(
                f"budget_usd is set, but the price of '{pricing.model}' is unknown, so the budget can't be "
                f"kept: add it to teacher.options.prices (input_per_million, output_per_million) or unset budget_usd"
            )
        if spent.usd + bound > self.budget_usd:
            remaining = max(self.budget_usd - spent.usd, 0.0)
            raise BudgetExceeded(
                f"budget: spent ${spent.usd:.4f} of ${self.budget_usd:.4f} (${remaining:.4f} left); the next "
                f"batch ({len(requests)} requests to {pricing.model}, {self.stage}) could cost up to ${bound:.4f}, "
                "so it was not sent. Everything so far is saved: rerun with a larger budget_usd "
                f"(e.g. --set budget_usd={suggest_budget(spent.usd + bound)}) to continue"
            )


def suggest_budget(needed: float) -> str:
    """A round figure above ``needed`` for the hint in the budget message."""
    if needed <= 0:
        return "1"
    step = 10 ** math.floor(math.log10(needed))
    return f"{math.ceil(needed / step + 1e-9) * step:.10g}"


def cost_lines(run_dir: Path) -> list[str]:
    """The ledger of a run as a table: one line per stage and model, then the total."""
    rows = [row for path in run_ledger_files(run_dir) for row in read_ledger(path)]
    if not rows:
        return [f"{run_dir}: no ledger yet (nothing was asked of a teacher)"]
    summary = summarize(rows)
    header = (
        f"{'stage':<10} {'model':<44} {'sent':>6} {'cached':>6} {'prompt tok':>11} {'reply tok':>10} {'cached tok':>10}"
    )
    lines = [f"{header}  cost"]
    for entry in summary["models"]:
        lines.append(
            f"{entry['stage']:<10} {entry['model']:<44} {entry['requests']:>6} {entry['from_cache']:>6} "
            f"{entry['prompt_tokens']:>11,} {entry['completion_tokens']:>10,} {entry['cached_tokens']:>10,}  "
            f"{entry['text']}"
        )
    total = summary["total"]
    lines.append(
        f"{'total':<10} {'':<44} {total['requests']:>6} {total['from_cache']:>6} {total['prompt_tokens']:>11,} "
        f"{total['completion_tokens']:>10,} {total['cached_tokens']:>10,}  {total['text']}"
    )
    return lines

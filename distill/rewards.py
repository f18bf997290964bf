"""Judges as TRL reward functions.

``reward_functions(config)`` turns the configured judges and their weights into what TRL's
``GRPOTrainer`` / ``RLOOTrainer`` take: ``reward_funcs=`` (one callable per judge, named after the
judge, so TRL logs ``rewards/<label>/mean``) and ``GRPOConfig(reward_weights=...)``.

**An invalid verdict never becomes a reward, not even a partial one.** All judges score a batch
together (one batched teacher call per judge, identical pairs answered from the request cache);
a completion that *any* judge could not score gets ``None`` from *every* reward function. TRL
(>= 1.16, pinned) treats a completion whose rewards are all ``None`` as unscorable: it is left out
of its group's baseline and its advantage is 0. Were only the failing judge's column ``None``,
TRL's weighted ``nansum`` would score the completion on the other judges alone, and a policy
could gain by making a judge fail (for ``harmlessness``, whose worst class is -1, a failed verdict
would beat an honest one). ``asynchronous=True`` gives ``async`` callables, which TRL runs
concurrently; the batch is still judged once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from distill.config import DistillConfig
from distill.errors import ConfigError
from distill.judge import Judge, load_judge
from distill.judging import judge_answer_source
from distill.records import JudgeItem


def completion_text(value: Any) -> str:
    """TRL passes plain strings, or conversations (lists of {role, content}) for chat datasets."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def prompt_text(value: Any) -> str:
    if isinstance(value, list):  # a conversation: the last user turn is the request
        users = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else completion_text(value)
    return completion_text(value)


class JudgePanel:
    """The judges of one RL run. Judges each batch once, for all of them, and masks a completion
    in every judge's column as soon as one judge's verdict on it is invalid."""

    def __init__(self, judges: list[Judge]):
        self.judges = judges
        self.calls = 0
        self.judged = 0
        self.unscorable = 0
        self.invalid = {judge.label: 0 for judge in judges}
        self._lock = threading.Lock()  # async reward functions run concurrently
        self._batch: tuple[str, ...] | None = None
        self._columns: dict[str, list[float | None]] = {}

    def column(self, label: str, prompts: list[Any], completions: list[Any], log_metric: Any) -> list[float | None]:
        pairs = [(prompt_text(p), completion_text(c)) for p, c in zip(prompts, completions)]
        key = tuple(f"{p}\x00{c}" for p, c in pairs)
        with self._lock:
            if key != self._batch:
                self._judge(pairs, log_metric)
                self._batch = key
            return self._columns[label]

    def _judge(self, pairs: list[tuple[str, str]], log_metric: Any) -> None:
        items = [JudgeItem(id=f"{self.calls}:{i}", prompt=p, response=c) for i, (p, c) in enumerate(pairs)]
        self.calls += 1
        self.judged += len(items)
        verdicts = {judge.label: judge.judge(items) for judge in self.judges}
        scorable = [all(verdicts[label][i].valid for label in verdicts) for i in range(len(items))]
        self.unscorable += scorable.count(False)
        self._columns = {
            label: [j.reward if ok else None for j, ok in zip(judgements, scorable)]
            for label, judgements in verdicts.items()
        }
        for label, judgements in verdicts.items():
            invalid = sum(not j.valid for j in judgements)
            self.invalid[label] += invalid
            if callable(log_metric):  # TRL >= 1.0 passes a logger for extra per-step metrics
                log_metric(f"judge/{metric_name(label)}/invalid_rate", invalid / max(1, len(items)))
        if callable(log_metric):
            log_metric("judge/unscorable_rate", scorable.count(False) / max(1, len(items)))


def metric_name(label: str) -> str:
    return label.replace(":", "_")


class JudgeReward:
    """A TRL reward function: one judge's column of the panel's verdicts."""

    def __init__(self, panel: JudgePanel, judge: Judge):
        self.panel = panel
        self.judge = judge
        self.__name__ = metric_name(judge.label)

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        return self.panel.column(self.judge.label, prompts, completions, kwargs.get("log_metric"))


class AsyncJudgeReward(JudgeReward):
    """The same, as a coroutine: TRL runs async reward functions concurrently on its event loop."""

    async def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:  # type: ignore[override]
        return await asyncio.to_thread(JudgeReward.__call__, self, prompts, completions, **kwargs)


def reward_functions(
    config: DistillConfig, teacher: Any = None, asynchronous: bool = False
) -> tuple[list[JudgeReward], list[float]]:
    """The judges of ``config.judge.judges`` as TRL reward functions (sharing one ``JudgePanel``,
    reachable as ``functions[0].panel``), and their weights."""
    specs = config.judge.judges
    if not specs:
        raise ConfigError(["judge.judges: RL needs at least one judge as its reward; add a rubric or rule judge"])
    from distill.paths import RunLayout

    # No answer log (RL completions are new every step), but what the judges cost is recorded.
    answers = judge_answer_source(
        config, out_dir=None, teacher=teacher, stage="rl", ledger_dir=RunLayout.of(config).adapter("rl")
    )
    judges = []
    for number, spec in enumerate(specs):
        judge = load_judge(spec, answers, where=f"judge.judges.{number}")
        if judge.pairwise:
            raise ConfigError(
                [f"judge.judges.{number}.type: a pairwise judge needs a second response; use rubric, score or rule"]
            )
        judges.append(judge)
    panel = JudgePanel(judges)
    wrapper = AsyncJudgeReward if asynchronous else JudgeReward
    return [wrapper(panel, judge) for judge in judges], [spec.weight for spec in specs]

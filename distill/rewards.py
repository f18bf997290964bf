"""Judges as TRL reward functions.

``reward_functions(config)`` turns the configured judges and their weights into what TRL's
``GRPOTrainer`` / ``RLOOTrainer`` take: ``reward_funcs=`` (one callable per judge, named after the
judge, so TRL logs ``rewards/<label>/mean``) and ``GRPOConfig(reward_weights=...)``. Each callable
judges the whole batch in one call (one batched teacher request), answers identical
(prompt, completion) pairs from the request cache, and returns ``None`` for an invalid verdict:
TRL turns that into NaN and leaves it out of the weighted sum, so an unreadable verdict never
becomes a reward. ``asynchronous=True`` gives ``async`` callables, which TRL runs concurrently.
"""

from __future__ import annotations

import asyncio
from typing import Any

from distill.config import DistillConfig
from distill.errors import ConfigError
from distill.judge import Judge, judge_answer_source, load_judge
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


class JudgeReward:
    """A TRL reward function backed by one judge."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.__name__ = judge.label.replace(":", "_")
        self.calls = 0
        self.judged = 0
        self.invalid = 0

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        items = [
            JudgeItem(id=f"{self.calls}:{i}", prompt=prompt_text(p), response=completion_text(c))
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        judgements = self.judge.judge(items)
        invalid = sum(not j.valid for j in judgements)
        self.calls += 1
        self.judged += len(judgements)
        self.invalid += invalid
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):  # TRL >= 1.0 passes a logger for extra per-step metrics
            log_metric(f"judge/{self.__name__}/invalid_rate", invalid / max(1, len(judgements)))
        return [j.reward if j.valid else None for j in judgements]


class AsyncJudgeReward(JudgeReward):
    """The same, as a coroutine: TRL runs async reward functions concurrently on its event loop."""

    async def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:  # type: ignore[override]
        return await asyncio.to_thread(JudgeReward.__call__, self, prompts, completions, **kwargs)


def reward_functions(
    config: DistillConfig, teacher: Any = None, asynchronous: bool = False
) -> tuple[list[JudgeReward], list[float]]:
    """The judges of ``config.judge.judges`` as TRL reward functions, and their weights."""
    specs = config.judge.judges
    if not specs:
        raise ConfigError(["judge.judges: RL needs at least one judge as its reward; add a rubric or rule judge"])
    answers = judge_answer_source(config, run_dir=None, teacher=teacher)
    wrapper = AsyncJudgeReward if asynchronous else JudgeReward
    functions = []
    for number, spec in enumerate(specs):
        judge = load_judge(spec, answers, where=f"judge.judges.{number}")
        if judge.pairwise:
            raise ConfigError(
                [f"judge.judges.{number}.type: a pairwise judge needs a second response; use rubric, score or rule"]
            )
        functions.append(wrapper(judge))
    return functions, [spec.weight for spec in specs]

"""The ``reward_model`` judge: a reward model trained by `distill train rm` scores each (prompt,
response) with one forward pass, no LLM call. In `train rl` it is a reward like any judge
(``judge.judges: [{type: reward_model, options: {path: runs/x/rm}}]``), so RL no longer asks the LLM
judge about every rollout.

Reward: by default σ(score), the RM's scalar squashed into (0, 1), monotone in the score, so it sits
on the scale of the rubric judges' rewards when weights combine several judges (σ(r_a − r_b) is the
Bradley-Terry probability the RM was trained on; GRPO normalises each group anyway); ``squash: none``
gives the raw score. Every item gets a valid verdict (``scored``): a forward pass always yields a
number. Calibrated on gold better/worse pairs by scoring both answers (the ``gold`` option, else the
gold pairs of the rubric of the judge it was trained from).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.judge import Judge, Rubric
from distill.records import JudgeItem, Judgement


def sigmoid(x: float) -> float:
    """σ(x) without overflow for large |x|."""
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


class RewardModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="The reward model directory (the output of `distill train rm`).")
    batch_size: int = Field(8, ge=1, description="Responses scored per forward pass (changes speed, not scores).")
    max_length: int = Field(1024, ge=16, description="Tokens of prompt + response scored; longer ones are cut.")
    squash: Literal["sigmoid", "none"] = Field(
        "sigmoid", description="sigmoid: reward = σ(score), in (0, 1); none: the raw score."
    )
    gold: str | None = Field(
        None, description="Gold pairs (JSONL: prompt, better, worse) to calibrate on; default: the source rubric's."
    )


class RewardModelJudge(Judge):
    """A trained reward model's scalar score (σ-squashed by default); no LLM call, every item scored."""

    name = "reward_model"
    options_model = RewardModelOptions
    needs_teacher = False
    needs_rubric = False
    calibrate_on_pairs = True

    def __init__(self, label: str, rubric: Rubric | None, teacher: Any, options: Any):
        from distill.reward_model import RewardScorer

        super().__init__(label, rubric, teacher, options)
        self.scorer = RewardScorer(Path(options.path), options.batch_size, options.max_length)

    def gold_path(self) -> Path | None:
        if self.options.gold:  # type: ignore[attr-defined]
            return Path(self.options.gold)  # type: ignore[attr-defined]
        from distill.judge import load_rubric

        source = self.scorer.info.get("rubric")
        if not source:
            return None
        rubric = load_rubric(source)
        return rubric.resolve(rubric.gold_pairs) if rubric.gold_pairs else None

    def judge(self, items: list[JudgeItem]) -> list[Judgement]:
        scores = self.scorer.score([item.prompt for item in items], [item.response for item in items])
        squash = self.options.squash == "sigmoid"  # type: ignore[attr-defined]
        return [
            self.judgement(
                item,
                verdict="scored",
                reward=sigmoid(score) if squash else score,
                raw=[json.dumps({"score": score})],
            )
            for item, score in zip(items, scores)
        ]

    def judgement(self, item: JudgeItem, **fields: Any) -> Judgement:
        fields.setdefault("judge_model", str(self.scorer.directory))
        return Judgement(
            item_id=item.id,
            judge=self.label,
            judge_type=self.name,
            rubric=None,
            **fields,
        )


@distill.hookimpl
def register_judges(register: Callable[[type[Any]], None]) -> None:
    register(RewardModelJudge)

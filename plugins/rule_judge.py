"""The ``rule`` judge: regular-expression, length and JSON checks, no model. Shows that the judge
interface is not tied to LLMs, and gives RL a reward with a known optimum."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import distill
from distill.judge import Judge
from distill.records import JudgeItem, Judgement


class RuleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_words: int | None = Field(
        None, ge=1, description="Full marks up to this many words; falls linearly to 0 at twice as many."
    )
    min_words: int | None = Field(None, ge=1, description="Full marks from this many words; linearly less below.")
    must_match: list[str] = Field(default_factory=list, description="Regular expressions the response must contain.")
    must_not_match: list[str] = Field(
        default_factory=list, description="Regular expressions the response must not contain."
    )
    json_object: bool = Field(False, description="The response must be a JSON object.")

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _something_to_check(self) -> RuleOptions:
        if not (self.max_words or self.min_words or self.must_match or self.must_not_match or self.json_object):
            raise ValueError("a rule judge needs at least one check: max_words, min_words, must_match, ...")
        return self


class RuleJudge(Judge):
    """Reward = mean of the checks' scores (each 0..1). Verdict ``pass`` when every check scores 1,
    else ``fail``. Every response gets a valid verdict: rules can always be evaluated."""

    name = "rule"
    options_model = RuleOptions
    needs_teacher = False
    needs_rubric = False

    def checks(self, response: str) -> dict[str, float]:
        o: Any = self.options
        words = len(response.split())
        scores: dict[str, float] = {}
        if o.max_words:
            scores["max_words"] = 1.0 if words <= o.max_words else max(0.0, 2 - words / o.max_words)
        if o.min_words:
            scores["min_words"] = min(1.0, words / o.min_words)
        for pattern in o.must_match:
            scores[f"match:{pattern}"] = 1.0 if re.search(pattern, response) else 0.0
        for pattern in o.must_not_match:
            scores[f"no_match:{pattern}"] = 0.0 if re.search(pattern, response) else 1.0
        if o.json_object:
            try:
                scores["json_object"] = 1.0 if isinstance(json.loads(response), dict) else 0.0
            except json.JSONDecodeError:
                scores["json_object"] = 0.0
        return scores

    def judge(self, items: list[JudgeItem]) -> list[Judgement]:
        judgements = []
        for item in items:
            scores = self.checks(item.response)
            judgements.append(
                self.judgement(
                    item,
                    verdict="pass" if all(v == 1.0 for v in scores.values()) else "fail",
                    reward=sum(scores.values()) / len(scores),
                    raw=[json.dumps(scores)],
                )
            )
        return judgements


@distill.hookimpl
def register_judges(register: Callable[[type[Any]], None]) -> None:
    register(RuleJudge)

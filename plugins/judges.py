"""Built-in model judges: rubric (RBRM classes → rewards), score (1-5, Prometheus style) and
pairwise (A vs B in both orders). Each runs on any teacher backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import distill
from distill.judge import ModelJudge, Rubric, RubricClass
from distill.records import JudgeItem, Judgement


class RubricJudge(ModelJudge):
    """RBRM: the judge picks one of the rubric's classes; the class's reward is the reward."""

    name = "rubric"
    default_template = "judges/rubric.jinja"
    answer_key = "class"
    answer_label = "Answer"


class ScoreJudge(ModelJudge):
    """A 1-5 score against the rubric's ``scores`` descriptions; reward = (score - 1) / 4."""

    name = "score"
    default_template = "judges/score.jinja"
    answer_key = "score"
    answer_label = "Score"

    def __init__(self, label: str, rubric: Rubric | None, teacher: Any, options: Any):
        assert rubric is not None
        if not rubric.scores:  # a rubric without score descriptions: derive them from its description
            rubric = rubric.model_copy(
                update={"scores": {1: "Very poor.", 2: "Poor.", 3: "Acceptable.", 4: "Good.", 5: "Excellent."}}
            )
        # The five scores become the classes, so parsing, sampling and probabilities are shared.
        classes = [RubricClass(id=str(s), description=text, reward=(s - 1) / 4) for s, text in rubric.scores.items()]
        super().__init__(label, rubric.model_copy(update={"classes": classes}), teacher, options)

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
            "required": ["score"],
            "additionalProperties": False,
        }


class PairwiseJudge(ModelJudge):
    """Which of two responses is better. Always asked in both orders; a verdict that flips with
    the order is a tie. Reward is for response A: 1 win, 0.5 tie, 0 loss."""

    name = "pairwise"
    pairwise = True
    default_template = "judges/pairwise.jinja"
    answer_key = "better"
    answer_label = "Answer"

    def allowed(self) -> list[str]:
        return ["A", "B"]

    def rewards(self) -> dict[str, float]:
        return {"A": 1.0, "B": 0.0}

    def judge(self, items: list[JudgeItem]) -> list[Judgement]:
        forward = [self.request(prompt=i.prompt, response_a=i.response, response_b=i.response_b) for i in items]
        backward = [self.request(prompt=i.prompt, response_a=i.response_b, response_b=i.response) for i in items]
        results = self.teacher.generate(forward + backward)
        judgements = []
        for item, first, second in zip(items, results[: len(items)], results[len(items) :]):
            a_first, b_first = self.read(first), self.read(second)
            # In the second order the labels are swapped: "A" there means response B won.
            swapped = {"A": "B", "B": "A"}
            second_verdict = swapped.get(b_first["verdict"]) if b_first["verdict"] else None
            raw = a_first["raw"] + b_first["raw"]
            latency = round(first.latency_s + second.latency_s, 4)
            if a_first["verdict"] is None or second_verdict is None:
                reason = a_first.get("invalid_reason") or b_first.get("invalid_reason")
                judgements.append(
                    self.judgement(
                        item,
                        verdict=None,
                        reward=None,
                        invalid_reason=reason,
                        raw=raw,
                        latency_s=latency,
                        samples=[a_first["verdict"], second_verdict],
                    )
                )
                continue
            consistent = a_first["verdict"] == second_verdict
            verdict = a_first["verdict"] if consistent else "tie"
            judgements.append(
                self.judgement(
                    item,
                    verdict=verdict,
                    reward={"A": 1.0, "B": 0.0, "tie": 0.5}[verdict],
                    raw=raw,
                    samples=[a_first["verdict"], second_verdict],
                    position_consistent=consistent,
                    latency_s=latency,
                )
            )
        return judgements


@distill.hookimpl
def register_judges(register: Callable[[type[Any]], None]) -> None:
    register(RubricJudge)
    register(ScoreJudge)
    register(PairwiseJudge)

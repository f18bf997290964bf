"""Factual evaluation tasks: held-out questions, answer extraction, scoring, confidence intervals
and the gap-closed arithmetic of the false-promise report.

Scoring of open questions, SQuAD-style normalisation: lower-case, drop punctuation, drop the
articles a / an / the, collapse whitespace. **Exact match**: the normalised prediction equals a
normalised accepted answer. **Contains**: a normalised accepted answer occurs in the normalised
prediction as a whole-word sequence. Multiple choice: the first A-D letter standing alone at the
start of the prediction (or the text of a choice) must be the right one. The prediction is the
first non-empty line of the model's answer.
"""

from __future__ import annotations

import random
import re
import string
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

LETTERS = "ABCDEFGHIJ"


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id within the task.")
    question: str = Field(description="The question as asked.")
    answers: list[str] = Field(min_length=1, description="Accepted answers (aliases); for multiple choice, the letter.")
    choices: list[str] | None = Field(None, description="Options of a multiple-choice question, in order.")
    kind: str = Field("", description="Question type within the task (capital, currency, ...).")


class NoTaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task(ABC):
    """Base class for tasks registered through ``register_tasks``."""

    name: ClassVar[str]
    """What users write in ``eval.tasks[].type``."""
    description: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoTaskOptions

    def __init__(self, options: BaseModel):
        self.options = options

    @abstractmethod
    def questions(self) -> list[Question]:
        """The held-out questions, in a stable order. No generate or train stage reads them."""

    def prompt(self, question: Question) -> str:
        if question.choices:
            options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
            return f"{question.question}\n{options}\nAnswer with the letter of the correct option only."
        return f"{question.question}\nAnswer with just the answer, in a few words."

    def score(self, question: Question, prediction: str) -> dict[str, bool]:
        answer = first_line(prediction)
        if question.choices:
            return {"correct": choice_letter(answer, question.choices) == question.answers[0]}
        return {
            "exact": exact_match(answer, question.answers),
            "correct": contains_match(answer, question.answers),
        }


# Scoring ---------------------------------------------------------------------------------------


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    normalized = normalize(prediction)
    return any(normalized == normalize(answer) for answer in answers if normalize(answer))


def contains_match(prediction: str, answers: list[str]) -> bool:
    padded = f" {normalize(prediction)} "
    return any(f" {normalize(answer)} " in padded for answer in answers if normalize(answer))


def choice_letter(prediction: str, choices: list[str]) -> str | None:
    """The chosen option's letter: a leading letter ("B", "(B)", "B." , "Answer: B") or the exact
    text of one option."""
    letters = LETTERS[: len(choices)]
    match = re.match(rf"^\s*(?:answer\s*[:\-]?\s*)?[\(\[]?([{letters}])[\)\]\.:]?(?:\s|$)", prediction, re.I)
    if match:
        return match.group(1).upper()
    normalized = normalize(prediction)
    hits = [LETTERS[i] for i, choice in enumerate(choices) if normalize(choice) == normalized]
    return hits[0] if len(hits) == 1 else None


# Statistics ------------------------------------------------------------------------------------


def bootstrap_interval(values: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def gap_closed(base: float, tuned: float, teacher: float) -> float | None:
    """(tuned − base) / (teacher − base); None when the teacher is not better than the base (there
    is no gap to close)."""
    gap = teacher - base
    if gap <= 0:
        return None
    return (tuned - base) / gap


def gap_closed_interval(
    base: list[float], tuned: list[float], teacher: list[float], resamples: int = 1000, seed: int = 0
) -> tuple[float | None, float | None, int]:
    """Paired bootstrap over questions (same resampled questions for all three models): 95%
    interval of gap closed, and how many resamples had no gap (teacher ≤ base) and were skipped."""
    n = len(base)
    rng = random.Random(seed)
    values, undefined = [], 0
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        b = sum(base[i] for i in picks) / n
        t = sum(tuned[i] for i in picks) / n
        te = sum(teacher[i] for i in picks) / n
        closed = gap_closed(b, t, te)
        if closed is None:
            undefined += 1
        else:
            values.append(closed)
    if len(values) < resamples / 2:  # mostly no gap: an interval would mislead
        return None, None, undefined
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1], undefined


def task_options_problems(task_class: type[Task], options: dict[str, Any], where: str) -> list[str]:
    from pydantic import ValidationError

    from distill.config import format_validation_error

    try:
        task_class.options_model.model_validate(options)
    except ValidationError as exc:
        return format_validation_error(exc, task_class.options_model, prefix=f"{where}.options")
    return []

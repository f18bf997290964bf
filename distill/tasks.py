"""Factual evaluation tasks: held-out questions, answer extraction and scoring (the statistics
on top of the scores live in ``distill.stats``).

**Scoring.** The prediction is the first non-empty line of the model's answer. Text is compared
after normalisation: accents folded (NFKD, combining marks dropped: "Bogotá" = "Bogota"),
lower-case, punctuation → space, the articles a / an / the dropped, whitespace collapsed (SQuAD's
normalisation plus accent folding). The headline, ``correct``, depends on the task kind:

- **Open questions without an answer space** (``nq_open``, ``triviaqa``, ``jsonl`` by default,
  plugin tasks by default): *exact match*, the normalised prediction equals a normalised accepted
  answer (the convention of the SQuAD evaluation script and lm-evaluation-harness). A lenient
  "an answer occurs somewhere in the prediction" rule would pay for listing candidates, and an
  open question has no list of candidates to catch that with. ``contains`` (an accepted answer
  occurs as whole words) is reported as a secondary field, never the headline.
- **Questions with a known answer space** (``countries``; ``jsonl`` with ``scoring:
  answer_space``; plugin tasks that override ``Task.answer_space``): the answer space is every
  accepted answer of every question of the same kind (all capitals, all region names...). The
  prediction is correct iff (a) it is not a question back (it does not end with "?"), (b) after
  removing spans copied from the question (maximal runs of ≥ 3 normalised tokens that also occur
  consecutively in the question) it names an accepted answer as whole words, and (c) it names no
  member of the answer space that is not an accepted answer. Members are found longest first,
  without overlaps, so "Papua New Guinea" does not also name "Guinea". "The capital of France is
  Paris." is correct; "Paris, Lyon or Marseille" is not. Members are matched in any case, except
  codes that are English words ("ALL", "TOP"), matched only in capitals. ``exact`` and ``contains``
  are secondary.
- **Multiple choice** (``mmlu``, ``jsonl`` with ``choices``): the chosen letter (``B``, ``(B)``,
  ``B.``, ``Answer: B``, ``The answer is B``) or the exact text of one option. A prediction that
  names more than one option letter ("A or B", "(B) or (C)", "A, B, C, D") is wrong; option texts
  repeated after the letter are ignored, and a lone "A" before a word ("B. A cat") is an article,
  not a letter.
"""

from __future__ import annotations

import re
import string
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

LETTERS = "ABCDEFGHIJ"


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id within the task.")
    question: str = Field(description="The question as asked.")
    answers: list[str] = Field(min_length=1, description="Accepted answers (aliases); for multiple choice, the letter.")
    choices: list[str] | None = Field(None, description="Options of a multiple-choice question, in order.")
    kind: str = Field("", description="Question type within the task (capital, currency, ...).")
    sources: list[str] = Field(
        default_factory=list,
        description="Documents that hold the answer (corpus-relative paths or document ids), for retrieval recall; "
        "empty: unknown.",
    )


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

    def answer_space(self, question: Question) -> AnswerSpace | None:
        """Every answer a question of this kind could have, or None for an open question (then the
        headline is exact match). Override it when the candidates are known: naming a wrong
        candidate besides the right one then makes a prediction wrong."""
        return None

    def prompt(self, question: Question) -> str:
        if question.choices:
            options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
            return f"{question.question}\n{options}\nAnswer with the letter of the correct option only."
        return f"{question.question}\nAnswer with just the answer, in a few words."

    def score(self, question: Question, prediction: str) -> dict[str, bool]:
        answer = first_line(prediction)
        if question.choices:
            return {"correct": choice_letter(answer, question.choices) == question.answers[0]}
        exact = exact_match(answer, question.answers)
        scores = {"exact": exact, "contains": contains_match(answer, question.answers), "correct": exact}
        space = self.answer_space(question)
        if space is not None:
            scores["correct"] = answer_space_match(answer, question.question, question.answers, space)
        return scores


# Normalisation ---------------------------------------------------------------------------------

# Letters NFKD does not decompose into a base letter and a combining mark.
_FOLD = str.maketrans({"ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ß": "ss", "ł": "l"})
_FOLD.update(str.maketrans({"Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i"}))
_ARTICLES = re.compile(r"\b(?:a|an|the)\b", re.I)


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def fold_accents(text: str) -> str:
    """ "Bogotá" → "Bogota", "Tórshavn" → "Torshavn", "Føroyar" → "Foroyar"."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str, *, lower: bool = True) -> str:
    """SQuAD-style normalisation plus accent folding: accents folded, lower-case (unless ``lower``
    is False), punctuation → space, articles a / an / the dropped, whitespace collapsed."""
    text = fold_accents(text)
    if lower:
        text = text.lower()
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# Open questions --------------------------------------------------------------------------------


def exact_match(prediction: str, answers: list[str]) -> bool:
    normalized = normalize(prediction)
    return any(normalized == normalize(answer) for answer in answers if normalize(answer))


def contains_match(prediction: str, answers: list[str]) -> bool:
    """An accepted answer occurs in the prediction as whole words. Lenient: listing candidates
    passes, so it is never a headline."""
    padded = f" {normalize(prediction)} "
    return any(f" {normalize(answer)} " in padded for answer in answers if normalize(answer))


# Questions with an answer space ----------------------------------------------------------------

Span = tuple[str, ...]


class AnswerSpace:
    """The candidates of one kind of question: every accepted answer (every alias) of every
    question of that kind. ``named`` finds which of them a text names, longest first and without
    overlaps ("Papua New Guinea" names Papua New Guinea, not also Guinea). Members are matched in
    any case, except those in ``exact_case``, matched only as written: ISO 4217 "ALL" is a currency
    where "all" is a word."""

    def __init__(self, members: Iterable[str], *, exact_case: Iterable[str] = ()):
        self.exact_case: set[Span] = {span for span in (tuple(self.tokens(m)) for m in exact_case) if span}
        lowered = {tuple(token.lower() for token in span) for span in self.exact_case}
        self.members: set[Span] = {span for span in (self.span(m) for m in members) if span} - lowered
        self.longest = max((len(span) for span in self.members | self.exact_case), default=0)

    @staticmethod
    def tokens(text: str) -> list[str]:
        """Normalised tokens, case kept (matching lowers them where case does not matter)."""
        return normalize(text, lower=False).split()

    @staticmethod
    def span(text: str) -> Span:
        return tuple(normalize(text).split())

    def named(self, segments: list[list[str]], extra: Iterable[Span] = ()) -> list[Span]:
        """The members (and ``extra`` spans) named in segments of ``tokens``, longest first, without
        overlaps; a member never spans two segments. Spans come back lower-cased."""
        extra = set(extra)
        members = self.members | extra
        longest = max([self.longest, *(len(span) for span in extra)])
        found: list[Span] = []
        for tokens in segments:
            lowered = [token.lower() for token in tokens]
            taken = [False] * len(tokens)
            for size in range(min(longest, len(tokens)), 0, -1):
                for start in range(len(tokens) - size + 1):
                    span = tuple(lowered[start : start + size])
                    if any(taken[start : start + size]):
                        continue
                    if span in members or tuple(tokens[start : start + size]) in self.exact_case:
                        found.append(span)
                        taken[start : start + size] = [True] * size
        return found


def without_copied_spans(tokens: list[str], question_tokens: list[str], min_run: int = 3) -> list[list[str]]:
    """The prediction's tokens minus maximal runs of ≥ ``min_run`` tokens that also occur
    consecutively in the question (compared in lower case), as the segments left between the
    removed runs."""
    lowered = [token.lower() for token in tokens]
    question = [token.lower() for token in question_tokens]
    copied: set[Span] = set()
    for start in range(len(question)):
        for end in range(start + min_run, len(question) + 1):
            copied.add(tuple(question[start:end]))
    segments: list[list[str]] = [[]]
    position = 0
    while position < len(tokens):
        run = 0
        if tuple(lowered[position : position + min_run]) in copied:
            run = min_run
            while position + run < len(tokens) and tuple(lowered[position : position + run + 1]) in copied:
                run += 1
        if run:
            segments.append([])
            position += run
        else:
            segments[-1].append(tokens[position])
            position += 1
    return [segment for segment in segments if segment]


def is_question_back(prediction: str) -> bool:
    """The first line ends with a question mark (quotes and markdown around it ignored)."""
    return first_line(prediction).rstrip(" \t*_`\"'”’»)]").endswith(("?", "？"))


def answer_space_match(prediction: str, question: str, answers: list[str], space: AnswerSpace) -> bool:
    """The headline rule for questions with an answer space (see the module docstring): not a
    question back, an accepted answer named outside the spans copied from the question, and no
    other member of the answer space named."""
    if is_question_back(prediction):
        return False
    accepted = {span for span in (space.span(answer) for answer in answers) if span}
    segments = without_copied_spans(space.tokens(first_line(prediction)), space.tokens(question))
    named = space.named(segments, extra=accepted - {tuple(t.lower() for t in span) for span in space.exact_case})
    return bool(named) and all(span in accepted for span in named)


# Multiple choice -------------------------------------------------------------------------------


def choice_letter(prediction: str, choices: list[str]) -> str | None:
    """The chosen option's letter: a leading letter ("B", "(B)", "B.", "Answer: B", "The answer
    is B") or the exact text of one option; None when the prediction names more than one option
    letter ("A or B", "(B) or (C)")."""
    letters = LETTERS[: len(choices)]
    text = prediction.replace("*", "").strip()
    normalized = normalize(text)
    hits = [LETTERS[i] for i, choice in enumerate(choices) if normalize(choice) == normalized]
    if len(hits) == 1 and re.match(r"[AI]\s+[a-z]", text):  # "A cat" is an option's text, not "A"
        return hits[0]
    lower = letters.lower()
    leading = re.match(  # a lower-case letter counts only with punctuation or alone: "a cat" is not A
        rf"^(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option)(?:\s+is)?\s*[:\-]?\s*)?"
        rf"(?:[\(\[]([{letters}{lower}])[\)\]]|([{letters}])[\)\.:,;]?(?=\s|$)|([{lower}])(?:[\)\.:,;]|$))",
        text,
    )
    if leading:
        letter = next(group for group in leading.groups() if group).upper()
        rest = text[leading.end() :]
    else:
        if len(hits) != 1:
            return None
        letter, rest = hits[0], ""
    for choice in sorted(choices, key=len, reverse=True):  # an option's text repeated after its letter
        if choice.strip():
            rest = re.sub(re.escape(choice.strip()), " ", rest, flags=re.I)
    others = _letters_named(rest, letters) - {letter}
    return None if others else letter


def _letters_named(text: str, letters: str) -> set[str]:
    """Option letters named in free text: "(C)", or a capital letter standing alone. "A" and "I"
    are English words, so they count only bracketed or followed by punctuation, "or"/"and", or the
    end of the line ("B. A cat" names B only)."""
    named = {match.upper() for match in re.findall(rf"[\(\[]([{letters}])[\)\]]", text, re.I)}
    for match in re.finditer(rf"(?<![\w'’+#\-])([{letters}])(?![\w'’+#\-])", text):
        letter = match.group(1)
        after = text[match.end() :]
        if letter in "AI" and not re.match(r"\s*(?:$|[\)\]\.,;:/|&]|(?:or|and|nor)\b)", after):
            continue
        named.add(letter)
    return named

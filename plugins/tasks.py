"""Built-in factual tasks: `countries` (offline, from the countryinfo package), `jsonl` (bring your
own questions), and loaders for Natural Questions open, TriviaQA (no context) and MMLU in their
Hugging Face formats (a local copy, or the hub when online)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.errors import ConfigError
from distill.tasks import LETTERS, Question, Task

COUNTRY_KINDS = ("capital", "country_of_capital", "region", "currency", "calling_code", "language")


class LimitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(None, ge=1, description="Use this many questions (a seeded sample); empty: all.")
    seed: int = Field(0, description="Seed of the sample.")


def sample(questions: list[Question], options: Any) -> list[Question]:
    if options.limit is None or options.limit >= len(questions):
        return questions
    picked = random.Random(options.seed).sample(range(len(questions)), options.limit)
    return [questions[i] for i in sorted(picked)]


def _qid(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


class CountriesOptions(LimitOptions):
    kinds: list[Literal[COUNTRY_KINDS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(COUNTRY_KINDS), description=f"Question types: {', '.join(COUNTRY_KINDS)}."
    )


class CountriesTask(Task):
    """Questions about the world's countries from the countryinfo package's data (offline, real).
    Names are accepted in every spelling the data lists (full names, not ISO codes)."""

    name = "countries"
    description = "Capitals, currencies, regions, calling codes, languages of ~250 countries (countryinfo)."
    options_model = CountriesOptions

    def questions(self) -> list[Question]:
        from countryinfo import all_countries

        questions = []
        for country in sorted(all_countries(), key=lambda c: c.name()):
            info = country.info()
            name = info.get("name")
            if not name:
                continue
            names = [name] + [s for s in info.get("altSpellings") or [] if len(s) > 3]
            facts = {
                "capital": (f"What is the capital of {name}?", [info.get("capital")]),
                "country_of_capital": (f"{info.get('capital')} is the capital of which country?", names),
                "region": (f"In which region of the world is {name}?", [info.get("region")]),
                "currency": (
                    f"What is the ISO 4217 code of the currency of {name}?",
                    list(info.get("currencies") or []),
                ),
                "calling_code": (
                    f"What is the international calling code of {name}?",
                    [f"+{code}" for code in info.get("callingCodes") or []] + list(info.get("callingCodes") or []),
                ),
                "language": (
                    f"What is the ISO 639-1 code of an official language of {name}?",
                    list(info.get("languages") or []),
                ),
            }
            for kind in self.options.kinds:  # type: ignore[attr-defined]
                text, answers = facts[kind]
                answers = [a for a in answers if isinstance(a, str) and a.strip()]
                if answers and (kind != "country_of_capital" or info.get("capital")):
                    questions.append(Question(id=_qid(kind, name), question=text, answers=answers, kind=kind))
        return sample(questions, self.options)


class FileOptions(LimitOptions):
    path: Path = Field(description="The questions file.")


class JsonlTask(Task):
    """Your own questions: one JSON object per line with `question`, `answers` (list of accepted
    answers) and optionally `choices` (then `answers` holds the letter or the index of the right one)."""

    name = "jsonl"
    description = "Your questions: JSONL with question, answers[, choices]."
    options_model = FileOptions

    def questions(self) -> list[Question]:
        from distill.runstore import read_rows

        path = self.options.path  # type: ignore[attr-defined]
        if not path.is_file():
            raise ConfigError([f"eval task jsonl: {path} not found"])
        questions, problems = [], []
        for number, row in enumerate(read_rows(path), 1):  # JSON and UTF-8 problems are reported there
            answers, choices = row.get("answers"), row.get("choices")
            if not isinstance(row.get("question"), str) or not isinstance(answers, list) or not answers:
                problems.append(f"{path} row {number}: needs 'question' (string) and 'answers' (non-empty list)")
                continue
            if choices is not None:
                letter = _letter(answers[0], choices)
                if letter is None:
                    problems.append(f"{path} row {number}: answers[0] must be a letter or index of 'choices'")
                    continue
                answers = [letter]
            questions.append(
                Question(
                    id=str(row.get("id") or f"row_{number}"),
                    question=row["question"],
                    answers=[str(a) for a in answers],
                    choices=choices,
                )
            )
        if problems:
            raise ConfigError(problems[:20])
        if not questions:
            raise ConfigError([f"eval task jsonl: {path} has no questions"])
        return sample(questions, self.options)


def _letter(answer: Any, choices: list[str]) -> str | None:
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return LETTERS[answer]
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return answer.upper()
    return None


class HubOptions(LimitOptions):
    path: str = Field(
        description="A local copy (save_to_disk directory, or .jsonl/.json/.parquet file in the hub's format) "
        "or the hub dataset id (needs network or a datasets cache)."
    )
    config_name: str | None = Field(None, description="Hub dataset configuration (e.g. rc.nocontext, all).")
    split: str = Field("validation", description="Split to evaluate on (held out from training by construction).")


def load_hub_rows(options: Any) -> list[dict[str, Any]]:
    import datasets

    path = Path(options.path).expanduser()
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[options.split]
    elif path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        data = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        data = datasets.load_dataset(options.path, options.config_name, split=options.split)
    return [dict(row) for row in data]


class NaturalQuestionsTask(Task):
    """Natural Questions open (`nq_open`: `question`, `answer` list)."""

    name = "nq_open"
    description = "Natural Questions, open-domain (HF nq_open format)."
    options_model = HubOptions

    def questions(self) -> list[Question]:
        rows = load_hub_rows(self.options)
        return sample(
            [
                Question(id=_qid(r["question"]), question=_sentence(r["question"]), answers=list(r["answer"]))
                for r in rows
            ],
            self.options,
        )


class TriviaQATask(Task):
    """TriviaQA without context (`trivia_qa`, `rc.nocontext`: `question`, `answer.aliases`)."""

    name = "triviaqa"
    description = "TriviaQA, no context (HF trivia_qa rc.nocontext format)."
    options_model = HubOptions

    def questions(self) -> list[Question]:
        questions = []
        for row in load_hub_rows(self.options):
            answer = row["answer"]
            aliases = [answer["value"], *answer.get("aliases", []), *answer.get("normalized_aliases", [])]
            questions.append(
                Question(
                    id=str(row.get("question_id") or _qid(row["question"])),
                    question=row["question"],
                    answers=list(dict.fromkeys(aliases)),
                )
            )
        return sample(questions, self.options)


class MMLUTask(Task):
    """MMLU (`cais/mmlu`: `question`, `choices`, `answer` index, `subject`), multiple choice."""

    name = "mmlu"
    description = "MMLU multiple choice (HF cais/mmlu format)."
    options_model = HubOptions

    def questions(self) -> list[Question]:
        questions = []
        for row in load_hub_rows(self.options):
            questions.append(
                Question(
                    id=_qid(row["question"], *row["choices"]),
                    question=row["question"],
                    answers=[LETTERS[int(row["answer"])]],
                    choices=list(row["choices"]),
                    kind=str(row.get("subject", "")),
                )
            )
        return sample(questions, self.options)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text[:1].upper() + text[1:] + "?"


@distill.hookimpl
def register_tasks(register: Callable[[type[Any]], None]) -> None:
    for task in (CountriesTask, JsonlTask, NaturalQuestionsTask, TriviaQATask, MMLUTask):
        register(task)

"""Built-in factual tasks: `countries` (offline, from the countryinfo package, corrected and
completed by prompts/tasks/countries.yaml), `jsonl` (bring your own questions), and loaders for
Natural Questions open, TriviaQA (no context) and MMLU in their Hugging Face formats (a local copy,
or the hub when online). How each is scored: distill/tasks.py."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.errors import ConfigError
from distill.tasks import LETTERS, AnswerSpace, Question, Task, normalize

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


def answer_in_question(question: Question) -> bool:
    """An accepted answer occurs in the question as whole words: echoing the question would name it."""
    padded = f" {normalize(question.question)} "
    return any(f" {normalize(answer)} " in padded for answer in question.answers if normalize(answer))


# countries -------------------------------------------------------------------------------------


class CountriesOptions(LimitOptions):
    kinds: list[Literal[COUNTRY_KINDS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(COUNTRY_KINDS), description=f"Question types: {', '.join(COUNTRY_KINDS)}."
    )


@dataclass
class Country:
    """One country or territory, merged from countryinfo's entries with the same ISO code and
    corrected by prompts/tasks/countries.yaml."""

    code: str
    name: str  # as asked
    source_name: str  # countryinfo's name (question ids)
    names: list[str] = field(default_factory=list)  # accepted names, the asked one first
    capital: str | None = None
    capitals: list[str] = field(default_factory=list)  # accepted capitals, the asked one first
    regions: list[str] = field(default_factory=list)
    currencies: list[str] = field(default_factory=list)
    calling_codes: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)  # names, never ISO 639 codes
    language_codes: list[str] = field(default_factory=list)  # ISO 639, corrected (the demo corpus names each once)


@dataclass
class CountryQuestions:
    questions: list[Question]  # every kind, in a stable order
    dropped: list[tuple[Question, str]]  # and why
    spaces: dict[str, AnswerSpace]  # answer space by kind


@cache
def country_data() -> dict[str, Any]:
    import yaml
    from distill_prompts import read_prompt

    return yaml.safe_load(read_prompt("tasks/countries.yaml"))


def _text(value: Any) -> str | None:
    """A string field of countryinfo's data (one entry has its capital as a one-item list)."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _strings(values: Any) -> list[str]:
    return [v.strip() for v in values or [] if isinstance(v, str) and v.strip()]


def _unique(values: list[str], *, lower: bool = True) -> list[str]:
    """First spelling of each normalised form, in order."""
    seen, kept = set(), []
    for value in values:
        key = normalize(value, lower=lower)
        if key and key not in seen:
            seen.add(key)
            kept.append(value)
    return kept


def _variants(text: str) -> list[str]:
    """The spelling, without apostrophes and dots ("Sana'a" → "Sanaa", "Washington D.C." →
    "Washington DC"), and with "Saint" ↔ "St." swapped."""
    spellings = [text]
    compact = re.sub(r"[.'’]", "", text)
    if compact != text:
        spellings.append(compact)
    for spelling in list(spellings):
        if re.search(r"\bSaint\b", spelling):
            spellings.append(re.sub(r"\bSaint\b", "St.", spelling))
        if re.search(r"\bSt\b\.?", spelling):
            spellings.append(re.sub(r"\bSt\b\.?", "Saint", spelling))
    return spellings


def _aliases(canonical: str, others: list[str]) -> list[str]:
    """The canonical spelling first, then the others and every variant, without common English
    words and without repeats."""
    words = set(country_data()["common_words"])
    spellings = [v for text in [canonical, *others] for v in _variants(text)]
    return _unique([canonical] + [s for s in spellings if normalize(s) not in words])


def _with_article(name: str) -> str:
    """ "the United Kingdom", "the Cook Islands"; "France"."""
    if re.match(r"(?:Republic|Democratic|United|Federated|Central African|Czech|Dominican|Isle of)\b", name) or (
        re.search(r"\bIslands$", name) or name in ("Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles")
    ):
        return f"the {name}"
    return name


def _language_names(code: str) -> list[str]:
    """English names of an ISO 639 language: curated ones (prompts/tasks/countries.yaml), else
    pycountry's without parentheticals ("Modern Greek (1453-)" → "Modern Greek"); [] if unknown."""
    import pycountry

    names = list(country_data()["language_names"].get(code) or [])
    if not names:
        language = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
        for name in [getattr(language, "name", None), getattr(language, "common_name", None)]:
            for part in (name or "").split(";"):  # older pycountry: "Pushto; Pashto"
                part = re.sub(r"\s*\(.*?\)", "", part).strip()
                if part and "," not in part:  # "Greek, Modern": an inverted name
                    names.append(part)
    return _aliases(names[0], names[1:]) if names else []


def _calling_codes(codes: list[str]) -> list[str]:
    """ "+33", "33"; "+1-876", "+1876", "1-876", "1876" (the North American area codes both ways)."""
    forms: list[str] = []
    for code in codes:
        code = code.lstrip("+").strip()
        compact = code.replace("-", "").replace(" ", "")
        if not compact.isdigit():
            continue
        forms.append(code)
        if compact != code:
            forms.append(compact)
        elif re.fullmatch(r"1\d{3}", compact):
            forms.append(f"1-{compact[1:]}")
    forms = list(dict.fromkeys(forms))
    return [f"+{form}" for form in forms] + forms


def countries() -> list[Country]:
    """countryinfo's countries, duplicates merged, corrections applied, excluded entries left out."""
    try:
        import pycountry  # noqa: F401 - language names
        from countryinfo import all_countries
    except ImportError as exc:
        raise ConfigError([f"eval task countries needs the countryinfo and pycountry packages ({exc})"]) from exc

    data = country_data()
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(all_countries(), key=lambda c: c.name()):
        info = entry.info()
        code = _text((info.get("ISO") or {}).get("alpha2"))
        if _text(info.get("name")) and code and info["name"] not in data["exclude"]:
            groups.setdefault(code, []).append(info)

    def richness(info: dict[str, Any]) -> tuple[int, ...]:
        fields = ("capital", "region", "currencies", "callingCodes", "languages", "altSpellings")
        return (
            sum(bool(info.get(f)) for f in fields),
            "numeric" in (info.get("ISO") or {}),
            isinstance(info.get("capital"), str),
        )

    result = []
    drop = {normalize(alias) for alias in data["drop_aliases"]}
    for code, entries in groups.items():
        entries.sort(key=richness, reverse=True)
        main = entries[0]
        iso = {_text(v) for v in (main.get("ISO") or {}).values()}
        name = data["display_names"].get(code, main["name"].strip())
        spellings = [e["name"] for e in entries] + [s for e in entries for s in _strings(e.get("altSpellings"))]
        spellings += data["country_aliases"].get(code, [])
        spellings = [s for s in spellings if s not in iso and normalize(s) not in drop]  # never bare ISO codes
        capital = data["capitals"][code] if code in data["capitals"] else _text(main.get("capital"))
        capitals = [_text(main.get("capital")) or "", *data["capital_aliases"].get(code, [])]
        language_codes = data["languages"].get(code) or list(
            dict.fromkeys(c for e in entries for c in _strings(e.get("languages")))
        )
        calling = data["calling_codes"].get(code) or [c for e in entries for c in _strings(e.get("callingCodes"))]
        region = _text(main.get("region"))
        result.append(
            Country(
                code=code,
                name=name,
                source_name=main["name"].strip(),
                names=_aliases(name, spellings),
                capital=capital,
                capitals=_aliases(capital, [c for c in capitals if c]) if capital else [],
                regions=_unique([region, *data["extra_regions"].get(code, [])]) if region else [],
                currencies=_unique(
                    [c for e in entries for c in _strings(e.get("currencies"))]
                    + data["extra_currencies"].get(code, []),
                    lower=False,
                ),
                calling_codes=_calling_codes(calling),
                languages=_unique([n for c in language_codes for n in _language_names(c)]),
                language_codes=[c for c in language_codes if _language_names(c)],
            )
        )
    return sorted(result, key=lambda c: c.source_name)


@cache
def sheet_names() -> dict[str, str]:
    """ISO code → the file name of the country's fact sheet in the demo retrieval corpus
    (``france.md``; the ISO code is added where two names would give one file). A countries
    question names its sheet(s) in ``Question.sources``, so retrieval recall knows the right passage."""
    every = countries()
    slugs = {c.code: re.sub(r"[^a-z0-9]+", "-", normalize(c.name)).strip("-") or c.code.lower() for c in every}
    taken = list(slugs.values())
    return {
        code: f"{slug}-{code.lower()}.md" if taken.count(slug) > 1 else f"{slug}.md" for code, slug in slugs.items()
    }


@cache
def country_questions() -> CountryQuestions:
    """Every countries question of every kind, the questions dropped and why, and each kind's
    answer space (all accepted answers of that kind, dropped questions included)."""
    data = country_data()
    region_aliases = {normalize(region): aliases for region, aliases in data["region_aliases"].items()}
    every_country = countries()
    by_capital: dict[str, list[Country]] = {}
    for country in every_country:
        if country.capital:
            by_capital.setdefault(normalize(country.capital), []).append(country)
    every: list[Question] = []
    for country in every_country:  # country by country, the kinds in COUNTRY_KINDS order
        the = _with_article(country.name)
        regions = [a for r in country.regions for a in [r, *region_aliases.get(normalize(r), [])]]
        sharing = by_capital.get(normalize(country.capital or ""), [])  # Kingston: Jamaica's and Norfolk Island's
        facts = {
            "capital": (f"What is the capital of {the}?", country.capitals),
            "country_of_capital": (
                f"{country.capital} is the capital of which country?",
                _unique([n for c in sharing for n in c.names]) if sharing[:1] == [country] else [],
            ),
            "region": (f"In which region of the world is {the}?", _aliases(regions[0], regions[1:]) if regions else []),
            "currency": (f"What is the ISO 4217 code of the currency of {the}?", country.currencies),
            "calling_code": (f"What is the international calling code of {the}?", country.calling_codes),
            "language": (f"What is an official language of {the}?", country.languages),
        }
        # The sheet that answers the question: the country's own; for "X is the capital of which country?"
        # every country that has X as its capital (each sheet names it).
        sheets = sheet_names()
        sources = {kind: [sheets[country.code]] for kind in facts}
        sources["country_of_capital"] = [sheets[c.code] for c in sharing] or [sheets[country.code]]
        for kind, (text, answers) in facts.items():
            if answers:
                every.append(
                    Question(
                        id=_qid(kind, country.source_name),
                        question=text,
                        answers=answers,
                        kind=kind,
                        sources=sources[kind],
                    )
                )
    spaces = {
        kind: AnswerSpace(
            (a for q in every if q.kind == kind for a in q.answers),
            exact_case=data["currency_words"] if kind == "currency" else (),
        )
        for kind in COUNTRY_KINDS
    }
    kept, dropped = [], []
    for question in every:
        if answer_in_question(question):
            dropped.append((question, "an accepted answer occurs in the question"))
        else:
            kept.append(question)
    return CountryQuestions(kept, dropped, spaces)


class CountriesTask(Task):
    """Questions about the world's countries from the countryinfo package's data (offline, real),
    corrected and completed by prompts/tasks/countries.yaml. Every question has a known answer
    space, so naming a wrong country, capital or language besides the right one is wrong."""

    name = "countries"
    description = "Capitals, currencies, regions, calling codes, official languages of ~250 countries (countryinfo)."
    options_model = CountriesOptions

    def questions(self) -> list[Question]:
        kinds = set(self.options.kinds)  # type: ignore[attr-defined]
        return sample([q.model_copy() for q in country_questions().questions if q.kind in kinds], self.options)

    def answer_space(self, question: Question) -> AnswerSpace | None:
        return country_questions().spaces.get(question.kind)


# jsonl -----------------------------------------------------------------------------------------


class FileOptions(LimitOptions):
    path: Path = Field(description="The questions file.")
    scoring: Literal["exact", "answer_space"] = Field(
        "exact",
        description="Headline for open questions: exact (the answer equals an accepted one) or answer_space "
        "(names an accepted answer and no accepted answer of another question of the same kind).",
    )


class JsonlTask(Task):
    """Your own questions: one JSON object per line with `question`, `answers` (list of accepted
    answers), optionally `kind` (a question type), `choices` (then `answers` holds the letter or
    the index of the right one) and `sources` (the corpus documents that answer it, for retrieval
    recall). With `scoring: answer_space`, the accepted answers of the file's
    open questions of the same kind are each other's wrong candidates."""

    name = "jsonl"
    description = "Your questions: JSONL with question, answers[, kind, choices]."
    options_model = FileOptions

    def __init__(self, options: BaseModel):
        super().__init__(options)
        self._all: list[Question] | None = None
        self._spaces: dict[str, AnswerSpace] = {}

    def questions(self) -> list[Question]:
        return sample(self._load(), self.options)

    def answer_space(self, question: Question) -> AnswerSpace | None:
        if self.options.scoring != "answer_space" or question.choices:  # type: ignore[attr-defined]
            return None
        self._load()
        return self._spaces.get(question.kind)

    def _load(self) -> list[Question]:
        if self._all is not None:
            return self._all
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
            sources = row.get("sources") or []  # the documents that answer it (retrieval recall); one name or a list
            question = Question(
                id=str(row.get("id") or f"row_{number}"),
                question=row["question"],
                answers=[str(a) for a in answers],
                choices=choices,
                kind=str(row.get("kind") or ""),
                sources=[str(s) for s in ([sources] if isinstance(sources, str) else sources)],
            )
            if self.options.scoring == "answer_space" and not choices and answer_in_question(question):  # type: ignore[attr-defined]
                problems.append(
                    f"{path} row {number}: an accepted answer occurs in the question, so repeating the question "
                    "would name it; reword or drop the question (scoring: answer_space)"
                )
                continue
            questions.append(question)
        if problems:
            raise ConfigError(problems[:20])
        if not questions:
            raise ConfigError([f"eval task jsonl: {path} has no questions"])
        kinds = {q.kind for q in questions if not q.choices}
        self._spaces = {
            kind: AnswerSpace(a for q in questions if q.kind == kind and not q.choices for a in q.answers)
            for kind in kinds
        }
        self._all = questions
        return questions


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


@distill.hookimpl
def register_commands(cli: Any) -> None:
    """`distill index demo-corpus`: the countries task's retrieval corpus (plugins/country_sheets.py)."""
    import click

    from distill.cli import handle_errors

    @cli.commands["index"].command("demo-corpus")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for the sheets.")
    @handle_errors
    def index_demo_corpus(out_dir: Path) -> None:
        """Write the countries task's demo corpus: one prose fact sheet per country (NAME.md), generated from
        the countryinfo data with the task's corrections, facts in a seeded order and phrasing."""
        from distill_plugins.country_sheets import write_country_sheets

        provenance = write_country_sheets(out_dir)
        click.echo(f"{out_dir}: {provenance['files']} country fact sheets (countryinfo {provenance['countryinfo']})")

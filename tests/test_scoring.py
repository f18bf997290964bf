"""Scoring against adversarial teachers, end to end: scripted teacher plugins registered through
distill's hook answer every question (task.prompt → teacher.generate → task.score), and a model
that hedges, echoes the question or lists candidates must not score; right answers in any
accepted spelling must. Also the answer-space matching rules and the countries question texts."""

from __future__ import annotations

import contextlib
import json
import random
import re
import types
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

import distill
from distill.config import TeacherConfig, load_config
from distill.evaluation import load_tasks
from distill.records import ChatRequest, ChatResult
from distill.tasks import AnswerSpace, Question, Task, answer_space_match, choice_letter, normalize
from distill.teacher import Teacher, load_teacher

# Scripted teachers -----------------------------------------------------------------------------


class Scripted(Teacher):
    """Answers each request from the question it finds in the user message; ``say`` decides how."""

    name = "scripted"
    questions: ClassVar[dict[str, Question]] = {}

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        results = []
        for request in requests:
            question = self.lookup(request.messages[-1].content)
            results.append(
                ChatResult(
                    request_id=request.id,
                    backend=self.name,
                    model=self.model,
                    texts=[self.say(question)],
                    finish_reasons=["stop"],
                )
            )
        return results

    def lookup(self, content: str) -> Question:
        found = self.questions.get(content.split("\n", 1)[0])
        return found or next(q for text, q in self.questions.items() if text in content)

    def say(self, question: Question) -> str:
        raise NotImplementedError


def strip_accents(text: str) -> str:
    """The accent-free spelling a plain keyboard gives ("Bogotá" → "Bogota"); independent of distill's folding."""
    return "".join(ch for ch in unicodedata.normalize("NFD", text) if not unicodedata.combining(ch))


def candidates_by_kind(questions: list[Question]) -> dict[str, list[Question]]:
    by_kind: dict[str, list[Question]] = {}
    for question in questions:
        by_kind.setdefault(question.kind, []).append(question)
    return by_kind


def wrong_members(question: Question, same_kind: list[Question]) -> list[str]:
    """Canonical answers of other questions of the same kind that share no accepted answer with
    this one (a currency code shared by two countries is right for both)."""
    accepted = _normalized(question)
    return list(dict.fromkeys(other.answers[0] for other in same_kind if not accepted & _normalized(other)))


_NORMALIZED: dict[tuple[str, ...], frozenset[str]] = {}


def _normalized(question: Question) -> frozenset[str]:
    key = tuple(question.answers)
    if key not in _NORMALIZED:
        _NORMALIZED[key] = frozenset(normalize(a) for a in question.answers)
    return _NORMALIZED[key]


def make_teachers(space_questions: list[Question]) -> list[type[Scripted]]:
    by_kind = candidates_by_kind(space_questions)

    def rng(question: Question, salt: str) -> random.Random:
        return random.Random(f"{salt}:{question.id}:{question.question}")

    class Hedger(Scripted):
        """Six candidates of the question's answer space, the right one among them."""

        name = "scripted-hedger"

        def say(self, question: Question) -> str:
            wrong = wrong_members(question, by_kind[question.kind])
            picks = [*rng(question, "hedge").sample(wrong, min(5, len(wrong))), question.answers[0]]
            rng(question, "order").shuffle(picks)
            return f"It could be {', '.join(picks[:-1])} or {picks[-1]}."

    class Echoer(Scripted):
        name = "scripted-echoer"

        def say(self, question: Question) -> str:
            return question.question

    class FlatEchoer(Scripted):
        """Repeats the question as a statement: without its question mark."""

        name = "scripted-flat-echoer"

        def say(self, question: Question) -> str:
            return question.question.rstrip("?")

    class SentenceMaker(Scripted):
        """ "It is X.": right on a seeded half of the questions, one wrong candidate on the rest."""

        name = "scripted-sentences"
        right: ClassVar[dict[str, bool]] = {}

        def say(self, question: Question) -> str:
            choice = rng(question, "sentence")
            wrong = wrong_members(question, by_kind[question.kind])
            right = choice.random() < 0.5 or not wrong
            self.right[question.id] = right
            return f"It is {question.answers[0] if right else choice.choice(wrong)}."

    class Plain(Scripted):
        name = "scripted-plain"

        def say(self, question: Question) -> str:
            return strip_accents(question.answers[0])

    class Exact(Scripted):
        name = "scripted-exact"

        def say(self, question: Question) -> str:
            return question.answers[0]

    class LetterHedger(Scripted):
        name = "scripted-letter-hedger"

        def say(self, question: Question) -> str:
            return " or ".join("ABCDEFGHIJ"[: len(question.choices or [])])

    return [Hedger, Echoer, FlatEchoer, SentenceMaker, Plain, Exact, LetterHedger]


@contextlib.contextmanager
def registered(teachers: list[type[Scripted]]) -> Iterator[None]:
    """The teachers registered like an installed plugin, through the ``register_teachers`` hook."""
    from distill.plugins import get_teachers, pm

    module = types.ModuleType("scripted_teachers_plugin")

    @distill.hookimpl
    def register_teachers(register: Callable[[type[Teacher]], None]) -> None:
        for teacher in teachers:
            register(teacher)

    module.register_teachers = register_teachers  # type: ignore[attr-defined]
    pm.register(module, name="scripted_teachers_plugin")
    get_teachers.cache_clear()
    try:
        yield
    finally:
        pm.unregister(name="scripted_teachers_plugin")
        get_teachers.cache_clear()


def run(task: Task, questions: list[Question], backend: str) -> list[dict[str, bool]]:
    """Every question asked through the teacher plugin ``backend`` and scored by the task."""
    config = TeacherConfig(backend=backend, model="scripted")
    teacher = load_teacher(config)
    type(teacher).questions = {q.question: q for q in questions}
    scores = []
    for start in range(0, len(questions), 256):
        batch = questions[start : start + 256]
        results = teacher.generate([config.request(task.prompt(q), temperature=0.0) for q in batch])
        scores += [task.score(q, result.text) for q, result in zip(batch, results)]
    return scores


def accuracy(scores: list[dict[str, bool]]) -> float:
    return sum(s["correct"] for s in scores) / len(scores)


# The countries task ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def countries() -> tuple[Task, list[Question]]:
    [(_, task)] = load_tasks(load_config(None, ["eval.tasks=[{type: countries}]"]))
    return task, task.questions()


def test_adversarial_teachers_on_countries(countries: tuple[Task, list[Question]]) -> None:
    task, questions = countries
    teachers = make_teachers(questions)
    by_name = {t.name: t for t in teachers}
    with registered(teachers):
        hedged = run(task, questions, "scripted-hedger")
        echoed = run(task, questions, "scripted-echoer")
        flat = run(task, questions, "scripted-flat-echoer")
        sentences = run(task, questions, "scripted-sentences")
        plain = run(task, questions, "scripted-plain")
    assert accuracy(hedged) <= 0.05, "listing candidates must not pay"
    assert accuracy(echoed) <= 0.05 and accuracy(flat) <= 0.05, "repeating the question must not pay"
    right = by_name["scripted-sentences"].right
    share = sum(right[q.id] for q in questions) / len(questions)
    assert 0.4 < share < 0.6
    assert accuracy(sentences) == share, "a one-candidate sentence is right exactly when the candidate is"
    assert [s["correct"] for s in sentences] == [right[q.id] for q in questions]
    assert accuracy(plain) == 1.0, [q.question for q, s in zip(questions, plain) if not s["correct"]][:5]
    kinds = {q.kind for q in questions}
    for kind in kinds:  # every kind, not just on average
        mine = [s for q, s in zip(questions, hedged) if q.kind == kind]
        assert accuracy(mine) <= 0.05, kind
    # the old headline ("an accepted answer occurs") paid all of these: still visible, as `contains`
    assert accuracy([{"correct": s["contains"]} for s in hedged]) > 0.9


def test_accent_free_and_short_names_are_right(countries: tuple[Task, list[Question]]) -> None:
    task, questions = countries
    by_text = {q.question: q for q in questions}

    def correct(question: str, prediction: str) -> bool:
        return task.score(by_text[question], prediction)["correct"]

    assert correct("What is the capital of Colombia?", "Bogota")
    assert correct("What is the capital of Brazil?", "Brasilia")
    assert correct("What is the capital of Paraguay?", "Asuncion")
    assert correct("What is the capital of Yemen?", "Sanaa")
    assert correct("What is the capital of the United States?", "Washington, D.C.")
    assert correct("In which region of the world is Canada?", "North America")
    assert correct("In which region of the world is Brazil?", "South America")
    assert correct("In which region of the world is Jamaica?", "the Caribbean")
    assert correct("Washington D.C. is the capital of which country?", "USA")
    assert correct("London is the capital of which country?", "The UK")
    assert correct("Abu Dhabi is the capital of which country?", "UAE")
    assert correct("Kinshasa is the capital of which country?", "DRC")
    assert not correct("Washington D.C. is the capital of which country?", "US")  # "us" is a word
    assert correct("What is the capital of France?", "The capital of France is Paris.")
    assert correct("Paris is the capital of which country?", "Paris is the capital of France.")
    assert correct("What is an official language of Switzerland?", "German, French and Italian")
    assert correct("What is the international calling code of Jamaica?", "+1 876")
    assert correct("What is the ISO 4217 code of the currency of France?", "The euro, EUR, like all of the eurozone.")


def test_hedges_and_turned_around_questions_are_wrong(countries: tuple[Task, list[Question]]) -> None:
    task, questions = countries
    by_text = {q.question: q for q in questions}

    def correct(question: str, prediction: str) -> bool:
        return task.score(by_text[question], prediction)["correct"]

    assert not correct("In which region of the world is France?", "Europe, Asia, Africa, Americas, Oceania")
    assert not correct("Berlin is the capital of which country?", "It is either France or Germany or Italy")
    assert not correct("Kabul is the capital of which country?", "Afghanistan is the capital of which country?")
    assert not correct("What is the capital of France?", "Is it Paris?")
    assert not correct("What is an official language of Italy?", "It is Italian or French.")
    assert not correct("What is the capital of Japan?", "Tokyo or Beijing")
    assert not correct("Port Moresby is the capital of which country?", "Guinea")


def test_language_questions_ask_for_names_not_codes(countries: tuple[Task, list[Question]]) -> None:
    task, questions = countries
    languages = [q for q in questions if q.kind == "language"]
    assert len(languages) > 200
    by_text = {q.question: q for q in languages}
    assert by_text["What is an official language of France?"].answers == ["French"]
    assert {"German", "French", "Italian"} <= set(by_text["What is an official language of Switzerland?"].answers)
    assert "Greek" in by_text["What is an official language of Greece?"].answers
    assert by_text["What is an official language of Serbia?"].answers == ["Serbian"]  # countryinfo has "rs"
    for question in languages:
        assert "ISO" not in question.question
        for answer in question.answers:  # never a bare ISO 639 code, never a parenthetical
            assert len(answer) > 3 or answer in ("Lao", "Ewe"), (question.question, answer)
            assert "(" not in answer and "," not in answer and ";" not in answer
    from countryinfo import all_countries
    from distill_plugins.tasks import _language_names, country_data

    excluded = country_data()["exclude"]
    codes = {c for e in all_countries() if e.info()["name"] not in excluded for c in e.info().get("languages") or []}
    assert {code for code in codes if not _language_names(code)} == {"rs"}  # not a code; Serbia's is "sr"
    italy = by_text["What is an official language of Italy?"]
    assert not task.score(italy, "It is Italy")["correct"]
    assert not task.score(by_text["What is an official language of Iceland?"], "It is hard to say")["correct"]
    assert task.score(italy, "It is Italian")["correct"]


def test_countries_question_texts(countries: tuple[Task, list[Question]]) -> None:
    from distill_plugins.tasks import country_data, country_questions

    _, questions = countries
    texts = [q.question for q in questions]
    assert len(texts) == len(set(texts)), "one question per entity and fact"
    assert not [t for t in texts if "[" in t or "]" in t], "no list reprs in questions"
    for question in questions:
        padded = f" {normalize(question.question)} "
        inside = [a for a in question.answers if f" {normalize(a)} " in padded]
        assert not inside, (question.question, inside)
    capitals = [q for q in questions if q.kind == "capital"]
    assert (
        "What is the capital of Luxembourg?" not in texts
        and "Mexico City is the capital of which country?" not in texts
    )
    assert "What is the capital of Vatican City?" not in texts
    # one entity per ISO code: Burma / Myanmar, the two Vatican and Palestine entries are one each
    assert sum("Naypyidaw" in q.question for q in questions) == 1
    assert sum(q.question.endswith("capital of Myanmar?") for q in capitals) == 1
    assert not [q for q in capitals if "Burma" in q.question or "Holy See" in q.question]
    assert sum("Palestine" in q.question for q in capitals) == 1
    assert not [t for t in texts if "Scotland" in t or "Wales" in t or "Serbia and Montenegro" in t]
    kingston = next(q for q in questions if q.question == "Kingston is the capital of which country?")
    assert {"Jamaica", "Norfolk Island"} <= set(kingston.answers)  # two capitals named Kingston
    # no alias is a common English word, and never a bare ISO code
    words = set(country_data()["common_words"])
    for question in questions:
        if question.kind != "currency":  # ISO 4217 codes that are words count only in capitals: "ALL", not "all"
            assert not [a for a in question.answers[1:] if normalize(a) in words], question.question
    assert "FR" not in next(q for q in questions if q.question == "Paris is the capital of which country?").answers
    dropped = country_questions().dropped
    assert dropped and all(why == "an accepted answer occurs in the question" for _, why in dropped)


def test_currency_codes_that_are_words_count_only_in_capitals(countries: tuple[Task, list[Question]]) -> None:
    task, questions = countries
    by_text = {q.question: q for q in questions}
    albania = by_text["What is the ISO 4217 code of the currency of Albania?"]
    assert albania.answers == ["ALL"]
    assert task.score(albania, "ALL (the lek)")["correct"]
    assert not task.score(albania, "It is the lek, used all over Albania")["correct"]
    france = by_text["What is the ISO 4217 code of the currency of France?"]
    assert task.score(france, "EUR, as in all of the eurozone")["correct"]  # "all" is not Albania's ALL
    assert task.score(france, "eur")["correct"]
    assert not task.score(france, "EUR or ALL")["correct"]
    assert not task.score(france, "EUR or usd")["correct"]  # a lower-case hedge is still a hedge


# Member matching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answers", "correct"),
    [
        ("Papua New Guinea", ["Papua New Guinea"], True),  # does not also name Guinea
        ("Equatorial Guinea", ["Equatorial Guinea"], True),
        ("South Sudan", ["South Sudan"], True),  # not also Sudan
        ("Dominican Republic", ["Dominican Republic"], True),  # not also Dominica
        ("Nigeria", ["Nigeria"], True),  # whole words: not Niger
        ("Guinea", ["Papua New Guinea"], False),
        ("Sudan", ["South Sudan"], False),
        ("Papua New Guinea or Guinea", ["Papua New Guinea"], False),
        ("Niger, not Nigeria", ["Niger"], False),  # naming a wrong one is naming it
        ("Dominica", ["Dominican Republic"], False),
        ("the Dominican Republic", ["Dominican Republic"], True),
        ("Definitely Guinea.", ["Guinea"], True),
        ("Guinea?", ["Guinea"], False),  # a question back
        ("", ["Guinea"], False),
        ("I do not know", ["Guinea"], False),
    ],
)
def test_member_matching_is_longest_first(prediction: str, answers: list[str], correct: bool) -> None:
    members = "Guinea, Papua New Guinea, Equatorial Guinea, Guinea-Bissau, Sudan, South Sudan, Dominica"
    space = AnswerSpace([*members.split(", "), "Dominican Republic", "Niger", "Nigeria"])
    assert answer_space_match(prediction, "Which country is this?", answers, space) is correct


def test_spans_copied_from_the_question_are_removed() -> None:
    space = AnswerSpace(["Guinea", "Papua New Guinea", "Port Moresby", "Conakry"])
    question = "Which country has Port Moresby as its capital?"
    # a run of ≥ 3 tokens copied from the question names nothing; a shorter echo still does
    assert answer_space_match(
        "Papua New Guinea has Port Moresby as its capital.", question, ["Papua New Guinea"], space
    )
    assert not answer_space_match("It has Port Moresby as its capital", question, ["Papua New Guinea"], space)
    assert not answer_space_match("Port Moresby", question, ["Papua New Guinea"], space)
    assert not answer_space_match("Which country has Port Moresby as its capital", question, ["Guinea"], space)


# Open tasks: exact match -----------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


OPEN_ROWS = [
    ("who wrote hamlet", ["William Shakespeare", "Shakespeare"]),
    ("what is the capital of australia", ["Canberra"]),
    ("which planet is known as the red planet", ["Mars"]),
    ("who painted the mona lisa", ["Leonardo da Vinci", "Leonardo"]),
    ("what is the largest ocean on earth", ["Pacific Ocean", "Pacific"]),
    ("in which year did the berlin wall fall", ["1989"]),
    ("what is the chemical symbol for gold", ["Au"]),
    ("who discovered penicillin", ["Alexander Fleming", "Fleming"]),
]


def test_adversarial_teachers_on_open_tasks(tmp_path: Path) -> None:
    nq = write_jsonl(tmp_path / "nq.jsonl", [{"question": q, "answer": a} for q, a in OPEN_ROWS])
    trivia = write_jsonl(
        tmp_path / "tqa.jsonl",
        [
            {"question": q[0].upper() + q[1:] + "?", "question_id": f"tc_{i}", "answer": {"value": a[0], "aliases": a}}
            for i, (q, a) in enumerate(OPEN_ROWS)
        ],
    )
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"question": q, "answers": a} for q, a in OPEN_ROWS])
    specs = [
        {"type": "nq_open", "options": {"path": str(nq)}},
        {"type": "triviaqa", "options": {"path": str(trivia)}},
        {"type": "jsonl", "options": {"path": str(mine)}},
    ]
    tasks = load_tasks(load_config(None, [f"eval.tasks={json.dumps(specs)}"]))
    every = [q for _, task in tasks for q in task.questions()]
    teachers = make_teachers(every)
    with registered(teachers):
        for name, task in tasks:
            questions = task.questions()
            assert len(questions) == len(OPEN_ROWS)
            assert accuracy(run(task, questions, "scripted-hedger")) == 0, name
            assert accuracy(run(task, questions, "scripted-echoer")) == 0, name
            assert accuracy(run(task, questions, "scripted-flat-echoer")) == 0, name
            assert accuracy(run(task, questions, "scripted-exact")) == 1, name
            hedged = run(task, questions, "scripted-hedger")
            assert all(s["contains"] and not s["exact"] for s in hedged)  # visible, never the headline


def test_jsonl_answer_space_scoring(tmp_path: Path) -> None:
    rows = [
        {"question": "Which planet is fourth from the Sun?", "answers": ["Mars"], "kind": "planet"},
        {"question": "Which planet is the largest?", "answers": ["Jupiter"], "kind": "planet"},
        {"question": "Which planet has the most famous rings?", "answers": ["Saturn"], "kind": "planet"},
        {"question": "Who wrote Hamlet?", "answers": ["Shakespeare", "William Shakespeare"], "kind": "author"},
        {"question": "Who wrote Faust?", "answers": ["Goethe"], "kind": "author"},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    spec = [{"type": "jsonl", "options": {"path": str(path), "scoring": "answer_space"}}]
    [(_, task)] = load_tasks(load_config(None, [f"eval.tasks={json.dumps(spec)}"]))
    mars, jupiter, _, hamlet, _ = task.questions()
    assert task.score(mars, "It is Mars, the red planet.")["correct"]
    assert not task.score(mars, "Mars or Jupiter")["correct"]
    assert task.score(mars, "Mars, not Goethe")["correct"]  # another kind's answers are not candidates
    assert task.score(hamlet, "William Shakespeare wrote it.")["correct"]
    assert not task.score(jupiter, "Which planet is the largest?")["correct"]
    default = [{"type": "jsonl", "options": {"path": str(path)}}]
    [(_, exact_task)] = load_tasks(load_config(None, [f"eval.tasks={json.dumps(default)}"]))
    assert not exact_task.score(exact_task.questions()[0], "It is Mars, the red planet.")["correct"]
    assert exact_task.score(exact_task.questions()[0], "Mars.")["correct"]
    # answer_space refuses a question that contains its own answer: an echo would score
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [{"question": "Is Mars the red planet?", "answers": ["Mars"]}])
    spec = [{"type": "jsonl", "options": {"path": str(leaky), "scoring": "answer_space"}}]
    [(_, leaky_task)] = load_tasks(load_config(None, [f"eval.tasks={json.dumps(spec)}"]))
    with pytest.raises(distill.errors.ConfigError, match="row 1: an accepted answer occurs in the question"):
        leaky_task.questions()


# Multiple choice -------------------------------------------------------------------------------


def test_letter_hedger_scores_nothing_on_mmlu(tmp_path: Path) -> None:
    rows = [
        {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"},
        {
            "question": "Capital of France?",
            "choices": ["Paris", "Lyon", "Nice", "Lille"],
            "answer": 0,
            "subject": "geo",
        },
        {"question": "Largest planet?", "choices": ["Mars", "Venus", "Jupiter", "Earth"], "answer": 2, "subject": "x"},
        {"question": "H2O is?", "choices": ["salt", "sand", "air", "water"], "answer": 3, "subject": "chem"},
    ]
    path = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    [(_, task)] = load_tasks(load_config(None, [f'eval.tasks=[{{type: mmlu, options: {{path: "{path}"}}}}]']))
    questions = task.questions()
    with registered(make_teachers(questions)):
        assert accuracy(run(task, questions, "scripted-letter-hedger")) == 0
        assert accuracy(run(task, questions, "scripted-exact")) == 1  # the letter


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("A or B", None),
        ("A, B, C, D", None),
        ("(B) or (C)", None),
        ("B and C", None),
        ("B/C", None),
        ("Answer: B or C", None),
        ("B. A cat", "B"),  # "A" is an article
        ("B. A is not it", "B"),
        ("The answer is B", "B"),
        ("**B**", "B"),
        ("C. blue", "C"),  # the option's text after its letter
        ("a cat", None),
    ],
)
def test_multiple_choice_names_one_letter(prediction: str, letter: str | None) -> None:
    assert choice_letter(prediction, ["red", "green", "blue", "yellow"]) == letter


def test_option_text_with_letters_in_it() -> None:
    assert choice_letter("A. Hepatitis B", ["Hepatitis B", "Hepatitis C", "Measles", "Mumps"]) == "A"
    assert choice_letter("C. C++", ["Python", "Java", "C++", "Rust"]) == "C"
    assert choice_letter("A cat", ["A dog", "A bird", "A cat", "A fish"]) == "C"


def test_normalisation_folds_accents_on_both_sides() -> None:
    assert normalize("Bogotá") == normalize("Bogota") == "bogota"
    assert normalize("Tórshavn, Føroyar") == "torshavn foroyar"
    assert normalize("Côte d’Ivoire") == "cote d ivoire"
    assert re.fullmatch(r"[a-z ]+", normalize("São Tomé and Príncipe"))

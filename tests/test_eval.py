"""Evaluation: scoring on hand-written cases, the tasks (countries from countryinfo, JSONL, and
the NQ-open / TriviaQA / MMLU loaders on small local files in the hubs' formats), gap-closed
arithmetic, and the report rendered from evaluation outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.evaluation import load_tasks
from distill.stats import bootstrap_interval, gap_closed, gap_closed_interval
from distill.tasks import Question, choice_letter, contains_match, exact_match, first_line, normalize


@pytest.mark.parametrize(
    ("text", "normalized"),
    [("The Eiffel Tower.", "eiffel tower"), ("  PARIS!! ", "paris"), ("a cat, an owl", "cat owl"), ("+33", "33")],
)
def test_normalize_is_squad_style(text: str, normalized: str) -> None:
    assert normalize(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "answers", "exact", "contains"),
    [
        ("Paris", ["Paris"], True, True),
        ("paris.", ["Paris"], True, True),
        ("The capital of France is Paris.", ["Paris"], False, True),
        ("Parisian", ["Paris"], False, False),  # whole words only
        ("USA", ["United States", "USA", "United States of America"], True, True),
        ("It is the United States of America", ["United States"], False, True),
        ("", ["Paris"], False, False),
        ("Lyon", ["Paris"], False, False),
    ],
)
def test_open_question_matching(prediction: str, answers: list[str], exact: bool, contains: bool) -> None:
    assert exact_match(prediction, answers) is exact
    assert contains_match(prediction, answers) is contains


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [("B", "B"), ("(C) blue", "C"), ("b.", "B"), ("Answer: D", "D"), ("blue", "C"), ("Both", None), ("E", None)],
)
def test_multiple_choice_letter(prediction: str, letter: str | None) -> None:
    assert choice_letter(prediction, ["red", "green", "blue", "yellow"]) == letter


def test_the_prediction_is_the_first_line() -> None:
    assert first_line("\n  Paris\nBecause it is the capital.") == "Paris"
    from distill_plugins.tasks import CountriesOptions, CountriesTask

    task = CountriesTask(CountriesOptions())
    question = Question(id="q", question="What is the capital of France?", answers=["Paris"], kind="capital")
    assert task.score(question, "Paris\nLyon is not.") == {"exact": True, "contains": True, "correct": True}
    assert task.score(question, "Lyon\nParis is the capital.") == {"exact": False, "contains": False, "correct": False}


def test_gap_closed_arithmetic() -> None:
    assert gap_closed(0.2, 0.3, 0.6) == pytest.approx(0.25)
    assert gap_closed(0.2, 0.2, 0.6) == 0.0
    assert gap_closed(0.2, 0.1, 0.6) == pytest.approx(-0.25)  # the student got worse
    assert gap_closed(0.2, 0.9, 0.6) == pytest.approx(1.75)  # overshoot is reported, not clipped
    assert gap_closed(0.5, 0.6, 0.5) is None  # teacher not better: no gap to close
    assert gap_closed(0.5, 0.6, 0.4) is None


def test_gap_interval_with_zero_variance_and_without_a_gap() -> None:
    base, teacher = [0.0] * 10, [1.0] * 10
    tuned = [1.0] * 3 + [0.0] * 7
    low, high, undefined = gap_closed_interval(base, tuned, teacher, resamples=500)
    assert undefined == 0 and 0.0 <= low <= 0.3 <= high <= 0.7
    low, high, _ = gap_closed_interval(base, base, teacher, resamples=200)
    assert (low, high) == (0.0, 0.0)  # zero variance: a point interval
    assert gap_closed_interval(teacher, tuned, teacher, resamples=200)[:2] == (None, None)  # no gap
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0)


def test_countries_task_is_real_offline_data_with_spelling_aliases() -> None:
    from distill_plugins.tasks import CountriesOptions, CountriesTask

    questions = CountriesTask(CountriesOptions()).questions()
    assert len(questions) > 1000
    by_text = {q.question: q for q in questions}
    assert by_text["What is the capital of France?"].answers == ["Paris"]
    assert "French Republic" in by_text["Paris is the capital of which country?"].answers
    assert "FR" not in by_text["Paris is the capital of which country?"].answers  # no bare ISO codes
    assert by_text["What is the international calling code of France?"].answers == ["+33", "33"]
    assert by_text["What is the ISO 4217 code of the currency of France?"].answers == ["EUR"]
    sampled = CountriesTask(CountriesOptions(limit=50, seed=3)).questions()
    assert len(sampled) == 50 and sampled == CountriesTask(CountriesOptions(limit=50, seed=3)).questions()
    assert len({q.id for q in questions}) == len(questions)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hub_format_loaders_on_local_files(tmp_path: Path) -> None:
    nq = write_jsonl(
        tmp_path / "nq.jsonl", [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]}]
    )
    trivia = write_jsonl(
        tmp_path / "tqa.jsonl",
        [
            {
                "question": "Which planet is known as the Red Planet?",
                "question_id": "tc_1",
                "answer": {
                    "value": "Mars",
                    "aliases": ["Mars", "Planet Mars"],
                    "normalized_aliases": ["mars", "planet mars"],
                },
            }
        ],
    )
    mmlu = write_jsonl(
        tmp_path / "mmlu.jsonl",
        [{"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "elementary_mathematics"}],
    )
    custom = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": "Largest ocean?", "answers": ["Pacific", "Pacific Ocean"]},
            {"question": "Pick blue", "choices": ["red", "blue"], "answers": [1]},
        ],
    )
    tasks = [
        {"type": "nq_open", "options": {"path": str(nq)}},
        {"type": "triviaqa", "options": {"path": str(trivia)}},
        {"type": "mmlu", "options": {"path": str(mmlu)}},
        {"type": "jsonl", "options": {"path": str(custom)}},
    ]
    loaded = dict(load_tasks(load_config(None, [f"eval.tasks={json.dumps(tasks)}"])))
    [nq_q] = loaded["nq_open"].questions()
    assert nq_q.question == "Who wrote hamlet?" and loaded["nq_open"].score(nq_q, "Shakespeare")["correct"]
    [tqa_q] = loaded["triviaqa"].questions()
    assert tqa_q.id == "tc_1" and loaded["triviaqa"].score(tqa_q, "planet Mars.")["exact"]
    [mmlu_q] = loaded["mmlu"].questions()
    assert mmlu_q.answers == ["B"] and mmlu_q.kind == "elementary_mathematics"
    assert loaded["mmlu"].score(mmlu_q, "B") == {"correct": True} and loaded["mmlu"].score(mmlu_q, "4") == {
        "correct": True
    }
    assert "A. 3\nB. 4" in loaded["mmlu"].prompt(mmlu_q)
    open_q, choice_q = loaded["jsonl"].questions()
    assert open_q.answers == ["Pacific", "Pacific Ocean"] and choice_q.answers == ["B"]


def test_bad_task_configs_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval.tasks.0.type: unknown task 'trivia'; known: countries, jsonl, mmlu"):
        load_tasks(load_config(None, ["eval.tasks=[{type: trivia}]"]))
    with pytest.raises(ConfigError, match=r"eval.tasks.0.options.kinds.0"):
        load_tasks(load_config(None, ["eval.tasks=[{type: countries, options: {kinds: [capitals]}}]"]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answers": []}])
    [(_, task)] = load_tasks(load_config(None, [f'eval.tasks=[{{type: jsonl, options: {{path: "{bad}"}}}}]']))
    with pytest.raises(ConfigError, match="row 1: needs 'question'"):
        task.questions()


def test_the_readme_task_plugin_works_through_the_hook() -> None:
    """The `register_tasks` example in the README, registered at run time like an installed plugin."""
    import re
    import types

    from distill.plugins import get_tasks, pm
    from tests.conftest import REPO

    section = (REPO / "README.md").read_text().split("### `register_tasks(register)`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_task_plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    pm.register(module, name="readme_task_plugin")
    get_tasks.cache_clear()
    try:
        [(name, task)] = load_tasks(load_config(None, ["eval.tasks=[{type: elements, options: {limit: 2}}]"]))
        questions = task.questions()
        assert name == "elements" and [q.answers for q in questions] == [["H"], ["He"]]
        assert task.score(questions[1], "He\n(helium)") == {"exact": True, "contains": True, "correct": True}
        assert not task.score(questions[1], "H or He")["correct"]  # open questions: exact match is the headline
    finally:
        pm.unregister(name="readme_task_plugin")
        get_tasks.cache_clear()

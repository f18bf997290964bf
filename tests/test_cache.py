"""The request cache: a plugin's options are part of the cache key unless the plugin marks them
speed-only (so a teacher written from the README alone can't get stale answers back),
`--no-cache` asks again, and `distill cache` shows and clears entries."""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.answers import AnswerSource, RequestCache
from distill.cli import cli
from distill.config import TeacherConfig
from distill.records import ChatRequest, ChatResult, Message
from distill.teacher import Teacher

SENT: list[str] = []


class QuizOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    difficulty: str = Field("easy", description="Changes every answer.")
    concurrency: int = Field(1, description="Changes only speed.")


class QuizTeacher(Teacher):
    """A plugin teacher as the README describes it: no cache_identity of its own."""

    name = "quiz"
    options_model = QuizOptions
    speed_only_options = frozenset({"concurrency"})

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        SENT.extend(r.id for r in requests)
        answer = f"{self.options.difficulty} answer"  # type: ignore[attr-defined]
        return [
            ChatResult(request_id=r.id, backend=self.name, model=self.model, texts=[answer], finish_reasons=["stop"])
            for r in requests
        ]


@pytest.fixture()
def quiz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    from distill.plugins import get_teachers, load_plugins

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    module = types.ModuleType("quiz_plugin")

    @distill.hookimpl
    def register_teachers(register: Any) -> None:
        register(QuizTeacher)

    module.register_teachers = register_teachers  # type: ignore[attr-defined]
    load_plugins().register(module, name="quiz_plugin")
    get_teachers.cache_clear()
    SENT.clear()
    yield
    load_plugins().unregister(name="quiz_plugin")
    get_teachers.cache_clear()


def ask(options: dict[str, Any]) -> tuple[str, int]:
    """One question through a fresh run's answer source (no run log): the answer, and how many
    requests reached the teacher."""
    config = TeacherConfig(backend="quiz", model="quiz-1", options=options)
    source = AnswerSource.for_teacher(config, None, log=None, cache=True)
    try:
        [result] = source.generate([ChatRequest(messages=[Message(role="user", content="2 + 2?")])])
    finally:
        source.close()
    return result.text, source.counts.sent


@pytest.mark.usefixtures("quiz")
def test_an_option_that_changes_answers_is_part_of_the_cache_key() -> None:
    assert ask({"difficulty": "easy"}) == ("easy answer", 1)
    assert ask({"difficulty": "easy"}) == ("easy answer", 0)  # same options: from the cache
    assert ask({"difficulty": "hard"}) == ("hard answer", 1)  # another answer-changing option: asked again
    assert ask({"difficulty": "easy", "concurrency": 8}) == ("easy answer", 0)  # speed-only: still cached


@pytest.mark.usefixtures("scripted")
def test_no_cache_asks_again_and_distill_cache_shows_and_clears(scripted: dict[str, Any], tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "2 + 2?", "answers": ["4"]}) + "\n")
    models = [
        {"name": n, "role": n, "teacher": {"backend": "scripted", "model": n, "options": {"script": "constant"}}}
        for n in ("base", "teacher")
    ]
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps({"eval": {"models": models, "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}]}})
    )
    runner = CliRunner()

    def evaluate(run: str, *flags: str) -> int:
        from tests.scripted import SENT as scripted_sent

        before = len(scripted_sent)
        args = ["eval", "-c", str(config), "--run-dir", str(tmp_path / run), "--no-progress", "--json", *flags]
        result = runner.invoke(cli, [*args, "--set", "eval.style_rubric=null"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return len(scripted_sent) - before

    assert evaluate("one") == 2  # base and teacher each asked once
    assert evaluate("two") == 0  # a new run dir, same requests: all from the cache
    assert evaluate("three", "--no-cache") == 2

    info = runner.invoke(cli, ["cache", "info", "--json"])
    entries = json.loads(info.output)["entries"]
    assert {(e["backend"], e["model"], e["answers"]) for e in entries} == {
        ("scripted", "base", 1),
        ("scripted", "teacher", 1),
    }
    cleared = runner.invoke(cli, ["cache", "clear", "--model", "base", "--yes"])
    assert cleared.exit_code == 0 and "deleted 1 cached answers (model base)" in cleared.output
    store = RequestCache()
    try:
        assert [(e["model"], e["answers"]) for e in store.entries()] == [("teacher", 1)]
    finally:
        store.close()
    assert evaluate("four") == 1  # only base's answer had to be asked again


@pytest.mark.usefixtures("scripted")
def test_a_rerun_with_another_teacher_never_replays_the_old_answers(scripted: dict[str, Any], tmp_path: Path) -> None:
    """The run's answer log is stamped with the teacher's identity: the same eval rerun in the same
    run dir after the model changed (here: an option that changes answers; in real life an adapter
    retrained in place) asks again instead of scoring the old model's answers."""
    from distill.config import load_config
    from distill.evaluation import run_eval

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q", "question": "2 + 2?", "answers": ["4"]}) + "\n")
    scripted["four"] = lambda request, k: "4"
    scripted["five"] = lambda request, k: "5"

    def evaluate(student_script: str) -> float:
        models = [
            {
                "name": "base",
                "role": "base",
                "teacher": {"backend": "scripted", "model": "s", "options": {"script": student_script}},
            },
            {
                "name": "teacher",
                "role": "teacher",
                "teacher": {"backend": "scripted", "model": "t", "options": {"script": "four"}},
            },
        ]
        settings = {
            "run_dir": str(tmp_path / "run"),
            "eval": {
                "models": models,
                "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}],
                "style_rubric": None,
            },
        }
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(settings))
        return run_eval(load_config(path))["scores"]["jsonl"]["base"]["accuracy"]

    assert evaluate("five") == 0.0
    assert evaluate("four") == 1.0  # not the first model's "5" replayed from answers-base.jsonl
    log = [json.loads(line) for line in (tmp_path / "run" / "eval" / "answers-base.jsonl").read_text().splitlines()]
    assert [row["result"]["texts"] for row in log] == [["5"], ["4"]] and len({row["teacher"] for row in log}) == 2


def test_minus_infinity_logprobs_survive_the_cache_and_old_unreadable_entries_are_asked_again(tmp_path: Path) -> None:
    """Constrained decoding gives ruled-out tokens a logprob of -inf (vLLM's top alternatives of a
    rubric verdict). Such an answer must read back from the cache; an entry an older distill wrote
    with null in its place is a miss, not a crash of every later run."""
    from distill.records import TokenLogprob

    store = RequestCache(tmp_path / "requests.sqlite")
    logprob = TokenLogprob(token="A", logprob=0.0, top={"A": 0.0, "B": float("-inf")}, id=1, top_ids={1: 0.0, 2: -1e9})
    result = ChatResult(request_id="r", backend="vllm", model="m", texts=["A"], logprobs=[[logprob]])
    store.put_many([("k", result)])
    again = store.get("k")
    assert again is not None and again.logprobs is not None
    assert again.logprobs[0][0].top == {"A": 0.0, "B": float("-inf")}
    old = result.model_dump_json().replace("-Infinity", "null")  # what pydantic's default wrote before
    store.db.execute("UPDATE cached_answers SET result = ? WHERE key = 'k'", (old,))
    assert store.get("k") is None

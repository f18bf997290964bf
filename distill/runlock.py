"""One writer per directory: every stage that writes a run directory holds an exclusive OS lock
on it, so two `distill` processes never append to the same answer log.

The lock is an ``flock`` on ``DIR/.distill.lock``, taken before anything in DIR is written or any
request is sent. The kernel drops it when the last process holding the open file exits, however it
exits (SIGKILL included): a lock is never stale. (``flock``, not ``lockf``: a POSIX record lock is
silently dropped when *any* descriptor of the file is closed in the process, e.g. by code that
reads every file of the run dir. A forked child shares an ``flock`` until it exits; the vllm
teacher's engine processes die with distill, see ``plugins/vllm_teacher.py``.) The holder writes
its pid, command line and start time into the file, so a second process fails at once with one
line naming it; the holder removes the file, and the directories it created for it if they stayed
empty, when it lets go.

Locks are re-entrant within a process: `distill run` holds RUN_DIR and its stages' directories
for the whole run, and each stage taking its own directory again is a no-op. Under torchrun /
accelerate only rank 0 takes the training output directory (see ``distill.train``).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from distill.errors import DistillError

log = logging.getLogger(__name__)

LOCK_FILE = ".distill.lock"


@dataclass
class _Held:
    fd: int  # -1: a file system without locks
    depth: int = 1
    created: list[Path] = field(default_factory=list)  # directories made for the lock, deepest first


_held: dict[Path, _Held] = {}  # this process's locks, by real path
_guard = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


class RunDirBusy(DistillError):
    """Another process is writing the directory."""


@contextmanager
def locked(*directories: Path | None) -> Iterator[None]:
    """Hold the write lock of each directory (created if missing; None is skipped) for the block.
    Raises ``RunDirBusy`` naming the holder when another process has one."""
    taken: list[Path] = []
    try:
        for directory in directories:
            if directory is not None:
                taken.append(_acquire(Path(directory)))
        yield
    finally:
        for directory in reversed(taken):
            _release(directory)


def locks(where: Callable[..., Path | Iterable[Path | None] | None]) -> Callable[[F], F]:
    """Decorate a stage: it runs holding the lock of the directories ``where(**arguments)``
    returns (the stage's own arguments, by name; None: no lock)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            found = where(**bound.arguments)
            directories = [found] if found is None or isinstance(found, (str, os.PathLike)) else list(found)
            with locked(*directories):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def empty_directory(directory: Path) -> None:
    """Delete everything in ``directory`` but its lock file (``--overwrite`` under a held lock:
    removing the lock file would let a second writer in) and its cost ledger (money spent stays
    on the books when the work is redone)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name in (LOCK_FILE, "ledger.jsonl"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _key(directory: Path) -> Path:
    return Path(os.path.realpath(directory))


def _acquire(directory: Path) -> Path:
    key = _key(directory)
    with _guard:
        if key in _held:
            _held[key].depth += 1
            return key
        created = [parent for parent in (key, *key.parents) if not parent.exists()]
        path = key / LOCK_FILE
        for attempt in range(100):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # a holder letting go removed the empty directory just now
                if attempt == 99:
                    raise
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                    raise RunDirBusy(
                        f"{directory} is being written by another distill process ({_holder(path)}); "
                        "wait for it or stop it"
                    ) from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("%s: no file locks here (%s); a second writer is not kept out", path, exc)
                    _held[key] = _Held(-1, created=created)
                    return key
                raise
            # A holder that lets go removes the file: make sure we locked the one still there.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
            os.close(fd)
        else:
            raise DistillError(f"{path}: could not take the lock (it kept being replaced); run the command again")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["distill", *sys.argv[1:]]),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[key] = _Held(fd, created=created)
        return key


def _release(key: Path) -> None:
    with _guard:
        entry = _held[key]
        entry.depth -= 1
        if entry.depth > 0:
            return
        del _held[key]
        if entry.fd >= 0:
            (key / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: see the inode check above
            os.close(entry.fd)  # closing releases the lock
        for directory in entry.created:  # a command that wrote nothing leaves no empty directory behind
            try:
                directory.rmdir()
            except OSError:
                break


def _holder(path: Path) -> str:
    """'pid N: COMMAND' of the lock's holder (it writes them right after locking: wait a moment)."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "pid" in info:
            local = info.get("host") in (None, socket.gethostname())
            alive = not local or _alive(int(info["pid"]))
            if alive or time.monotonic() > deadline:
                where = "" if local else f" on {info.get('host')}"
                holder = f"pid {info['pid']}{where}: {info.get('command', '?')}"
                if not alive:  # its lock lives on in a child it forked, e.g. a leftover engine
                    holder += f", which exited, but a child of it holds the lock: `fuser -v {path}` names it"
                return holder
        elif time.monotonic() > deadline:
            return "pid unknown"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

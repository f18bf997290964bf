"""No orphans: a watchdog process that kills every process a piece of distill started (a vLLM
engine and its workers, a local Ray cluster and its workers) as soon as the distill process that
owns them dies, even by SIGKILL. Used by the ``vllm`` teacher and by ``executor: ray``."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

MARK = "DISTILL_ENGINE_OWNER"

# The watchdog: waits until its owner dies (the pipe from it closes without "stop", or it is
# reparented), then SIGKILLs the processes carrying the mark and those it saw running under a
# marked one (an engine core ignores SIGTERM), gives the helpers that clean up after them
# (multiprocessing's resource tracker, which unlinks shared memory) 5 s to finish, and kills what
# is left. Standalone code: it starts in ~0.05 s and takes ~14 MB; while it waits it looks at the
# process table once a second.
_WATCHDOG = r"""
import os, select, signal, sys, time
import psutil

owner = os.getppid()
name, _, mark = sys.argv[1].partition("=")

def has_mark(process):
    # The variable holds every mark of the watchdogs above the process, comma-separated (a vLLM
    # engine inside a Ray replica carries the replica's mark and its own).
    # /proc itself where there is one: psutil stops reading at the gap setproctitle leaves there
    try:
        with open(f"/proc/{process.pid}/environ", "rb") as block:
            items = block.read().split(b"\0")
    except FileNotFoundError:
        return mark in (process.environ().get(name) or "").split(",")
    prefix = name.encode() + b"="
    return any(i.startswith(prefix) and mark.encode() in i[len(prefix):].split(b",") for i in items)

def marked():
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and has_mark(process):
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found

# A process that retitles itself with a long name (setproctitle: Ray's agents) can overwrite the
# environment /proc shows, mark included: what runs under a marked process is remembered while
# the owner lives (pid and start time, so a reused pid is never taken for it).
known = {}

def remember():
    for process in marked():
        try:
            for member in [process, *process.children(recursive=True)]:
                known[member.pid] = member.create_time()
        except psutil.Error:
            pass

def remembered():
    found = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                found.append(process)
        except psutil.Error:
            pass
    return found

print("ready", flush=True)
said, last = b"", 0.0
while True:
    readable, _, _ = select.select([sys.stdin], [], [], 0.5)
    if readable:
        chunk = os.read(sys.stdin.fileno(), 64)
        said += chunk
        if not chunk:
            break
    if os.getppid() != owner:
        break
    if time.monotonic() - last > 1.0:
        remember()
        last = time.monotonic()
if said.startswith(b"stop"):
    sys.exit(0)

def kill(processes):
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass

def helper(process):
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False

def doomed():
    return list({p.pid: p for p in [*marked(), *remembered()]}.values())

found = doomed()
kill([p for p in found if not helper(p)])
psutil.wait_procs(found, timeout=5)
kill(doomed())
"""


class EngineWatchdog:
    """Kills the processes an engine (or a local Ray cluster) started when the process that started
    them dies.

    ``marking()`` puts a mark unique to this teacher into the environment while the engine starts,
    so the engine core, its workers and whatever they start inherit it; the watchdog, a child
    process in its own session (Ctrl-C in the terminal doesn't reach it), finds them by it. No
    vLLM internals are patched and it works whatever the start method (spawn or fork), the thread
    that started the engine (unlike PR_SET_PDEATHSIG), and the number of workers."""

    def __init__(self) -> None:
        self.mark = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, f"{MARK}={self.mark}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            assert self.process.stdout is not None
            with self.process.stdout:
                if self.process.stdout.readline().strip() != b"ready":
                    raise OSError(f"exited with {self.process.wait()}")
        except OSError as exc:
            log.warning("no engine watchdog (%s): a killed distill may leave engine processes behind", exc)
            if self.process is not None:
                self.process.kill()
                self.process.wait()
            self.process = None

    @contextmanager
    def marking(self) -> Iterator[None]:
        """The processes started in this block (and theirs) carry the mark, besides any mark the
        process already carries (a watchdog above this one still finds them)."""
        before = os.environ.get(MARK)
        os.environ[MARK] = f"{before},{self.mark}" if before else self.mark
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(MARK, None)
            else:
                os.environ[MARK] = before

    def stop(self) -> None:
        """The engine was shut down normally: the watchdog leaves without killing anything."""
        process, self.process = self.process, None
        if process is None or process.stdin is None:
            return
        try:
            process.stdin.write(b"stop")
            process.stdin.close()
            process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()

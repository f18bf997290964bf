"""The reliability suite's own fixtures: ``measure`` records a figure (rows lost, duplicates,
requests repeated, ...) that is printed in a table at the end of the run, so the numbers in
tests/reliability/README.md can be checked against any CI log; ``small_disk`` mounts a tiny tmpfs."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MEASURED: list[tuple[str, str, object]] = []


@pytest.fixture()
def measure(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    def record(figure: str, value: object) -> None:
        MEASURED.append((request.node.name, figure, value))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("reliability figures (tests/reliability/README.md)")
    for test, figure, value in MEASURED:
        terminalreporter.write_line(f"{test:<64} {figure:<40} {value}")


def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        # CI runs as root; elsewhere a real full or read-only disk needs mount rights.
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); run the suite as root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real file system that really fills up (ENOSPC)."""
    yield from mounted_tmpfs(tmp_path / "small-disk", "size=256k")


@pytest.fixture()
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """An empty read-only tmpfs (EROFS on every write, even for root)."""
    yield from mounted_tmpfs(tmp_path / "read-only", "size=64k,ro")

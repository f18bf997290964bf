"""A disk that fills up and one that is read-only, as real file systems (tmpfs mounts): a clear
one-line error, no half-written dataset that looks finished, and after the fix the rerun resumes
without losing or repeating anything."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from distill.errors import ConfigError
from distill.runstore import read_rows
from tests.conftest import (
    check_generate_run,
    first_user_messages,
    judge_args,
    openai_generate_args,
    read_jsonl,
    run_distill,
    write_judge_dataset,
)
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

Measure = Callable[[str, object], None]


def test_full_disk_stops_cleanly_and_the_rerun_finishes(
    small_disk: Path, fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    stats = os.statvfs(small_disk)
    filler = small_disk / "filler"
    # Leave two pages: the first answer and its rows fit, the second answer does not.
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 8 * 1024))
    run_dir, target = small_disk / "run", 4
    args = openai_generate_args(
        fault_proxy.base_url, run_dir, target, "--set", "generate.cache=false", "--set", "generate.batch_size=2"
    )
    full = run_distill(*args)
    assert full.returncode == 1, full.stderr
    assert "No space left on device" in full.stderr and "run the same command again" in full.stderr
    assert "Traceback" not in full.stderr
    assert len([line for line in full.stderr.splitlines() if line.startswith("error:")]) == 1
    presented_as_done = int((run_dir / "manifest.json").exists())
    assert presented_as_done == 0
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "dataset").exists()
    with pytest.raises(ConfigError, match="has not finished"):
        read_rows(run_dir)  # and nothing downstream takes it as a dataset
    saved = {row["request"]["messages"][0]["content"] for row in read_jsonl(run_dir / "responses.jsonl")}

    filler.unlink()  # space is freed: the same command finishes the run
    fault_proxy.reset()
    again = run_distill(*args)
    assert again.returncode == 0, again.stderr
    rows = check_generate_run(run_dir, target, "openai")
    repeated = saved & set(first_user_messages(fault_proxy.bodies))
    assert repeated == set()
    measure("full disk: runs presented as done", presented_as_done)
    measure("full disk: saved answers / asked again after the fix", f"{len(saved)} / {len(repeated)}")
    measure("full disk: rows after the fix / duplicates", f"{len(rows)} / {len(rows) - len({r.id for r in rows})}")


def test_read_only_output_dir_is_a_clear_error_before_any_request(
    read_only_disk: Path, fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    generate = run_distill(*openai_generate_args(fault_proxy.base_url, read_only_disk / "run", 2))
    dataset = write_judge_dataset(tmp_path / "rows.jsonl")
    judge = run_distill(*judge_args(fault_proxy.base_url, dataset, read_only_disk / "judged"))
    for result in (generate, judge):
        assert result.returncode == 1
        assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr
    assert fault_proxy.bodies == []  # failed before asking the teacher anything
    measure("read-only dir: requests sent before the error", len(fault_proxy.bodies))

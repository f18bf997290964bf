"""SIGKILL at random points of `distill generate` and `distill judge`, then rerun: zero duplicate
rows, zero lost rows, zero repeated requests for saved work. (Training killed after a checkpoint
is in test_run.py, inside a whole `distill run`.) The kill points are drawn from a seed that is
printed with the figures, so a failure can be replayed with DISTILL_KILL_SEED."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
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
SEED = int(os.environ.get("DISTILL_KILL_SEED", random.randrange(10**6)))


def kill_after(args: list[str], log: Path, saved: int, delay: float) -> bool:
    """Start `distill ARGS`, SIGKILL it ``delay`` seconds after ``log`` holds ``saved`` lines.
    False when the run finished before that point."""
    process = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while len(complete_rows(log)) < saved and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)  # lands mid-request, mid-parse or mid-write
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return True


def complete_rows(log: Path) -> list[dict]:
    """The log's rows, without a torn last line (the kill may land mid-write; distill cuts it off)."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]


def saved_prompts(log: Path) -> set[str]:
    return {row["request"]["messages"][0]["content"] for row in complete_rows(log)}


def test_generate_killed_at_random_points_resumes_exactly(
    fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    rng = random.Random(SEED)
    run_dir, target = tmp_path / "run", 6
    args = openai_generate_args(
        fault_proxy.base_url, run_dir, target, "--set", "generate.cache=false", "--set", "generate.batch_size=2"
    )
    log = run_dir / "responses.jsonl"
    repeated, kills = 0, 0
    for saved in (1, rng.randint(2, 3)):
        before = saved_prompts(log)
        fault_proxy.reset()
        kills += kill_after(args, log, saved, rng.uniform(0, 1.5))
        repeated += len(before & set(first_user_messages(fault_proxy.bodies)))
        if kills == 1:
            with log.open("a") as handle:  # and a torn last line, as if killed mid-write
                handle.write('{"request_id": "torn", "resu')
    assert kills >= 1, "the run finished before the first kill point"
    before = saved_prompts(log)
    fault_proxy.reset()
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    repeated += len(before & set(first_user_messages(fault_proxy.bodies)))
    rows = check_generate_run(run_dir, target, "openai")  # distinct ids, all complete
    assert f"{target} / {target}" in result.stdout  # the summary's kept / target
    assert len({row.instruction for row in rows}) == target
    assert repeated == 0  # no saved answer was asked for again
    answers = read_jsonl(log)
    assert len({row["request_id"] for row in answers}) == len(answers)  # none saved twice
    measure("kill seed / kills", f"{SEED} / {kills}")
    measure("generate: duplicate rows", target - len({row.id for row in rows}))
    measure("generate: lost rows", target - len(rows))
    measure("generate: saved requests asked again", repeated)


def test_judge_killed_at_a_random_point_resumes_exactly(
    fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    rng = random.Random(SEED + 1)
    rows = [(f"Give me fact number {i} about the sea.", f"The sea is salty ({i}).") for i in range(12)]
    dataset = write_judge_dataset(tmp_path / "rows.jsonl", rows)
    run_dir = tmp_path / "run"
    args = judge_args(
        fault_proxy.base_url, dataset, run_dir, "--set", "judge.cache=false", "--set", "judge.batch_size=2"
    )
    # Free-text verdicts (64 tokens each) make every batch slow enough to kill mid-run.
    args += [
        "--set",
        'judge.judges=[{type: rubric, rubric: helpfulness, options: {structured: "off", max_tokens: 64}}]',
    ]
    log = run_dir / "judge_responses.jsonl"
    assert kill_after(args, log, rng.randint(2, 8), rng.uniform(0, 1.0))
    before = saved_prompts(log)
    assert 2 <= len(before) < len(rows), "kill the run after some, but not all, batches were saved"
    fault_proxy.reset()
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    asked = first_user_messages(fault_proxy.bodies)
    assert before.isdisjoint(asked) and len(asked) == len(rows) - len(before)
    judgements = read_jsonl(run_dir / "judgements.jsonl")
    ids = [j["item_id"] for j in judgements]
    assert sorted(ids) == sorted(f"r{i}" for i in range(len(rows)))  # none lost, none twice
    assert len(read_jsonl(log)) == len(rows)
    measure("judge: duplicate / lost judgements", f"{len(ids) - len(set(ids))} / {len(rows) - len(set(ids))}")
    measure("judge: saved verdicts asked again", len(before & set(asked)))

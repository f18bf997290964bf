"""Batch mode of the openai teacher, end to end. No paid API is reachable and no provider's batch
lifecycle can be produced on demand, so a small Batch-API-compatible server (tests/batch_server.py)
plays the provider; every answer in it comes from the real vLLM server. Counted at that server:
a `distill generate` killed while its batch is in_progress resumes by collecting that batch and
submits nothing twice; failed and expired items are submitted again once, in a batch of just
them; the estimate's range holds what the run cost. A server without a Batch API (vLLM's own) is
refused in one line, and one batch file goes through vLLM's offline runner (`run_batch`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill.config import load_config
from distill.estimate import estimate
from distill.ledger import read_ledger
from tests.batch_server import BatchServer, Plan
from tests.conftest import (
    REPO,
    SERVED_NAME,
    TEACHER_MODEL,
    check_generate_run,
    judge_args,
    read_jsonl,
    run_distill,
    write_judge_dataset,
)

pytestmark = pytest.mark.slow

# Made-up prices for the served model (it has none): the arithmetic of the ledger is what is tested.
PRICES = "teacher.options.prices={smollm2: {input_per_million: 1.0, output_per_million: 2.0}}"
BATCH = ["teacher.options.mode=batch", "teacher.options.poll_interval_s=0.2"]


@pytest.fixture()
def batch_server(vllm_server: str) -> Iterator[BatchServer]:
    server = BatchServer(vllm_server).start()
    yield server
    server.release()
    server.stop()


def generate_overrides(base_url: str, run_dir: Path, target: int) -> list[str]:
    """A small self-instruct run (as tests/reliability's) in batch mode: 2 requests a round."""
    return [
        f"run_dir={run_dir}",
        "teacher.backend=openai",
        f"teacher.model={SERVED_NAME}",
        f"teacher.options.base_url={base_url}",
        "teacher.options.api_key_env=null",
        PRICES,
        *BATCH,
        f"generate.target={target}",
        "generate.batch_size=2",
        "generate.tasks_per_request=3",
        "generate.max_tokens=320",
        "generate.max_requests=12",
        "generate.temperature=0.7",
        "teacher.seed=11",  # seeded sampling: whether 12 requests yield 6 rows must not change run to run
        "generate.cache=false",
    ]


def flags(overrides: list[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


def jobs(path: Path) -> list[dict]:
    return read_jsonl(path)


def test_generate_killed_during_in_progress_resumes_the_batch_and_costs_what_was_estimated(
    batch_server: BatchServer, tmp_path: Path
) -> None:
    run_dir, target = tmp_path / "run", 6
    overrides = generate_overrides(batch_server.base_url, run_dir, target)
    found = estimate(load_config(None, overrides), ("generate",))
    low, high = found.total(False), found.total(True)
    assert low is not None and high is not None

    batch_server.plan(Plan(hold=True))  # the first round's batch stays in_progress
    args = ["generate", "--no-progress", *flags(overrides)]
    process = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    jobs_file = run_dir / "responses.batches.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        recorded = [row for row in jobs(jobs_file) if row["event"] == "status" and row["status"] == "in_progress"]
        if recorded:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before its batch was in progress"
    time.sleep(1.0)  # a few polls of the running batch
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    [(first_batch, first_ids)] = batch_server.created
    assert batch_server.status(first_batch) == "in_progress" and len(first_ids) == 2

    batch_server.release()
    started = time.monotonic()
    result = run_distill(*args)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    check_generate_run(run_dir, target, "openai")
    submitted = [request_id for _, ids in batch_server.created for request_id in ids]
    assert len(submitted) == len(set(submitted))  # no request in two batches: nothing submitted twice
    assert batch_server.created[0] == (first_batch, first_ids)  # the resumed run collected it
    answers = read_jsonl(run_dir / "responses.jsonl")
    assert sorted(row["request_id"] for row in answers) == sorted(submitted)

    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert sorted(row["request_id"] for row in ledger) == sorted(submitted)
    for row in ledger:  # half of the list price: (prompt × $1 + completion × $2) per million, × 0.5
        assert row["mode"] == "batch"
        assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 2.0) / 1e6 / 2)
    actual = sum(row["cost_usd"] for row in ledger)
    rounds = len(batch_server.created)
    print(
        f"\nbatch generate: estimate ${low:.6f} – ${high:.6f}, actual ${actual:.6f}; {len(submitted)} requests in "
        f"{rounds} batches; resumed run {seconds:.1f} s ({seconds / max(rounds, 1):.1f} s a round)"
    )
    assert low <= actual <= high


def test_judge_in_batch_mode_submits_failed_and_expired_items_again_once(
    batch_server: BatchServer, tmp_path: Path
) -> None:
    dataset = write_judge_dataset(tmp_path / "rows.jsonl")
    extra = flags([*BATCH, "judge.cache=false"])

    # Partial failure: lines 0 and 1 fail (HTTP 500); submitted again, line 0 of that batch fails again.
    batch_server.plan(Plan(errors={0, 1}), Plan(errors={0}))
    run_dir = tmp_path / "partial"
    result = run_distill(*judge_args(batch_server.base_url, dataset, run_dir, *extra))
    assert result.returncode == 0, result.stderr
    [(_, first), (_, second)] = batch_server.created
    assert len(first) == 8 and set(second) == set(first[:2])  # everything at once, then only the failed
    judgements = read_jsonl(run_dir / "judgements.jsonl")
    assert sorted(j["item_id"] for j in judgements) == [f"r{i}" for i in range(8)]
    failed = [j for j in judgements if j["invalid_reason"] == "teacher_error:server_error"]
    assert len(failed) == 1
    [line] = [row for row in read_jsonl(run_dir / "failures.jsonl") if row["item_id"] == failed[0]["item_id"]]
    assert "injected server error" in line["raw"]  # the raw error line from the error file
    assert len(read_ledger(run_dir / "ledger.jsonl")) == 7  # the answered ones; failures aren't billed

    # Expired: the batch answers 3 lines, then expires; the other 5 go out again and are answered.
    batch_server.plan(Plan(expire_after=3))
    run_dir = tmp_path / "expired"
    result = run_distill(*judge_args(batch_server.base_url, dataset, run_dir, *extra))
    assert result.returncode == 0, result.stderr
    [(expired, first), (_, second)] = batch_server.created[2:]
    assert batch_server.status(expired) == "expired"
    assert len(first) == 8 and sorted(second) == sorted(first[3:])
    judgements = read_jsonl(run_dir / "judgements.jsonl")
    assert len(judgements) == 8 and not [j for j in judgements if (j["invalid_reason"] or "").startswith("teacher")]


def test_batch_mode_is_refused_where_the_server_has_no_batch_api(vllm_server: str, tmp_path: Path) -> None:
    dataset = write_judge_dataset(tmp_path / "rows.jsonl")
    result = run_distill(*judge_args(vllm_server, dataset, tmp_path / "run", *flags([*BATCH, "judge.cache=false"])))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no Batch API" in errors[0] and "batch_runner: vllm" in errors[0], result.stderr


def test_a_batch_file_runs_through_vllms_own_batch_runner(smollm2_dir: Path, tmp_path: Path) -> None:
    dataset = write_judge_dataset(tmp_path / "rows.jsonl")
    run_dir = tmp_path / "run"
    runner = [
        "teacher.backend=openai",
        f"teacher.model={TEACHER_MODEL}",
        "teacher.options.api_key_env=null",
        "teacher.options.mode=batch",
        "teacher.options.batch_runner=vllm",
        "teacher.options.vllm_args=[--max-model-len, '2048', --enforce-eager, --dtype, float32]",
        "judge.cache=false",  # answers from an earlier test run must not stand in for the runner's
    ]
    args = ["judge", str(dataset), "--rubric", "helpfulness", "--run-dir", str(run_dir), "--json", *flags(runner)]
    result = run_distill(*args, "--limit", "4")
    assert result.returncode == 0, result.stderr
    judgements = read_jsonl(run_dir / "judgements.jsonl")
    assert len(judgements) == 4 and all(j["verdict"] is not None for j in judgements)
    [output] = list(run_dir.glob("judge_responses.batches-*.output.jsonl"))
    assert len(read_jsonl(output)) == 4  # vLLM's runner wrote the OpenAI batch output format
    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert len(ledger) == 4 and all(row["cost_usd"] == 0.0 for row in ledger)  # this machine: nothing billed
    assert json.loads(result.stdout)["cost"]["usd"] == 0.0

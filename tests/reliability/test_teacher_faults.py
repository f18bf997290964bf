"""A misbehaving teacher server, at the wire: real `distill judge` / `distill generate` runs of the
openai teacher through the fault-injecting proxy in front of the real vLLM server. The judge
carries the wire faults (its constrained verdicts are a few tokens, so the faults, not generation,
set the pace); generate carries malformed replies, which only its parser can meet."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    JUDGE_ROWS,
    judge_args,
    openai_generate_args,
    read_jsonl,
    run_distill,
    write_judge_dataset,
)
from tests.fault_proxy import Fault, FaultProxy, pacing_violations

pytestmark = pytest.mark.slow

Measure = Callable[[str, object], None]

# Everything a flaky server does, all retryable: rate limits with retry-after, server errors,
# dropped connections, answers cut off mid-body, bodies that are not JSON.
STORM = [
    Fault("status", 429, headers={"retry-after": "1"}, body='{"error": {"message": "rate limited"}}'),
    Fault("status", 500),
    Fault("status", 503),
    Fault("reset"),
    Fault("truncated"),
    Fault("garbage"),
]


def sea_rows(count: int) -> list[tuple[str, str]]:
    return [(f"Give me fact number {i} about the sea.", f"The sea is salty ({i}).") for i in range(count)]


def judged_ids(run_dir: Path) -> list[str]:
    return [j["item_id"] for j in read_jsonl(run_dir / "judgements.jsonl")]


def test_storm_of_faults_loses_no_row_and_keeps_the_rate_limit(
    fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    rows, rpm = sea_rows(16), 90
    fault_proxy.storm(0.3, STORM, seed=7)
    run_dir = tmp_path / "run"
    args = judge_args(
        fault_proxy.base_url,
        write_judge_dataset(tmp_path / "rows.jsonl", rows),
        run_dir,
        *("--set", "judge.cache=false"),
        *("--set", f"teacher.options.requests_per_minute={rpm}"),
        *("--set", "teacher.options.max_retries=12"),
        *("--set", "teacher.options.backoff_initial_s=0.2"),
    )
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    judgements = read_jsonl(run_dir / "judgements.jsonl")
    assert sorted(judged_ids(run_dir)) == sorted(f"r{i}" for i in range(len(rows)))  # every row, once
    assert all(j["verdict"] is not None for j in judgements)  # real verdicts, not errors

    answered = fault_proxy.answered
    faulted = [a for a in answered if a.fault != "pass"]
    assert len(faulted) >= 3, "the storm must hit something"
    answered_well = {a.body_sha256 for a in answered if a.fault == "pass" and a.status == 200}
    unanswered = [a for a in faulted if a.body_sha256 not in answered_well]
    assert unanswered == []  # every faulted request was asked again until it got a real answer

    # retry-after is honoured: the same request comes back no sooner than asked.
    early = []
    for limited in (a for a in answered if a.status == 429):
        retry = next(b for b in answered if b.body_sha256 == limited.body_sha256 and b.received > limited.sent)
        if retry.received - limited.sent < float(limited.retry_after or 0):
            early.append(retry.received - limited.sent)
    assert early == []

    # The limit, measured at the proxy: 90/min = one request per 2/3 s, retries included. Every run
    # of k consecutive arrivals spans at least (k - 1) · 2/3 s, less a slack for a late stamp on a
    # busy machine: a client sending back-to-back pairs or any burst fails this (tests/test_openai_wire.py).
    times = sorted(a.received for a in answered)
    violations = pacing_violations(times, rpm)
    assert violations == [], (violations, times)
    ids = judged_ids(run_dir)
    measure("requests / faults injected", f"{len(answered)} / {len(faulted)}")
    measure("rows lost / judged twice", f"{len(rows) - len(set(ids))} / {len(ids) - len(set(ids))}")
    measure("retry-after not honoured", len(early))
    measure("arrival runs faster than the rate limit", len(violations))


def test_hanging_and_trickling_server_times_out_and_is_retried(
    fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    # A server that accepts and never answers, then one that sends 8 bytes every half second
    # (each read is quick, so only a whole-attempt deadline catches it).
    timeout = 8
    fault_proxy.plan(Fault("hang"), Fault("pass"), Fault("trickle"))
    run_dir = tmp_path / "run"
    args = judge_args(
        fault_proxy.base_url,
        write_judge_dataset(tmp_path / "rows.jsonl", sea_rows(3)),
        run_dir,
        *("--set", "judge.cache=false"),
        *("--set", "judge.batch_size=1"),
        *("--set", f"teacher.options.timeout_s={timeout}"),
        *("--set", "teacher.options.backoff_initial_s=0.2"),
    )
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    assert judged_ids(run_dir) == ["r0", "r1", "r2"]
    bodies, received = fault_proxy.bodies, [t for t, _ in fault_proxy.received]
    hung_retried = bodies[1] == bodies[0]
    assert hung_retried and received[1] - received[0] >= timeout  # the hung request, retried after the deadline
    trickled = next(a for a in fault_proxy.answered if a.fault == "trickle")
    assert trickled.sent - trickled.received < 2 * timeout  # cut off by the deadline, not finished
    trickle_retried = any(a.body_sha256 == trickled.body_sha256 and a.fault == "pass" for a in fault_proxy.answered)
    assert trickle_retried
    measure("hung / trickled requests not retried", f"{int(not hung_retried)} / {int(not trickle_retried)}")


@pytest.mark.parametrize("status", [401, 400])
def test_401_and_400_stop_after_one_attempt_and_keep_saved_rows(
    status: int, fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    message = {401: f"Incorrect API key provided: {canary}", 400: "This model's maximum context length is 8"}[status]
    # The first row is judged and saved; the second request is refused.
    fault_proxy.plan(Fault("pass"), Fault("status", status, body=json.dumps({"error": {"message": message}})))
    rows, run_dir = sea_rows(4), tmp_path / "run"
    args = judge_args(
        fault_proxy.base_url,
        write_judge_dataset(tmp_path / "rows.jsonl", rows),
        run_dir,
        *("--set", "judge.cache=false"),
        *("--set", "judge.batch_size=1"),
        *("--set", "teacher.options.api_key_env=DISTILL_TEST_KEY"),
    )
    result = run_distill(*args, env={"DISTILL_TEST_KEY": canary})
    assert result.returncode == 1
    attempts = len(fault_proxy.bodies) - 1
    assert attempts == 1  # one attempt at the refused request, no retry
    hint = {401: "rejected the API key (HTTP 401): check $DISTILL_TEST_KEY", 400: "refused the request (HTTP 400)"}
    assert hint[status] in result.stderr and "Traceback" not in result.stderr
    assert canary not in result.stdout + result.stderr  # a server echoing the key is redacted
    saved = read_jsonl(run_dir / "judge_responses.jsonl")
    assert len(saved) == 1 and saved[0]["result"]["error"] is None
    before = read_jsonl(run_dir / "judgements.jsonl")
    assert [j["item_id"] for j in before] == ["r0"]
    assert not (run_dir / "manifest.json").exists()  # a stopped run does not look finished
    measure(f"HTTP {status}: attempts at the refused request", attempts)
    if status == 400:
        return
    fault_proxy.reset()  # the key is fixed: the rerun finishes and asks nothing twice
    again = run_distill(*args, env={"DISTILL_TEST_KEY": canary})
    assert again.returncode == 0, again.stderr
    after = read_jsonl(run_dir / "judgements.jsonl")
    lost = [row for row in before if row not in after]
    assert [j["item_id"] for j in after] == ["r0", "r1", "r2", "r3"] and lost == []
    repeated = [b for b in fault_proxy.bodies if json.loads(b)["messages"] == saved[0]["request"]["messages"]]
    assert repeated == [] and len(fault_proxy.bodies) == 3
    measure("HTTP 401: saved rows lost / asked again after the fix", f"{len(lost)} / {len(repeated)}")


def test_malformed_teacher_replies_go_to_failures_with_the_raw_text(
    fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    bad = ["I cannot produce JSON today.", '{"tasks": [{"instruction": 7}]}']
    fault_proxy.plan(*(Fault("reply", body=text) for text in bad))
    run_dir = tmp_path / "run"
    # One request at a time: with concurrent requests the planned replies may land on requests the
    # generator never reads, because it stops at the target in request order.
    one_at_a_time = ("--set", "generate.cache=false", "--set", "generate.batch_size=1")
    result = run_distill(*openai_generate_args(fault_proxy.base_url, run_dir, 1, *one_at_a_time))
    assert result.returncode == 0, result.stderr
    raws = [f.get("raw") for f in read_jsonl(run_dir / "failures.jsonl")]
    assert bad[0] in raws and bad[1] in raws
    rows = read_jsonl(run_dir / "instructions.jsonl")
    assert len(rows) == 1 and all(isinstance(r["instruction"], str) and r["instruction"] for r in rows)
    assert not any("cannot produce JSON" in json.dumps(r) for r in rows)
    measure("malformed teacher replies without raw text", sum(text not in raws for text in bad))
    measure("None rows", sum(r["instruction"] is None or r["output"] is None for r in rows))


def test_malformed_judge_replies_are_invalid_with_their_raw_text(
    fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    dataset = write_judge_dataset(tmp_path / "rows.jsonl", JUDGE_ROWS[:3])
    crafted = ['The response says {"class": "A"}', "Score: 5", '{"class": "Z"}']
    fault_proxy.plan(*(Fault(kind="reply", body=text) for text in crafted))
    args = judge_args(fault_proxy.base_url, dataset, tmp_path / "run", "--set", "judge.cache=false")
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    judgements = read_jsonl(tmp_path / "run" / "judgements.jsonl")
    assert [j["verdict"] for j in judgements] == [None, None, None]
    assert [j["reward"] for j in judgements] == [None, None, None]  # never a default reward
    assert sorted(j["raw"][0] for j in judgements) == sorted(crafted)
    failures = read_jsonl(tmp_path / "run" / "failures.jsonl")
    assert sorted(f["raw"] for f in failures) == sorted(crafted)
    assert all(f["reason"] and f["judge"] == "rubric:helpfulness" for f in failures)
    summary = json.loads(result.stdout)["judges"]["rubric:helpfulness"]
    assert summary["invalid_rate"] == 1.0 and summary["mean_reward"] is None
    # What the judge said is its answer: a rerun replays the same invalid verdicts, it doesn't
    # re-ask until a valid one turns up (that would bias the verdicts).
    fault_proxy.reset()
    again = run_distill(*args)
    assert again.returncode == 0, again.stderr
    assert fault_proxy.bodies == []
    assert read_jsonl(tmp_path / "run" / "judgements.jsonl") == judgements
    measure("invalid verdicts given a reward", sum(j["reward"] is not None for j in judgements))
    measure("invalid verdicts missing from failures.jsonl", len(crafted) - len(failures))

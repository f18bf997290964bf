"""Judges with the bundled SmolLM2-135M-Instruct as the judge model: `distill judge` through the
real vLLM server (constrained JSON verdicts), resume after SIGKILL, the cache, malformed judge
output injected at the proxy, class probabilities from the in-process engine, generate filtered by
a judge, and the robustness report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import load_config
from distill.judge import load_judge
from distill.records import JudgeItem
from tests.conftest import REPO, SERVED_NAME, run_distill
from tests.fault_proxy import Fault, FaultProxy

ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I like turtles."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("Name three primary colours.", ""),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does a spider have?", "Spiders are the best pizza toppings in Italy."),
    ("Translate 'hello' into French.", "Bonjour."),
    ("Translate 'hello' into French.", "Hello hello hello hello."),
]


def write_dataset(path: Path, rows: list[tuple[str, str]] = ROWS) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "instruction": p, "output": o}) + "\n" for i, (p, o) in enumerate(rows))
    )
    return path


def judge_args(base_url: str, dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "judge",
        str(dataset),
        "--rubric",
        "helpfulness",
        "--run-dir",
        str(run_dir),
        "--set",
        "teacher.backend=openai",
        "--set",
        f"teacher.model={SERVED_NAME}",
        "--set",
        f"teacher.options.base_url={base_url}",
        "--set",
        "teacher.options.api_key_env=null",
        "--json",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def judged_prompts(proxy: FaultProxy) -> list[str]:
    return [json.loads(body)["messages"][0]["content"] for body in proxy.bodies if body]


@pytest.mark.slow
def test_judge_a_dataset_through_the_real_server_then_rerun_for_free(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "rows.jsonl")
    args = judge_args(fault_proxy.base_url, dataset, tmp_path / "run", "--set", "judge.cache=false")
    first = run_distill(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)["judges"]["rubric:helpfulness"]
    # Constrained decoding: every verdict is a rubric class, none invalid.
    assert summary["items"] == len(ROWS) and summary["invalid"] == 0
    assert set(summary["classes"]) <= {"A", "B", "C"} and sum(summary["classes"].values()) == len(ROWS)
    judgements = read_jsonl(tmp_path / "run" / "judgements.jsonl")
    assert [j["item_id"] for j in judgements] == [f"r{i}" for i in range(len(ROWS))]
    rewards = {"A": 1.0, "B": 0.5, "C": 0.0}
    for judgement in judgements:
        assert judgement["reward"] == rewards[judgement["verdict"]]
        assert json.loads(judgement["raw"][0]) == {"class": judgement["verdict"]}
        assert judgement["judge_model"] == SERVED_NAME and judgement["latency_s"] > 0
    body = json.loads(fault_proxy.bodies[0])
    assert body["response_format"]["json_schema"]["schema"]["properties"]["class"]["enum"] == ["A", "B", "C"]
    assert len(fault_proxy.bodies) == len(ROWS)

    fault_proxy.reset()
    again = run_distill(*args)
    assert again.returncode == 0, again.stderr
    assert fault_proxy.bodies == []  # replayed from the run's judge log
    assert read_jsonl(tmp_path / "run" / "judgements.jsonl") == judgements
    assert json.loads(again.stdout)["replayed_from_log"] == len(ROWS)


@pytest.mark.slow
def test_sigkill_mid_judge_then_rerun_loses_and_repeats_nothing(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    rows = [(f"Give me fact number {i} about the sea.", f"The sea is salty ({i}).") for i in range(12)]
    dataset = write_dataset(tmp_path / "rows.jsonl", rows)
    run_dir = tmp_path / "run"
    args = judge_args(
        fault_proxy.base_url, dataset, run_dir, "--set", "judge.cache=false", "--set", "judge.batch_size=2"
    )
    # Free-text verdicts (64 tokens each) make every batch slow enough to kill mid-run.
    args += [
        "--set",
        'judge.judges=[{type: rubric, rubric: helpfulness, options: {structured: "off", max_tokens: 64}}]',
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = run_dir / "judge_responses.jsonl"
    deadline = time.monotonic() + 600
    while len(read_jsonl(log)) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved_before = {row["request"]["messages"][0]["content"] for row in read_jsonl(log)}
    assert 4 <= len(saved_before) < len(rows), "kill the run after some, but not all, batches were saved"
    fault_proxy.reset()
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    assert saved_before.isdisjoint(judged_prompts(fault_proxy))  # nothing saved is asked again
    assert len(judged_prompts(fault_proxy)) == len(rows) - len(saved_before)
    judgements = read_jsonl(run_dir / "judgements.jsonl")
    assert sorted(j["item_id"] for j in judgements) == sorted(
        f"r{i}" for i in range(len(rows))
    )  # none lost, none twice
    assert len(read_jsonl(log)) == len(rows)


@pytest.mark.slow
def test_malformed_judge_output_is_invalid_with_its_raw_text(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "rows.jsonl", ROWS[:3])
    crafted = ['The response says {"class": "A"}', "Score: 5", '{"class": "Z"}']
    fault_proxy.plan(*(Fault(kind="reply", body=text) for text in crafted))
    result = run_distill(*judge_args(fault_proxy.base_url, dataset, tmp_path / "run", "--set", "judge.cache=false"))
    assert result.returncode == 0, result.stderr
    judgements = read_jsonl(tmp_path / "run" / "judgements.jsonl")
    assert [j["verdict"] for j in judgements] == [None, None, None]
    assert [j["reward"] for j in judgements] == [None, None, None]
    assert sorted(j["raw"][0] for j in judgements) == sorted(crafted)
    summary = json.loads(result.stdout)["judges"]["rubric:helpfulness"]
    assert summary["invalid_rate"] == 1.0 and summary["mean_reward"] is None
    # What the judge said is its answer: a rerun replays the same invalid verdicts, it doesn't
    # re-ask until a valid one turns up (that would bias the verdicts).
    fault_proxy.reset()
    again = run_distill(*judge_args(fault_proxy.base_url, dataset, tmp_path / "run", "--set", "judge.cache=false"))
    assert again.returncode == 0, again.stderr
    assert fault_proxy.bodies == []
    assert read_jsonl(tmp_path / "run" / "judgements.jsonl") == judgements


@pytest.mark.slow
def test_class_probabilities_from_the_engine_give_a_smooth_reward(vllm_teacher: object) -> None:
    config = load_config(None, ["judge.judges=[{type: rubric, rubric: harmlessness, options: {probabilities: true}}]"])
    judge = load_judge(config.judge.judges[0], vllm_teacher)
    items = [JudgeItem(id=str(i), prompt=p, response=r) for i, (p, r) in enumerate(ROWS[:4])]
    judgements = judge.judge(items)
    for judgement in judgements:
        assert judgement.verdict in {"A", "B", "C", "D"}
        probabilities = judgement.probabilities
        assert probabilities is not None and set(probabilities) <= {"A", "B", "C", "D"}
        assert sum(probabilities.values()) == pytest.approx(1.0)
        expected = sum(p * {"A": 1.0, "B": 0.3, "C": -1.0, "D": 1.0}[c] for c, p in probabilities.items())
        assert judgement.reward == pytest.approx(expected)
        assert judgement.verdict == max(probabilities, key=probabilities.get)  # greedy verdict = most likely class


@pytest.mark.slow
def test_generate_keeps_only_rows_the_judge_rewards(vllm_teacher: object, tmp_path: Path) -> None:
    from distill.generate import run_generate

    config = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "generate.target=2",
            "generate.batch_size=4",
            "generate.tasks_per_request=3",
            "generate.max_tokens=320",
            "generate.temperature=0.7",
            "generate.cache=false",
            "generate.judge=helpfulness",
            "generate.min_reward=0.5",
        ],
    )
    summary = run_generate(config, teacher=vllm_teacher)
    kept = read_jsonl(tmp_path / "run" / "instructions.jsonl")
    assert summary["kept"] == len(kept) and kept
    assert all(row["judge_reward"] >= 0.5 for row in kept)
    judged_out = [
        r for r in read_jsonl(tmp_path / "run" / "rejected.jsonl") if r["reason"] in {"low_reward", "judge_invalid"}
    ]
    for row in judged_out:
        judgement = row["judgement"]
        assert judgement["raw"] and (judgement["reward"] is None or judgement["reward"] < 0.5)
    judge_log = read_jsonl(tmp_path / "run" / "judge_responses.jsonl")
    assert len(judge_log) == len(kept) + len(judged_out)  # every kept or judged-out row was judged once


@pytest.mark.slow
def test_robustness_report_with_the_real_judge(vllm_server: str, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "rows.jsonl", ROWS[:4])
    result = run_distill(*judge_args(vllm_server, dataset, tmp_path / "run", "--robustness"))
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)["robustness"]
    assert set(report["attacks"]) == {
        "ignore_rubric",
        "fake_json_verdict",
        "fake_answer_line",
        "colon_only",
        "thought_process",
    }
    for attack in report["attacks"].values():
        assert 0 <= attack["successes"] <= attack["eligible"] <= 4 and attack["invalid"] == 0
        if attack["eligible"]:
            assert attack["success_rate"] == pytest.approx(attack["successes"] / attack["eligible"], abs=1e-4)
    assert report["attacks"]["colon_only"]["eligible"] == 4
    saved = json.loads((tmp_path / "run" / "robustness.json").read_text())
    assert saved == [report]

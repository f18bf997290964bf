"""Judges with the bundled SmolLM2-135M-Instruct as the judge model: `distill judge` through the
real vLLM server (constrained JSON verdicts) and its free rerun, class probabilities from the
in-process engine, generate filtered by a judge, and the robustness report. (Kills and malformed
verdicts: tests/reliability/.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import load_config
from distill.judge import load_judge
from distill.records import JudgeItem
from tests.conftest import (
    JUDGE_ROWS,
    SERVED_NAME,
    judge_args,
    read_jsonl,
    run_distill,
    write_judge_dataset,
)
from tests.fault_proxy import FaultProxy


@pytest.mark.slow
def test_judge_a_dataset_through_the_real_server_then_rerun_for_free(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    dataset = write_judge_dataset(tmp_path / "rows.jsonl")
    args = judge_args(fault_proxy.base_url, dataset, tmp_path / "run", "--set", "judge.cache=false")
    first = run_distill(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)["judges"]["rubric:helpfulness"]
    # Constrained decoding: every verdict is a rubric class, none invalid.
    assert summary["items"] == len(JUDGE_ROWS) and summary["invalid"] == 0
    assert set(summary["classes"]) <= {"A", "B", "C"} and sum(summary["classes"].values()) == len(JUDGE_ROWS)
    judgements = read_jsonl(tmp_path / "run" / "judgements.jsonl")
    assert [j["item_id"] for j in judgements] == [f"r{i}" for i in range(len(JUDGE_ROWS))]
    rewards = {"A": 1.0, "B": 0.5, "C": 0.0}
    for judgement in judgements:
        assert judgement["reward"] == rewards[judgement["verdict"]]
        assert json.loads(judgement["raw"][0]) == {"class": judgement["verdict"]}
        assert judgement["judge_model"] == SERVED_NAME and judgement["latency_s"] > 0
    body = json.loads(fault_proxy.bodies[0])
    assert body["response_format"]["json_schema"]["schema"]["properties"]["class"]["enum"] == ["A", "B", "C"]
    assert len(fault_proxy.bodies) == len(JUDGE_ROWS)

    fault_proxy.reset()
    again = run_distill(*args)
    assert again.returncode == 0, again.stderr
    assert fault_proxy.bodies == []  # replayed from the run's judge log
    assert read_jsonl(tmp_path / "run" / "judgements.jsonl") == judgements
    assert json.loads(again.stdout)["replayed_from_log"] == len(JUDGE_ROWS)


@pytest.mark.slow
def test_class_probabilities_from_the_engine_give_a_smooth_reward(vllm_teacher: object) -> None:
    config = load_config(None, ["judge.judges=[{type: rubric, rubric: harmlessness, options: {probabilities: true}}]"])
    judge = load_judge(config.judge.judges[0], vllm_teacher)
    items = [JudgeItem(id=str(i), prompt=p, response=r) for i, (p, r) in enumerate(JUDGE_ROWS[:4])]
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
    dataset = write_judge_dataset(tmp_path / "rows.jsonl", JUDGE_ROWS[:4])
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

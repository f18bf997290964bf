"""`distill run` end to end with tiny settings (the quickstart's shape: SmolLM2 teacher on the real
vLLM server, SmolLM2 student for speed), killed mid-run and resumed at the right stage; the
evaluator's real predictions; and the example configs validate."""

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
from tests.conftest import REPO, SERVED_NAME, TEACHER_MODEL, run_distill
from tests.fault_proxy import FaultProxy


def tiny_run_args(base_url: str, run_dir: Path) -> list[str]:
    settings = {
        "run_dir": run_dir,
        "teacher.backend": "openai",
        "teacher.model": SERVED_NAME,
        "teacher.options": f"{{base_url: '{base_url}', api_key_env: null}}",
        "teacher.max_tokens": 48,
        "generate.target": 4,
        "generate.batch_size": 4,
        "generate.tasks_per_request": 3,
        "generate.max_tokens": 320,
        "generate.temperature": 0.7,
        "judge.cache": "false",
        "train.student": TEACHER_MODEL,
        "train.report_to": "[]",
        "train.sft.max_steps": 4,
        "train.sft.batch_size": 2,
        "train.sft.save_steps": 2,
        "train.sft.eval_fraction": 0.25,
        "train.rl.max_steps": 2,
        "train.rl.batch_size": 4,
        "train.rl.num_generations": 2,
        "train.rl.max_completion_length": 16,
        "eval.tasks": "[{type: countries, options: {limit: 6, kinds: [capital]}}]",
        "eval.style_items": 3,
        "eval.bootstrap": 200,
    }
    return [
        "run",
        "-c",
        str(REPO / "examples" / "quickstart.yaml"),
        *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")),
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_distill_run_end_to_end_then_kill_and_resume_at_the_right_stage(
    fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_run_args(fault_proxy.base_url, run_dir)
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + 900
    checkpoint = run_dir / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    while process.poll() is None and time.monotonic() < deadline and not checkpoint.exists():
        time.sleep(0.2)
    time.sleep(0.5)
    assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stages = run_dir / "stages"
    assert (stages / "generate.json").is_file() and (stages / "judge.json").is_file()
    assert not (stages / "sft.json").exists(), "killed during SFT"
    rows_before = read_jsonl(run_dir / "instructions.jsonl")
    responses_before = len(read_jsonl(run_dir / "responses.jsonl"))

    fault_proxy.reset()
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[generate] done earlier, skipped" in result.stderr and "[judge] done earlier, skipped" in result.stderr
    assert read_jsonl(run_dir / "instructions.jsonl") == rows_before  # nothing regenerated
    assert len(read_jsonl(run_dir / "responses.jsonl")) == responses_before
    sft = json.loads((run_dir / "sft" / "training_summary.json").read_text())
    assert sft["resumed_from"] == "checkpoint-2" and sft["steps"] == 4
    logged = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == [1, 2, 3, 4], "each step logged once across the kill"
    for stage in ("sft", "rl", "eval", "report"):
        assert (stages / f"{stage}.json").is_file(), stage

    summary = json.loads((run_dir / "eval" / "eval_summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["base", "sft", "rl", "teacher"]
    scores = summary["scores"]["countries"]
    for name in ("base", "sft", "rl", "teacher"):
        assert scores[name]["n"] + scores[name]["failed"] == 6
    predictions = read_jsonl(run_dir / "eval" / "predictions.jsonl")
    assert len(predictions) == 24 and all(p["prediction"] is not None for p in predictions)
    teacher_right = [p for p in predictions if p["model"] == "teacher" and p["correct"]]
    assert scores["teacher"]["accuracy"] == pytest.approx(len(teacher_right) / 6)
    assert set(summary["style"]) == {"base", "sft", "rl"}
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert len(report["verdict"]) == 2 and all(" accuracy " in line for line in report["verdict"])
    assert "<svg" in (run_dir / "eval" / "report.html").read_text()
    assert report["verdict"][0] in result.stdout

    again = run_distill(*args)  # everything done: all stages skipped, nothing sent
    assert again.returncode == 0 and again.stderr.count("done earlier, skipped") == 6


def test_example_configs_validate_and_resolve_their_plugins() -> None:
    from distill.plugins import get_judges, get_tasks, get_teachers

    for name in ("quickstart", "gpu", "openai"):
        config = load_config(REPO / "examples" / f"{name}.yaml")
        assert config.teacher.backend in get_teachers()
        assert all(spec.type in get_judges() for spec in config.judge.judges)
        assert all(spec.type in get_tasks() for spec in config.eval.tasks)
        assert config.judge.judges and config.eval.tasks and config.run_dir is not None

"""`distill ask` end to end, and the promise that an API key never leaves the environment."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import SERVED_NAME, files_containing, run_distill
from tests.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.slow


def openai_args(base_url: str, run_dir: Path) -> list[str]:
    return [
        "-vv",
        "ask",
        "--teacher",
        "openai",
        "--model",
        SERVED_NAME,
        "--max-tokens",
        "16",
        "--set",
        f"teacher.options.base_url={base_url}",
        "--set",
        "teacher.options.api_key_env=DISTILL_CANARY_KEY",
        "--run-dir",
        str(run_dir),
        "What is the capital of France?",
    ]


def test_canary_key_is_used_but_never_written_or_logged(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    started = time.time()
    canary = f"sk-canary-{uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    result = run_distill(*openai_args(fault_proxy.base_url, run_dir), env={"DISTILL_CANARY_KEY": canary})
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert fault_proxy.authorizations == [f"Bearer {canary}"]  # the key really went to the server
    saved = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
    assert "Paris" in saved[0]["result"]["texts"][0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["options"]["api_key_env"] == "DISTILL_CANARY_KEY"
    assert "DEBUG" in result.stderr  # debug logging was on, and still nothing leaked
    assert canary not in result.stdout + result.stderr
    assert files_containing(run_dir, canary) == []
    assert files_containing(Path(os.environ["DISTILL_HOME"]), canary, since=started) == []


def test_server_echoing_the_key_in_a_401_does_not_leak_it(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    fault_proxy.plan(
        Fault(
            "status",
            401,
            body=json.dumps({"error": {"message": f"Incorrect API key provided: {canary}. Also: sk-...{canary[-4:]}"}}),
        )
    )
    run_dir = tmp_path / "run"
    result = run_distill(*openai_args(fault_proxy.base_url, run_dir), env={"DISTILL_CANARY_KEY": canary})
    assert result.returncode == 1
    assert "error: the server rejected the API key (HTTP 401): check $DISTILL_CANARY_KEY" in result.stderr
    assert len(fault_proxy.received) == 1
    saved = json.loads((run_dir / "answers.jsonl").read_text().splitlines()[0])
    assert saved["result"]["error"]["kind"] == "auth"
    assert "[redacted]" in saved["result"]["error"]["raw"]
    assert canary not in result.stdout + result.stderr
    assert canary[-4:] not in saved["result"]["error"]["raw"]
    assert files_containing(run_dir, canary) == []


def test_missing_key_fails_before_anything_is_written(vllm_server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_CANARY_KEY"}
    result = run_distill(*openai_args(vllm_server, run_dir)[1:], env=env)
    assert result.returncode == 1
    assert "DISTILL_CANARY_KEY is not set" in result.stderr
    assert not run_dir.exists()


def test_ask_with_the_transformers_teacher_saves_answers_and_manifest(smollm2_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "ask.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\nteacher:\n  max_tokens: 24\nask:\n  prompts:\n"
        "    - What is the capital of France?\n    - What is the capital of Japan?\n"
    )
    result = run_distill("ask", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert "Paris" in answers[0]["texts"][0] and "Tokyo" in answers[1]["texts"][0]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["backend"] == "transformers"
    assert manifest["command"].startswith("distill ask -c ")

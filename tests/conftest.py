"""Shared fixtures. Heavy things start once per test run: the prepared bundled models (cached under
$DISTILL_HOME), one real vLLM OpenAI-compatible server, one in-process vLLM engine, one
transformers model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"  # the name the test vLLM server serves the bundled SmolLM2 under
TEACHER_MODEL = "smollm2-135m-instruct"

# Prepared models are cached in one fixed place, shared by test runs and by users.
os.environ.setdefault("DISTILL_HOME", str(Path.home() / ".cache" / "distill"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distill(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run the real ``distill`` command line in a subprocess (fresh plugin loading, real exit code)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from distill.models import prepare

    return prepare(TEACHER_MODEL)


@pytest.fixture(scope="session")
def vllm_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI-compatible server on 127.0.0.1 serving the bundled SmolLM2; yields base_url."""
    from tests.vllm_server import start_vllm_server, stop

    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    process = start_vllm_server(smollm2_dir, SERVED_NAME, port, log_path)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


@pytest.fixture(scope="session")
def vllm_teacher(smollm2_dir: Path) -> Iterator[object]:
    """One in-process vLLM engine for the whole run."""
    from distill.config import TeacherConfig
    from distill.teacher import load_teacher

    config = TeacherConfig(
        backend="vllm",
        model=TEACHER_MODEL,
        options={"enforce_eager": True, "max_model_len": 2048, "cpu_kv_cache_gib": 1},
    )
    teacher = load_teacher(config)
    yield teacher
    teacher.close()


@pytest.fixture(scope="session")
def transformers_teacher(smollm2_dir: Path) -> object:
    from distill.config import TeacherConfig
    from distill.teacher import load_teacher

    return load_teacher(TeacherConfig(backend="transformers", model=TEACHER_MODEL))


@pytest.fixture(scope="session")
def openai_teacher(vllm_server: str) -> object:
    from distill.config import TeacherConfig
    from distill.teacher import load_teacher

    config = TeacherConfig(backend="openai", model=SERVED_NAME, options={"base_url": vllm_server, "api_key_env": None})
    return load_teacher(config)


@pytest.fixture()
def fault_proxy(vllm_server: str) -> Iterator[object]:
    from tests.fault_proxy import FaultProxy

    proxy = FaultProxy(vllm_server.removesuffix("/v1")).start()
    yield proxy
    proxy.stop()

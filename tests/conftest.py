"""Shared fixtures. Heavy things start once per test run: the prepared bundled models (cached under
$DISTILL_HOME), one real vLLM OpenAI-compatible server, one in-process vLLM engine, one
transformers model."""

from __future__ import annotations

import json
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# A small self-instruct run: 4 requests at a time, 3 tasks each, short answers.
SMALL_RUN = [
    "--set",
    "generate.batch_size=4",
    "--set",
    "generate.tasks_per_request=3",
    "--set",
    "generate.max_tokens=320",
    "--set",
    "generate.temperature=0.7",
    "--no-progress",
]


def openai_generate_args(base_url: str, run_dir: Path, target: int, *extra: str) -> list[str]:
    """`distill generate` with the openai teacher at ``base_url`` (the test server or a proxy)."""
    return [
        "generate",
        "--teacher",
        "openai",
        "--model",
        SERVED_NAME,
        "--run-dir",
        str(run_dir),
        "--target",
        str(target),
        "--set",
        f"teacher.options.base_url={base_url}",
        "--set",
        "teacher.options.api_key_env=null",
        *SMALL_RUN,
        *extra,
    ]


def check_generate_run(run_dir: Path, target: int, backend: str) -> list:
    """A finished generate run: ``target`` distinct complete rows with provenance, and the dataset,
    Alpaca JSON, manifest and card all agreeing with them."""
    import datasets

    from distill.records import Instruction

    rows = [Instruction.model_validate(row) for row in read_jsonl(run_dir / "instructions.jsonl")]
    assert len(rows) == target
    assert len({row.id for row in rows}) == target
    for row in rows:
        assert row.instruction.strip() and row.output.strip()
        assert row.messages[0].role == "user" and row.messages[0].content.startswith(row.instruction)
        assert row.messages[1].content == row.output
        assert row.provenance.backend == backend and len(row.provenance.template_sha256) == 64
        assert row.provenance.seed_ids and row.provenance.usage.completion_tokens > 0
    assert datasets.load_from_disk(str(run_dir / "dataset"))["id"] == [row.id for row in rows]
    assert len(json.loads((run_dir / "alpaca.json").read_text())) == target
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["summary"]["kept"] == target and manifest["summary"]["complete"]
    card = (run_dir / "README.md").read_text()
    assert f"{target} Alpaca-style tasks" in card and "ROUGE-L F ≥ 0.7" in card
    return rows


def judge_args(base_url: str, dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    """`distill judge --rubric helpfulness` with the openai teacher at ``base_url``."""
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


JUDGE_ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I like turtles."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("Name three primary colours.", ""),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does a spider have?", "Spiders are the best pizza toppings in Italy."),
    ("Translate 'hello' into French.", "Bonjour."),
    ("Translate 'hello' into French.", "Hello hello hello hello."),
]


def write_judge_dataset(path: Path, rows: list[tuple[str, str]] = JUDGE_ROWS) -> Path:
    """Rows ``r0, r1, ...`` of (instruction, output) as JSONL."""
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "instruction": p, "output": o}) + "\n" for i, (p, o) in enumerate(rows))
    )
    return path


def files_containing(root: Path, needle: str, since: float = 0.0) -> list[Path]:
    """Files under ``root`` (modified at or after ``since``) whose bytes contain ``needle``."""
    candidates = (p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_mtime >= since)
    return [path for path in candidates if needle.encode() in path.read_bytes()]


def first_user_messages(bodies: list[bytes]) -> list[str]:
    """The first message of each chat request body the proxy received."""
    return [json.loads(body)["messages"][0]["content"] for body in bodies if body]


@pytest.fixture(autouse=True)
def restore_environment() -> Iterator[None]:
    """Commands run in-process (click's CliRunner) set process-wide variables (the engine log,
    quiet library output); each test starts from the environment the run started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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


pytest_plugins = ["tests.scripted", "tests.browser"]

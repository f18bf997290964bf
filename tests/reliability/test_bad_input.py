"""Bad configs and bad data files: one clear error each (naming the field or file and line, and
the fix), a non-zero exit, no traceback, and not one request sent to the teacher."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import judge_args, openai_generate_args, run_distill
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

Measure = Callable[[str, object], None]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


LATIN_1_ROW = '{"instruction": "café", "output": "x"}\n'.encode("latin-1")
NO_OUTPUT_ROW = b'{"id": "r0", "instruction": "Say hi."}\n'


def generate_with(url: str, tmp: Path, *extra: str) -> list[str]:
    return openai_generate_args(url, tmp / "run", 2, *extra)


def generate_with_seeds(url: str, tmp: Path, data: bytes) -> list[str]:
    return generate_with(url, tmp, "--set", f"generate.seed_file={write(tmp / 'seeds.jsonl', data)}")


def generate_with_config(url: str, tmp: Path, yaml_text: bytes) -> list[str]:
    return [*generate_with(url, tmp), "-c", str(write(tmp / "bad.yaml", yaml_text))]


def judge_rows(url: str, tmp: Path, data: bytes) -> list[str]:
    return judge_args(url, write(tmp / "rows.jsonl", data), tmp / "run")


def train_on(url: str, tmp: Path, data: bytes) -> list[str]:
    rows = write(tmp / "rows.jsonl", data)
    return ["train", "sft", "--run-dir", str(tmp / "run"), "--set", f"train.sft.data={rows}"]


# name -> (the command, given the proxy URL and a temp dir; text its one error line must hold)
CASES: dict[str, tuple[Callable[[str, Path], list[str]], str]] = {
    "wrong type": (
        lambda url, tmp: generate_with(url, tmp, "--set", "generate.temperature=hot"),
        "generate.temperature",
    ),
    "unknown key": (lambda url, tmp: generate_with(url, tmp, "--set", "generate.tragets=5"), "generate.tragets"),
    "unknown key in a config file": (
        lambda url, tmp: generate_with_config(url, tmp, b"teacher:\n  modle: gpt-4o\n"),
        "teacher.modle",
    ),
    "config file that is not YAML": (lambda url, tmp: generate_with_config(url, tmp, b"a: [1,\n"), "bad.yaml"),
    "empty seed file": (lambda url, tmp: generate_with_seeds(url, tmp, b""), "has no tasks"),
    "non-UTF-8 seed file": (lambda url, tmp: generate_with_seeds(url, tmp, LATIN_1_ROW), "not UTF-8"),
    "seed rows missing fields": (
        lambda url, tmp: generate_with_seeds(url, tmp, NO_OUTPUT_ROW),
        "line 1: 'output' must be a non-empty string",
    ),
    "non-UTF-8 dataset to judge": (lambda url, tmp: judge_rows(url, tmp, LATIN_1_ROW), "not UTF-8"),
    "dataset rows missing fields": (lambda url, tmp: judge_rows(url, tmp, NO_OUTPUT_ROW), "rows.jsonl"),
    "training data missing fields": (lambda url, tmp: train_on(url, tmp, NO_OUTPUT_ROW), "rows.jsonl"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_before_any_request(
    case: str, fault_proxy: FaultProxy, tmp_path: Path, measure: Measure
) -> None:
    build, expected = CASES[case]
    result = run_distill(*build(fault_proxy.base_url, tmp_path))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert fault_proxy.bodies == []
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    measure(f"{case}: requests sent / error lines", f"{len(fault_proxy.bodies)} / {len(errors)}")

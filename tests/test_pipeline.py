"""`distill run`'s decisions, without a model: every stage asks the run layout for its paths, so a
custom adapter dir is resumed (not overwritten) after an interruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import distill.train
from distill.config import load_config
from distill.pipeline import run_pipeline


@pytest.mark.parametrize("custom", [False, True])
def test_an_interrupted_sft_stage_resumes_in_its_own_output_dir(
    custom: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sft_dir = tmp_path / "adapters" / "my-sft" if custom else tmp_path / "run" / "sft"
    (sft_dir / "checkpoints" / "checkpoint-10").mkdir(parents=True)  # what an interrupted SFT left
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(distill.train, "run_sft", lambda config, **kwargs: calls.append(kwargs) or {"steps": 1})
    overrides = [f"run_dir={tmp_path / 'run'}"] + ([f"train.sft.output_dir={sft_dir}"] if custom else [])
    run_pipeline(load_config(None, overrides), stages=("sft",), echo=lambda line: None)
    assert calls == [{"resume": True, "overwrite": False, "progress": False}]
    assert (sft_dir / "checkpoints" / "checkpoint-10").is_dir()

"""Unsafe artifacts: weights, adapters and checkpoints that exist only as pickles are refused
(loading a pickle can run code: each planted pickle here would create a file if it ever ran), and
a model's own code runs only when the config turns trust_remote_code on explicitly."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from distill.config import TeacherConfig
from distill.errors import ModelError
from distill.teacher import load_teacher
from distill.train import resume_checkpoint
from tests.conftest import TEACHER_MODEL, run_distill

pytestmark = pytest.mark.slow

Measure = Callable[[str, object], None]


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"echo loaded >> {self.sentinel}",))  # one line per load: countable


def plant_pickle(path: Path, sentinel: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(sentinel)))


def copy_model_with_pickled_weights(source: Path, target: Path, sentinel: Path) -> Path:
    """The bundled model's config and tokenizer, with the weights as a (malicious) pickle."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    plant_pickle(target / "pytorch_model.bin", sentinel)
    return target


def ask_args(model: str, *extra: str) -> list[str]:
    return ["ask", "--teacher", "transformers", "--model", model, "--max-tokens", "4", *extra, "Say hi."]


def test_pickled_weights_adapters_and_checkpoints_are_refused(
    smollm2_dir: Path, tmp_path: Path, measure: Measure
) -> None:
    sentinel = tmp_path / "pickle-ran"
    model = copy_model_with_pickled_weights(smollm2_dir, tmp_path / "model", sentinel)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(smollm2_dir), "r": 8, "target_modules": ["q_proj"]}
        )
    )
    plant_pickle(adapter / "adapter_model.bin", sentinel)
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "sft" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    shutil.copy(adapter / "adapter_config.json", checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    plant_pickle(checkpoint / "adapter_model.bin", sentinel)
    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"instruction": "Say hi.", "output": "Hi."})
        + "\n"
        + json.dumps({"instruction": "Say bye.", "output": "Bye."})
        + "\n"
    )

    # Through the command line where a user meets it; the other loaders in-process (same guard,
    # no interpreter start-up each).
    attempts = {
        "model for training": ["train", "sft", "--run-dir", str(tmp_path / "t"), "--student", str(model)],
        "adapter to merge": ["export", str(adapter), "--merge", "--out", str(tmp_path / "merged")],
    }
    for what, args in attempts.items():
        result = run_distill(*args, "--set", f"train.sft.data={data}") if args[0] == "train" else run_distill(*args)
        assert result.returncode == 1, (what, result.stderr)
        assert "pickle files" in result.stderr and "safetensors only" in result.stderr, (what, result.stderr)
        assert "Traceback" not in result.stderr
    teachers = [
        TeacherConfig(backend="transformers", model=str(model)),
        TeacherConfig(backend="vllm", model=str(model)),
        TeacherConfig(backend="transformers", model=TEACHER_MODEL, options={"adapter": str(adapter)}),
    ]
    for config in teachers:
        with pytest.raises(ModelError, match="pickle files"):
            load_teacher(config)
    with pytest.raises(ModelError, match="pickle files"):
        resume_checkpoint(run_dir / "sft", resume=True, overwrite=False)  # the checkpoint to resume
    loaded = len(sentinel.read_text().splitlines()) if sentinel.exists() else 0
    assert loaded == 0  # no pickle was ever opened
    assert not (tmp_path / "merged").exists()
    measure(f"pickle artifacts loaded (of {len(attempts) + len(teachers) + 1} tried)", loaded)


def test_model_code_runs_only_with_trust_remote_code(smollm2_dir: Path, tmp_path: Path, measure: Measure) -> None:
    from distill_plugins.transformers_teacher import TransformersOptions
    from distill_plugins.vllm_teacher import VllmOptions

    from distill.config import TrainConfig

    assert not TrainConfig().trust_remote_code
    assert not TransformersOptions().trust_remote_code and not VllmOptions().trust_remote_code

    sentinel = tmp_path / "model-code-ran"
    model = tmp_path / "model"
    shutil.copytree(smollm2_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_canary.CanaryForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_canary.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(sentinel)!r}).touch()  # runs on import\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class CanaryForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    default = run_distill(*ask_args(str(model)))
    assert default.returncode == 0, default.stderr
    ran_without_flag = int(sentinel.exists())
    assert ran_without_flag == 0  # the built-in Llama code ran, not the model's
    trusted = run_distill(*ask_args(str(model), "--set", "teacher.options.trust_remote_code=true"))
    assert trusted.returncode == 0, trusted.stderr
    assert sentinel.exists()  # turned on explicitly: the model's own code ran
    measure("model code run without trust_remote_code", ran_without_flag)

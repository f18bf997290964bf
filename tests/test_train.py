"""`distill train`: LoRA SFT and RL (GRPO, RLOO) on the bundled SmolLM2-135M-Instruct as the
student (the fastest bundled model; the quickstart uses Gemma-3-270M), a real judge (the bundled
model in the in-process vLLM engine) and a rule-based reward with a known optimum, checkpoint
resume after SIGKILL, export of a merged model, two-process (gloo) training, and config errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.config import DistillConfig, load_config
from distill.errors import ConfigError
from tests.conftest import REPO, TEACHER_MODEL, run_distill

# Eight tasks whose answers share a house style the base model doesn't have: the adapter must learn it.
TASKS = [
    ("Name a primary colour.", "Red. Distilled answer."),
    ("What is 2 + 2?", "4. Distilled answer."),
    ("Name a planet.", "Mars. Distilled answer."),
    ("What is the capital of Italy?", "Rome. Distilled answer."),
    ("Name a fruit.", "Apple. Distilled answer."),
    ("What colour is the sky?", "Blue. Distilled answer."),
    ("Name an ocean.", "Pacific. Distilled answer."),
    ("What is the opposite of hot?", "Cold. Distilled answer."),
]


def write_tasks(path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"t{i}", "instruction": q, "output": a}) + "\n" for i, (q, a) in enumerate(TASKS))
    )
    return path


def sft_overrides(data: Path, run_dir: Path, steps: int = 8, **extra: Any) -> list[str]:
    settings = {
        "run_dir": run_dir,
        "train.student": TEACHER_MODEL,
        "train.sft.data": data,
        "train.sft.max_steps": steps,
        "train.sft.batch_size": 8,
        "train.sft.learning_rate": 2e-3,
        "train.sft.warmup_ratio": 0,
        "train.sft.eval_fraction": 0,
        "train.sft.max_length": 128,
        "train.lora.dropout": 0,
        "train.report_to": "[]",
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DistillConfig, dict[str, Any]]:
    """One real SFT run shared by the tests that inspect its adapter."""
    from distill.train import run_sft

    root = tmp_path_factory.mktemp("sft")
    config = load_config(
        None, sft_overrides(write_tasks(root / "tasks.jsonl"), root / "run", **{"train.report_to": "[tensorboard]"})
    )
    return config, run_sft(config, progress=False)


def greedy(model: Any, tokenizer: Any, question: str) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_sft_learns_the_data_and_writes_a_complete_adapter(sft_run: tuple[DistillConfig, dict[str, Any]]) -> None:
    config, summary = sft_run
    out = config.run_dir / "sft"
    rows = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 9))
    # Every step sees the same 8 rows (one batch): the loss on it must fall, by a lot.
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [row["loss"] for row in rows]
    assert summary["steps"] == 8 and summary["rows"] == {"train": 8, "eval": 0}
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "manifest.json", "split.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")), "no pickles in the adapter directory"
    card = (out / "README.md").read_text()
    assert "r 16, alpha 32" in card and "distill" in card and "train_loss" in card
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard logs"

    from peft import PeftModel

    from distill.train import load_student

    base, tokenizer, _ = load_student(config.train)
    before = greedy(base, tokenizer, "Name a colour of a banana.")
    tuned = PeftModel.from_pretrained(base, str(out))
    after = greedy(tuned, tokenizer, "Name a colour of a banana.")
    assert "Distilled answer" not in before and "Distilled answer" in after, (before, after)


@pytest.mark.slow
def test_adapter_loads_in_the_transformers_teacher(sft_run: tuple[DistillConfig, dict[str, Any]]) -> None:
    from distill.config import TeacherConfig
    from distill.teacher import load_teacher

    config, _ = sft_run
    teacher_config = TeacherConfig(
        backend="transformers", model=TEACHER_MODEL, max_tokens=12, options={"adapter": str(config.run_dir / "sft")}
    )
    with load_teacher(teacher_config) as teacher:
        [result] = teacher.generate([teacher_config.request("What is the capital of Spain?")])
    assert "Distilled answer" in result.text


@pytest.mark.slow
def test_merged_export_matches_base_plus_adapter_and_serves_in_vllm(
    sft_run: tuple[DistillConfig, dict[str, Any]], tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distill.config import TeacherConfig
    from distill.teacher import load_teacher
    from distill.train import load_student

    config, _ = sft_run
    merged_dir = tmp_path / "merged"
    result = run_distill("export", str(config.run_dir / "sft"), "--merge", "--out", str(merged_dir))
    assert result.returncode == 0, result.stderr
    assert list(merged_dir.glob("*.safetensors")) and not list(merged_dir.glob("*.bin"))
    base, tokenizer, _ = load_student(config.train)
    with_adapter = PeftModel.from_pretrained(base, str(config.run_dir / "sft")).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits_adapter, logits_merged = with_adapter(**ids).logits, merged(**ids).logits
    # W + BA folded into W: float32 rounding only (measured 1.0e-4 on logits of magnitude ~20).
    assert (logits_adapter - logits_merged).abs().max().item() < 1e-3
    assert torch.equal(logits_adapter.argmax(-1), logits_merged.argmax(-1))

    teacher_config = TeacherConfig(
        backend="vllm",
        model=str(merged_dir),
        max_tokens=12,
        options={"enforce_eager": True, "max_model_len": 512, "cpu_kv_cache_gib": 1},
    )
    with load_teacher(teacher_config) as teacher:
        [answer] = teacher.generate([teacher_config.request("What is the capital of Spain?")])
    assert "Distilled answer" in answer.text


def test_an_output_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path: Path) -> None:
    """(SIGKILL and --resume for real: tests/reliability/test_run.py kills distill run mid-SFT.)"""
    from distill.errors import DistillError
    from distill.train import prepare_output, resume_checkpoint

    checkpoint = tmp_path / "sft" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(DistillError, match=r"checkpoints of an earlier run \(checkpoint-2\): pass --resume"):
        resume_checkpoint(tmp_path / "sft", resume=False, overwrite=False)
    assert resume_checkpoint(tmp_path / "sft", resume=True, overwrite=False) == str(checkpoint)
    assert resume_checkpoint(tmp_path / "sft", resume=False, overwrite=True) is None
    assert checkpoint.exists()  # nothing is deleted before every check has passed
    prepare_output(tmp_path / "sft", overwrite=True)
    assert not checkpoint.exists()


@pytest.mark.slow
def test_grpo_moves_a_rule_reward_up_while_a_real_judge_scores(vllm_teacher: object, tmp_path: Path) -> None:
    from distill.train import run_rl

    data = write_tasks(tmp_path / "tasks.jsonl")
    judges = [
        {"type": "rule", "options": {"max_words": 12}},
        {"type": "rubric", "rubric": "helpfulness", "weight": 0.1},
    ]
    config = load_config(
        None,
        [
            *sft_overrides(data, tmp_path / "run"),
            f"judge.judges={json.dumps(judges)}",
            "judge.cache=false",
            "train.rl.start_from=base",
            "train.rl.max_steps=6",
            "train.rl.batch_size=8",
            "train.rl.num_generations=8",
            "train.rl.max_completion_length=32",
            "train.rl.learning_rate=2e-3",
            "train.rl.beta=0",
            "train.rl.allow_weak_judge=true",  # RL machinery under test, not the 135M judge (tests/test_calibration.py)
        ],
    )
    summary = run_rl(config, judge_teacher=vllm_teacher, progress=False)
    rows = [row for row in metrics(tmp_path / "run" / "rl") if "rewards/rule/mean" in row]
    assert len(rows) == 6
    rule = [row["rewards/rule/mean"] for row in rows]
    assert sum(rule[-2:]) / 2 > sum(rule[:2]) / 2 + 0.2, rule  # "answer in under 12 words" is learned
    assert all("rewards/rubric_helpfulness/mean" in row for row in rows)
    assert all(row["judge/rubric_helpfulness/invalid_rate"] == 0 for row in rows)  # constrained verdicts
    assert summary["invalid_verdict_rate"] == 0 and summary["judges"] == ["rule", "rubric_helpfulness"]
    assert (tmp_path / "run" / "rl" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_completion_with_any_invalid_verdict_is_unscorable_in_a_real_grpo_step(
    scripted: dict[str, Any], tmp_path: Path
) -> None:
    """Two judges: a rule judge that gives every completion 1.0 (weight 0.5) and a rubric judge
    whose verdict is A (1.0) on every other request and unreadable on the rest. A completion the
    rubric judge could not read must not be scored on the rule judge alone (0.5): TRL must leave it
    out, so every scored completion has 1.0 + 0.5 × 1.0 = 1.5 exactly."""
    import itertools

    from distill.train import run_rl

    replies = itertools.cycle(['{"class": "A"}', "no verdict here"])
    scripted["every-other"] = lambda request, k: next(replies)
    judges = [
        {"type": "rubric", "rubric": "helpfulness", "weight": 1.0},
        {"type": "rule", "options": {"max_words": 1000}, "weight": 0.5},
    ]
    judge_teacher = {"backend": "scripted", "model": "every-other", "options": {"script": "every-other"}}
    config = load_config(
        None,
        [
            *sft_overrides(write_tasks(tmp_path / "tasks.jsonl"), tmp_path / "run"),
            f"judge.judges={json.dumps(judges)}",
            f"judge.teacher={json.dumps(judge_teacher)}",
            "judge.cache=false",
            "train.rl.start_from=base",
            "train.rl.max_steps=2",
            "train.rl.batch_size=8",
            "train.rl.num_generations=4",
            "train.rl.max_completion_length=8",
            "train.rl.beta=0",
            "train.rl.allow_weak_judge=true",  # RL machinery under test, not the 135M judge (tests/test_calibration.py)
        ],
    )
    run_rl(config, progress=False)
    rows = [row for row in metrics(tmp_path / "run" / "rl") if "reward" in row]
    assert len(rows) == 2
    for row in rows:
        assert row["judge/unscorable_rate"] > 0 and row["judge/rubric_helpfulness/invalid_rate"] > 0
        assert row["reward"] == pytest.approx(1.5) and row["reward_std"] == pytest.approx(0.0), row


@pytest.mark.slow
def test_rloo_from_the_sft_adapter_with_the_real_judge(
    vllm_teacher: object, sft_run: tuple[DistillConfig, dict[str, Any]], tmp_path: Path
) -> None:
    from distill.train import run_rl

    config, _ = sft_run
    rl_config = config.model_copy(deep=True)
    rl_config.judge = load_config(
        None, ["judge.judges=[{type: rubric, rubric: helpfulness}]", "judge.cache=false"]
    ).judge
    rl_config.train.rl.allow_weak_judge = True  # RL machinery under test, not the 135M judge
    rl_config.train.rl = rl_config.train.rl.model_copy(
        update={
            "algorithm": "rloo",
            "max_steps": 2,
            "batch_size": 4,
            "num_generations": 2,
            "max_completion_length": 16,
            "output_dir": tmp_path / "rl",
        }
    )
    summary = run_rl(rl_config, judge_teacher=vllm_teacher, progress=False)
    assert summary["algorithm"] == "rloo" and summary["steps"] == 2
    assert summary["started_from"] == str(config.run_dir / "sft")
    rows = [row for row in metrics(tmp_path / "rl") if "reward" in row]
    assert len(rows) == 2 and all(-1 <= row["reward"] <= 1 for row in rows)
    assert all("kl" in row for row in rows)  # KL to the SFT adapter's frozen copy
    assert "rloo" in (tmp_path / "rl" / "README.md").read_text()


@pytest.mark.slow
def test_padding_free_batches_give_the_padded_loss(tmp_path: Path) -> None:
    """Padding-free (the batch flattened into one row, sequences told apart by position ids) must
    train on exactly what padded batches train on: same first-step loss and token count."""
    from distill.train import run_sft

    data = write_tasks(tmp_path / "tasks.jsonl")
    first = {}
    for mode in ("padded", "padding_free"):
        extra = {"train.sft.padding_free": mode == "padding_free", "train.sft.max_length": 44}  # 3 of 8 rows cut
        run_sft(load_config(None, sft_overrides(data, tmp_path / mode, steps=1, **extra)), progress=False)
        first[mode] = metrics(tmp_path / mode / "sft")[0]
    assert first["padding_free"]["num_tokens"] == first["padded"]["num_tokens"]
    assert first["padding_free"]["loss"] == pytest.approx(first["padded"]["loss"], rel=1e-4), first


@pytest.mark.slow
def test_two_process_sft_matches_one_process_on_the_first_step(tmp_path: Path) -> None:
    data = write_tasks(tmp_path / "tasks.jsonl")

    def sets(run_dir: Path, per_device: int) -> list[str]:
        overrides = sft_overrides(data, run_dir, steps=1, **{"train.sft.batch_size": per_device})
        return [arg for o in overrides for arg in ("--set", o)]

    one = run_distill("train", "sft", *sets(tmp_path / "one", 4), "--no-progress")
    assert one.returncode == 0, one.stderr
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "distill.cli",
            "train",
            "sft",
            *sets(tmp_path / "two", 2),
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    loss_one = metrics(tmp_path / "one" / "sft")[0]["loss"]
    loss_two = metrics(tmp_path / "two" / "sft")[0]["loss"]
    # Same global batch of 4 rows, losses averaged over all tokens of both processes: equal up to
    # float32 reduction order.
    assert loss_two == pytest.approx(loss_one, rel=1e-3), (loss_one, loss_two)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.rl.start_from=base"], "judge.judges: RL needs at least one judge"),
        (
            ["train.rl.algorithm=ppo", "judge.judges=[{type: rule, options: {max_words: 5}}]"],
            "ppo needs TRL's PPOTrainer",
        ),
        (
            ["judge.judges=[{type: rule, options: {max_words: 5}}]", "train.rl.batch_size=6"],
            "must be a multiple of num_generations (4), got 6",
        ),
        (["judge.judges=[{type: rule, options: {max_words: 5}}]"], "has no adapter: run `distill train sft` first"),
    ],
)
def test_invalid_rl_setups_fail_before_any_model_loads(tmp_path: Path, overrides: list[str], expected: str) -> None:
    from distill.train import run_rl

    config = load_config(None, [f"run_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as error:
        run_rl(config)
    assert expected in str(error.value)


@pytest.mark.slow
def test_lora_targets_that_do_not_exist_and_bad_data_fail_before_training(tmp_path: Path) -> None:
    data = write_tasks(tmp_path / "tasks.jsonl")
    result = run_distill(
        "train",
        "sft",
        *[a for o in sft_overrides(data, tmp_path / "run") for a in ("--set", o)],
        "--set",
        "train.lora.target_modules=[q_proj, attn_out]",
    )
    assert result.returncode == 2
    assert "train.lora.target_modules: attn_out not in LlamaForCausalLM; its linear layers: " in result.stderr
    assert not (tmp_path / "run" / "sft").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n{"prompt": "x"}\n')
    result = run_distill("train", "sft", *[a for o in sft_overrides(bad, tmp_path / "run") for a in ("--set", o)])
    assert result.returncode == 2 and "bad.jsonl row 1: needs 'messages'" in result.stderr


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_accelerate_example_configs_load(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 8

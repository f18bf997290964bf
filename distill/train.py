"""`distill train sft` and `distill train rl`: plain, linear TRL code.

SFT: the generate run's rows → conversational prompt/completion pairs → a held-out split →
TRL ``SFTTrainer`` with a peft LoRA adapter. RL: held-in instructions as prompts → TRL
``GRPOTrainer`` / ``RLOOTrainer`` continuing the SFT adapter (TRL keeps a frozen copy of it as
the KL reference) against the judges' rewards. Both write the adapter (safetensors), a model
card, ``metrics.jsonl``, TensorBoard logs, resumable checkpoints and a manifest into one
directory; ``export_merged`` writes base + adapter as one plain model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, TrainConfig, config_dump
from distill.errors import ConfigError, DistillError
from distill.models import require_safetensors, resolve_model
from distill.paths import RunLayout
from distill.records import user_prompt
from distill.runlock import empty_directory, locks
from distill.runstore import read_rows, write_atomic, write_manifest

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SPLIT = "split.json"
CHECKPOINTS = "checkpoints"


# Data ------------------------------------------------------------------------------------------


def conversation(row: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]] | None:
    """(prompt messages, completion messages) of a row: chat ``messages`` (the last assistant turn
    is the completion) or Alpaca fields. None when the row has neither."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        turns = [{"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in messages]
        if turns[-1]["role"] == "assistant" and len(turns) >= 2:
            return turns[:-1], turns[-1:]
        return None
    instruction, output = row.get("instruction"), row.get("output")
    if isinstance(instruction, str) and isinstance(output, str) and instruction.strip() and output.strip():
        user = user_prompt(instruction, row.get("input") or "")
        return [{"role": "user", "content": user}], [{"role": "assistant", "content": output}]
    return None


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """Rows as ``{id, prompt, completion}``; every unusable row reported before training."""
    rows = read_rows(path)
    pairs, problems = [], []
    for number, row in enumerate(rows, 1):
        pair = conversation(row)
        if pair is None:
            problems.append(
                f"{path} row {number}: needs 'messages' ending with an assistant turn, or 'instruction' and "
                f"'output' strings; columns: {', '.join(sorted(row))}"
            )
            continue
        pairs.append({"id": str(row.get("id") or f"row_{number}"), "prompt": pair[0], "completion": pair[1]})
    if problems:
        raise ConfigError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    if len(pairs) < 2:
        raise ConfigError([f"train.sft.data: {path} has {len(pairs)} usable rows; training needs at least 2"])
    return pairs


def tokenized_pair(tokenizer: Any, pair: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """A pair as TRL tokenizes it (the prompt with its generation prompt; the completion mask from
    where prompt and prompt + completion part), cut to ``max_length`` tokens."""

    def chat_ids(messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    prompt_ids = chat_ids(pair["prompt"], add_generation_prompt=True)
    ids = chat_ids(pair["prompt"] + pair["completion"])
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    mask = [0] * shared + [1] * (len(ids) - shared)
    return {"input_ids": ids[:max_length], "completion_mask": mask[:max_length]}


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded held-out split: the same data and seed always give the same split."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = math.ceil(len(pairs) * eval_fraction) if eval_fraction > 0 else 0
    held_out = min(held_out, len(pairs) - 1)
    eval_ids = set(order[:held_out])
    return [p for i, p in enumerate(pairs) if i not in eval_ids], [p for i, p in enumerate(pairs) if i in eval_ids]


# Model -----------------------------------------------------------------------------------------


def torch_dtype(precision: str) -> Any:
    import torch

    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_student(train: TrainConfig, adapter: Path | None = None, trainable: bool = False) -> tuple[Any, Any, Path]:
    """The student (and its tokenizer) from an alias, a directory or a hub id; with ``adapter``
    loaded on top. A tokenizer without a chat template gets distill's default one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(train.student)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=train.trust_remote_code)
    if tokenizer.chat_template is None:
        from distill_prompts import read_prompt

        tokenizer.chat_template = read_prompt("chat_templates/default.jinja")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(train.precision), trust_remote_code=train.trust_remote_code, use_safetensors=True
    )
    if adapter is not None:
        from peft import PeftModel

        require_safetensors(adapter, "adapter")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return model, tokenizer, Path(path)


def lora_config(train: TrainConfig, model: Any) -> Any:
    """The peft LoraConfig, after checking that the target modules exist in this model."""
    import torch
    from peft import LoraConfig

    targets = train.lora.target_modules
    if targets != "all-linear":
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        missing = [t for t in targets if t not in linear]
        if missing:
            raise ConfigError(
                [
                    f"train.lora.target_modules: {', '.join(missing)} not in {type(model).__name__}; "
                    f"its linear layers: {', '.join(linear)} (or use all-linear)"
                ]
            )
    return LoraConfig(
        r=train.lora.r,
        lora_alpha=train.lora.alpha,
        lora_dropout=train.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


# Logging, progress and the card ----------------------------------------------------------------


def make_callbacks(output_dir: Path, progress: bool) -> list[Any]:
    from transformers import TrainerCallback

    from distill.progress import StageProgress

    class MetricsAndProgress(TrainerCallback):
        """metrics.jsonl (one line per log, trimmed to the checkpoint on resume) and a progress bar
        with step, loss or reward, tokens/s and ETA."""

        def __init__(self) -> None:
            self.bar: StageProgress | None = None
            self.started = 0.0
            self.start_tokens = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = output_dir / METRICS
            if path.exists() and state.is_world_process_zero:  # drop lines past the checkpoint we resume from
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= state.global_step
                ]
                write_atomic(path, "".join(line + "\n" for line in kept))
            self.started = time.perf_counter()
            if progress and state.is_world_process_zero:
                self.bar = StageProgress("train", state.max_steps, "steps").start()
                self.bar.update(state.global_step)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "time": round(time.perf_counter() - self.started, 3), **logs}
            with (output_dir / METRICS).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.bar is not None:
                parts = []
                if "loss" in logs:
                    parts.append(f"loss {logs['loss']:.3f}")
                if "reward" in logs:
                    parts.append(f"reward {logs['reward']:.3f}")
                if "num_tokens" in logs:
                    if not self.start_tokens:
                        self.start_tokens = float(logs["num_tokens"])
                    seconds = time.perf_counter() - self.started
                    parts.append(f"{(float(logs['num_tokens']) - self.start_tokens) / max(seconds, 1e-9):.0f} tok/s")
                self.bar.update(state.global_step, "  ".join(parts))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step)
                self.bar.stop()

    return [MetricsAndProgress()]


def write_card(output_dir: Path, config: DistillConfig, stage: str, summary: dict[str, Any]) -> None:
    from distill_prompts import render

    text = render(
        "cards/adapter.md.jinja",
        config=config,
        stage=stage,
        summary=summary,
        command=" ".join(["distill", *sys.argv[1:]]),
        rubrics=[spec.rubric or spec.type for spec in config.judge.judges],
    )
    write_atomic(output_dir / "README.md", text)


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (set before the Trainer exists), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def resume_checkpoint(output_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from (or None). Refuses to silently mix two runs in one directory
    and checkpoints whose weights are pickles. Changes nothing: it runs before the model loads."""
    from transformers.trainer_utils import get_last_checkpoint

    if overwrite:
        return None
    checkpoints = output_dir / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is not None and not resume:
        raise DistillError(
            f"{output_dir} has checkpoints of an earlier run ({Path(last).name}): "
            "pass --resume to continue it or --overwrite to start over"
        )
    if (output_dir / "adapter_model.safetensors").exists() and not resume:
        raise DistillError(f"{output_dir} already holds a trained adapter: pass --overwrite to train again")
    if last is not None:
        require_safetensors(Path(last), "checkpoint")
    return last


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    """Empty the output dir for --overwrite and create it, once every check has passed."""
    if overwrite and is_main_process():
        empty_directory(output_dir)  # keeps the lock file: deleting it would let a second writer in
    output_dir.mkdir(parents=True, exist_ok=True)


def trainer_arguments(config: DistillConfig, output_dir: Path, logging_steps: int, save_steps: int) -> dict[str, Any]:
    """TrainingArguments shared by SFT and RL."""
    import torch

    train = config.train
    dtype = torch_dtype(train.precision)
    report_to = [r for r in train.report_to if r != "tensorboard" or _has_tensorboard()]
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "tensorboard")  # transformers 5 reads it from here
    return {
        "output_dir": str(output_dir / CHECKPOINTS),
        "report_to": report_to or "none",
        "logging_steps": logging_steps,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "seed": train.seed,
        "data_seed": train.seed,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning("tensorboard is not installed: train.report_to tensorboard skipped (metrics.jsonl is written)")
        return False
    return True


def quiet(trainer: Any) -> None:
    """No metric dicts printed to stdout: they go to metrics.jsonl, TensorBoard and the progress bar."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


# SFT -------------------------------------------------------------------------------------------


def sft_data(config: DistillConfig) -> Path:
    """The training data: train.sft.data, else the run's generate outputs."""
    if config.train.sft.data is not None:
        return config.train.sft.data
    if config.run_dir is None:
        raise ConfigError(["train.sft.data: required (a generate run dir or a dataset file), or set run_dir"])
    return RunLayout.of(config).generate


def sft_split(config: DistillConfig) -> dict[str, Any] | None:
    """The SFT run's split.json (``data``, ``train`` and ``eval`` ids), or None before SFT ran."""
    sft_dir = RunLayout.of(config).adapter("sft")
    path = sft_dir / SPLIT if sft_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


# Under torchrun / accelerate only rank 0 locks the output dir; the other ranks of the launch write
# under its lock. A second launch on the same dir fails at its rank 0, and the launcher stops the rest.
@locks(lambda config, **_: RunLayout.of(config).adapter("sft") if is_main_process() else None)
def run_sft(
    config: DistillConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """LoRA SFT of the student on the teacher's data; returns the summary."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s, train = config.train.sft, config.train
    data = sft_data(config)
    output_dir = RunLayout.of(config).sft
    pairs = load_pairs(data)  # every data problem surfaces before the model loads
    conditioning = None
    if s.condition_on:  # conditional training: control tags from each row's judgements
        from distill.conditioning import condition_pairs

        pairs, conditioning = condition_pairs(config, pairs)
    train_pairs, eval_pairs = split_pairs(pairs, s.eval_fraction, train.seed)
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)  # before the slow model load
    model, tokenizer, base_path = load_student(train)
    peft_config = lora_config(train, model)
    prepare_output(output_dir, overwrite)
    if is_main_process():
        split = {"data": str(data), "train": [p["id"] for p in train_pairs], "eval": [p["id"] for p in eval_pairs]}
        if conditioning is not None:
            split["conditioning"] = conditioning
        write_atomic(output_dir / SPLIT, json.dumps(split))

    max_length: int | None = s.max_length
    if s.padding_free and not s.packing:
        # TRL cuts to max_length only when it packs; padding-free batches without packing need
        # rows that are tokenized and cut already.
        rows = [tokenized_pair(tokenizer, p, s.max_length) for p in train_pairs + eval_pairs]
        max_length = None
    else:
        rows = [{"prompt": p["prompt"], "completion": p["completion"]} for p in train_pairs + eval_pairs]
    train_dataset = Dataset.from_list(rows[: len(train_pairs)])
    eval_dataset = Dataset.from_list(rows[len(train_pairs) :]) if eval_pairs else None
    args = SFTConfig(
        **trainer_arguments(config, output_dir, s.logging_steps, s.save_steps),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        warmup_steps=s.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        max_length=max_length,
        packing=s.packing,
        padding_free=s.padding_free,
        completion_only_loss=s.completion_only_loss,
        eval_strategy="no",
        save_total_limit=s.save_total_limit,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=make_callbacks(output_dir, progress),
    )
    quiet(trainer)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, output_dir)
    summary = {
        "stage": "sft",
        "student": train.student,
        "base_model_path": str(base_path),
        "data": str(data),
        "rows": {"train": len(train_pairs), "eval": len(eval_pairs)},
        "steps": trainer.state.global_step,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "seconds": round(seconds, 1),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    if conditioning is not None:
        summary["conditioning"] = conditioning
    if trainer.is_world_process_zero():
        _finish(output_dir, config, "sft", summary)
    return summary


def save_adapter(trainer: Any, tokenizer: Any, output_dir: Path) -> None:
    """adapter_model.safetensors + adapter_config.json + tokenizer; no pickles in what users load
    (the Trainer's training_args.bin stays only in the checkpoints, which resume needs)."""
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "training_args.bin").unlink(missing_ok=True)


def _finish(output_dir: Path, config: DistillConfig, stage: str, summary: dict[str, Any]) -> None:
    write_atomic(output_dir / "training_summary.json", json.dumps(summary, indent=2))
    write_card(output_dir, config, stage, summary)
    write_manifest(output_dir, f"train {stage}", config_dump(config), {"summary": summary})


# RL --------------------------------------------------------------------------------------------


def rl_prompts(config: DistillConfig) -> list[list[dict[str, str]]]:
    """Held-in prompts: the SFT run's training split when there is one, else every row."""
    pairs = load_pairs(sft_data(config))
    split = sft_split(config)
    if split is not None:
        train_ids = set(split["train"])
        pairs = [p for p in pairs if p["id"] in train_ids]
    return [p["prompt"] for p in pairs]


def check_rl(config: DistillConfig, require_adapter: bool = True) -> None:
    """Invalid RL setups fail here, before any model loads. ``require_adapter=False`` when the SFT
    adapter will be trained first (distill run)."""
    import trl

    r = config.train.rl
    problems = []
    if r.algorithm == "ppo" and not hasattr(trl, "PPOTrainer"):
        problems.append(
            f"train.rl.algorithm: ppo needs TRL's PPOTrainer, which TRL {trl.__version__} no longer ships "
            "(it also needs a reward *model* and a value model, not judge functions); use grpo or rloo"
        )
    if not config.judge.judges:
        problems.append("judge.judges: RL needs at least one judge as its reward (a rubric, score or rule judge)")
    if r.batch_size % r.num_generations:
        problems.append(
            f"train.rl.batch_size: must be a multiple of num_generations ({r.num_generations}), got {r.batch_size}"
        )
    start_dir = RunLayout.of(config).adapter(r.start_from)  # sft or kd; None for base
    if require_adapter and start_dir is not None and not (start_dir / "adapter_model.safetensors").is_file():
        problems.append(
            f"train.rl.start_from: {r.start_from}, but {start_dir} has no adapter: run `distill train "
            f"{r.start_from}` first or set train.rl.start_from=base"
        )
    if problems:
        raise ConfigError(problems)


def rl_written_dirs(config: DistillConfig) -> list[Path | None]:
    """RL writes its output dir and, checking its judges, the run's calibration answer log."""
    layout = RunLayout.of(config)
    return [layout.adapter("rl"), layout.calibration if config.run_dir is not None else None]


@locks(lambda config, **_: rl_written_dirs(config) if is_main_process() else None)
def run_rl(
    config: DistillConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    judge_teacher: Any = None,
) -> dict[str, Any]:
    """GRPO (or RLOO) of the student against the judges' rewards; returns the summary."""
    from datasets import Dataset

    from distill.calibration import check_rl_judges, refuse, reward_probe
    from distill.ledger import stage_cost
    from distill.rewards import reward_functions

    check_rl(config)
    r, train = config.train.rl, config.train
    layout = RunLayout.of(config)
    output_dir = layout.rl
    rewards, weights = reward_functions(config, teacher=judge_teacher)
    # Can the judges be believed? Gold accuracy first (before the slow model load)...
    calibration_dir = layout.calibration if config.run_dir is not None else None
    warnings, calibration = check_rl_judges(config, calibration_dir, judge_teacher)
    if warnings and not r.allow_weak_judge:
        refuse(warnings)
    prompts = rl_prompts(config)
    start_adapter = layout.adapter(r.start_from) if r.start_from != "base" else None
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)  # before the slow model load
    model, tokenizer, base_path = load_student(train, adapter=start_adapter, trainable=True)
    # ... then do their rewards vary on the policy's own completions? (GRPO learns nothing if not.)
    probe = None
    if r.probe_prompts and checkpoint is None:
        probe = reward_probe(model, tokenizer, prompts, rewards, weights, r, train.seed)
        if probe["problem"]:
            warnings.append(probe["problem"])
            if not r.allow_weak_judge:
                refuse(warnings)
    peft_config = None if start_adapter is not None else lora_config(train, model)
    prepare_output(output_dir, overwrite)

    common = {
        **trainer_arguments(config, output_dir, r.logging_steps, r.save_steps),
        "max_steps": r.max_steps,
        "learning_rate": r.learning_rate,
        "per_device_train_batch_size": r.batch_size,
        "num_generations": r.num_generations,
        "max_completion_length": r.max_completion_length,
        "temperature": r.temperature,
        "beta": r.beta,
        "reward_weights": weights,
        "use_vllm": r.use_vllm,
        "vllm_mode": r.vllm_mode,
        "log_completions": False,
    }
    if r.algorithm == "grpo":
        from trl import GRPOConfig as RLConfig
        from trl import GRPOTrainer as RLTrainer
    else:
        from trl import RLOOConfig as RLConfig  # type: ignore[assignment]
        from trl import RLOOTrainer as RLTrainer  # type: ignore[assignment]
    trainer = RLTrainer(
        model=model,
        reward_funcs=rewards,
        args=RLConfig(**common),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=make_callbacks(output_dir, progress),
    )
    quiet(trainer)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, output_dir)
    panel = rewards[0].panel
    verdicts = panel.judged * len(rewards)
    summary = {
        "stage": "rl",
        "algorithm": r.algorithm,
        "student": train.student,
        "base_model_path": str(base_path),
        "started_from": str(start_adapter) if start_adapter else "base",
        "prompts": len(prompts),
        "steps": trainer.state.global_step,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "seconds": round(seconds, 1),
        "judges": [f.__name__ for f in rewards],
        "invalid_verdict_rate": round(sum(panel.invalid.values()) / verdicts, 4) if verdicts else None,
        "unscorable_rate": round(panel.unscorable / panel.judged, 4) if panel.judged else None,
        "judge_warnings": warnings,  # non-empty only when trained anyway (allow_weak_judge)
        "judge_cost": stage_cost(output_dir, "rl"),  # the RL judge calls, from the ledger
        "reward_probe": probe,
        "judge_calibration": {
            label: {k: entry.get(k) for k in ("accuracy", "interval", "chance", "above_chance")}
            for label, entry in calibration["judges"].items()
            if entry.get("calibrated")
        },
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        _finish(output_dir, config, "rl", summary)
    return summary


# Export ----------------------------------------------------------------------------------------


def export_merged(adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Base model + LoRA adapter → one plain model directory (safetensors) for vLLM and transformers."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (adapter_dir / "adapter_config.json").is_file():
        raise DistillError(f"{adapter_dir}: no adapter_config.json; point at the output dir of `distill train`")
    require_safetensors(adapter_dir, "adapter")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    base = resolve_model(peft_config.base_model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype="auto", trust_remote_code=trust_remote_code, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(staging))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir

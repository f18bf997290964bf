"""`distill train rm`: a reward model from judge comparisons (InstructGPT's second step).

The preference pairs (``distill.preference``: a pairwise judge's position-consistent A/B verdicts)
train a sequence classifier with one output (TRL ``RewardTrainer``, Bradley-Terry loss
−log σ(r_chosen − r_rejected)): a LoRA adapter on the student (or ``train.rm.model``) plus a new
scalar head (``score``, trained in full through peft's ``modules_to_save``). Safetensors only.

Measured after training, on the seeded held-out pairs: **pairwise accuracy against the judge's
verdicts** (the share of held-out pairs where the RM scores the judge's choice higher; equal scores
count 1/2, chance 1/2) with a 95% bootstrap interval, the same before training (the random head) and
on the training pairs; and, when the judge's rubric has gold pairs (``prompts/gold/*_pairs.jsonl``),
**agreement with the gold set**, beside the judge's own gold accuracy where a calibration ran.

``RewardScorer`` loads a trained RM directory for scoring; the ``reward_model`` judge plugin
(``plugins/reward_model_judge.py``) wraps it, so `train rl` uses it like any judge.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, TrainConfig, config_dump
from distill.errors import ConfigError
from distill.models import require_safetensors, resolve_model
from distill.paths import RunLayout
from distill.runlock import locks
from distill.runstore import write_atomic, write_manifest
from distill.train import (
    is_main_process,
    lora_config,
    make_callbacks,
    prepare_output,
    quiet,
    resume_checkpoint,
    save_adapter,
    torch_dtype,
    trainer_arguments,
)

RM_INFO = "reward_model.json"
"""What a reward model directory was trained from: base model, source judge, rubric, held-out accuracy."""


# Loading and scoring ---------------------------------------------------------------------------


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with distill's default chat template when it has none and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        from distill_prompts import read_prompt

        tokenizer.chat_template = read_prompt("chat_templates/default.jinja")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str | Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A one-output sequence classifier on a causal LM's weights (its ``score`` head newly made)."""
    import logging

    from transformers import AutoModelForSequenceClassification

    # transformers warns that the score head is newly initialised: it is, by design (trained below).
    quiet_logger = logging.getLogger("transformers.modeling_utils")
    level = quiet_logger.level
    quiet_logger.setLevel(logging.ERROR)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    finally:
        quiet_logger.setLevel(level)


def chat_ids(tokenizer: Any, prompt: Any, response: str, max_length: int) -> list[int]:
    """Token ids of (prompt, response) exactly as TRL's RewardTrainer tokenizes a conversational pair
    (``apply_chat_template`` of prompt + answer), cut to ``max_length`` (TRL leaves longer pairs out of
    training; a scorer must still score them)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    messages = [*messages, {"role": "assistant", "content": response}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return list(ids)[:max_length]


def score_texts(
    model: Any, tokenizer: Any, prompts: list[Any], responses: list[str], batch_size: int = 8, max_length: int = 1024
) -> list[float]:
    """The model's scalar reward for each (prompt, response), in eval mode, right-padded batches (the
    classifier reads the last non-pad token, as in training)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = [
                chat_ids(tokenizer, p, r, max_length)
                for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
            ]
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores += [float(v) for v in logits[:, 0].float().cpu()]
    model.train(was_training)
    return scores


class RewardScorer:
    """A reward model directory written by `distill train rm`, loaded for scoring (the LoRA adapter
    merged into the base for speed)."""

    def __init__(self, directory: Path, batch_size: int = 8, max_length: int = 1024):
        from peft import PeftModel

        if not (directory / RM_INFO).is_file() or not (directory / "adapter_config.json").is_file():
            raise ConfigError([f"{directory}: not a reward model (no {RM_INFO}): train one with `distill train rm`"])
        require_safetensors(directory, "reward model")
        self.directory = directory
        self.info = json.loads((directory / RM_INFO).read_text())
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = load_tokenizer(directory)
        base = self.info.get("base_model_path") or resolve_model(self.info["base_model"])
        model = load_classifier(base, torch_dtype("auto"))
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload().eval()
        import torch

        if torch.cuda.is_available():
            self.model.to("cuda")

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        return score_texts(self.model, self.tokenizer, prompts, responses, self.batch_size, self.max_length)


# Training --------------------------------------------------------------------------------------


def reward_base(config: DistillConfig) -> str:
    return config.train.rm.model or config.train.student


def load_reward_base(name: str, train: TrainConfig) -> tuple[Any, Any, Path]:
    path = resolve_model(name)
    tokenizer = load_tokenizer(path, train.trust_remote_code)
    model = load_classifier(path, torch_dtype(train.precision), train.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, Path(path)


def reward_lora(train: TrainConfig, model: Any) -> Any:
    """The student's LoRA settings on a sequence classifier: the head (``score``) trained in full."""
    return replace(lora_config(train, model), task_type="SEQ_CLS", modules_to_save=["score"])


def pair_scores(
    model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int, max_length: int
) -> tuple[list[float], list[float]]:
    """RM scores of the chosen (better) and rejected (worse) answers of ``pairs``."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score_texts(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size, max_length)
    rejected = score_texts(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size, max_length)
    return chosen, rejected


def gold_agreement(
    model: Any, tokenizer: Any, rubric_name: str | None, resamples: int, batch_size: int, max_length: int
) -> dict[str, Any] | None:
    """Accuracy on the rubric's hand-written gold pairs (better/worse), or None without gold pairs."""
    from distill.calibration import pair_accuracy, read_gold
    from distill.judge import load_rubric

    if rubric_name is None:
        return None
    rubric = load_rubric(rubric_name)
    path = rubric.resolve(rubric.gold_pairs)
    if path is None or not path.is_file():
        return None
    gold = read_gold(path, ("prompt", "better", "worse"))
    pairs = [{"prompt": row["prompt"], "chosen": row["better"], "rejected": row["worse"]} for row in gold]
    better, worse = pair_scores(model, tokenizer, pairs, batch_size, max_length)
    return {"gold": str(path), **pair_accuracy(better, worse, resamples)}


def judge_gold_accuracy(config: DistillConfig, judge_label: str | None) -> dict[str, Any] | None:
    """The source judge's own accuracy on the same gold pairs, from the run's calibration (if it ran)."""
    from distill.calibration import CALIBRATION

    if config.run_dir is None or judge_label is None:
        return None
    path = RunLayout.of(config).calibration / CALIBRATION
    if not path.is_file():
        return None
    entry = json.loads(path.read_text())["judges"].get(judge_label)
    if not entry or not entry.get("calibrated"):
        return None
    return {k: entry.get(k) for k in ("accuracy", "interval", "chance", "above_chance", "items")}


@locks(lambda config, **_: RunLayout.of(config).adapter("rm") if is_main_process() else None)
def run_rm(
    config: DistillConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train the reward model on the preference pairs; returns the summary (held-out accuracy)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from distill.calibration import pair_accuracy
    from distill.preference import conversational, load_preferences, write_preferences

    r, train = config.train.rm, config.train
    output_dir = RunLayout.of(config).rm
    preferences = load_preferences(config)  # data problems surface before the model loads
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)
    model, tokenizer, base_path = load_reward_base(reward_base(config), train)
    peft_config = reward_lora(train, model)
    prepare_output(output_dir, overwrite)
    preference_summary = write_preferences(output_dir, preferences) if is_main_process() else {}
    args = RewardConfig(
        **trainer_arguments(config, output_dir, r.logging_steps, r.save_steps),
        num_train_epochs=r.epochs,
        max_steps=r.max_steps,
        learning_rate=r.learning_rate,
        warmup_steps=r.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        per_device_train_batch_size=r.batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        max_length=r.max_length,
        gradient_checkpointing=False,  # TRL's default (True) slows small CPU runs down and buys nothing
        save_total_limit=r.save_total_limit,
        eval_strategy="no",
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([conversational(p) for p in preferences["train"]]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=make_callbacks(output_dir, progress),
    )
    quiet(trainer)
    too_long = len(preferences["train"]) - len(trainer.train_dataset)
    batch, length, resamples = r.batch_size, 4 * r.max_length, config.eval.bootstrap
    held_out = preferences["eval"]
    before = None
    if held_out and checkpoint is None:  # the random head: what "trained" is compared with
        before = pair_accuracy(*pair_scores(trainer.model, tokenizer, held_out, batch, length), resamples)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    after = (
        pair_accuracy(*pair_scores(trainer.model, tokenizer, held_out, batch, length), resamples) if held_out else None
    )
    fit = pair_accuracy(*pair_scores(trainer.model, tokenizer, preferences["train"], batch, length), resamples)
    gold = gold_agreement(trainer.model, tokenizer, preferences["rubric"], resamples, batch, length)
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, output_dir)
    summary = {
        "stage": "rm",
        "base_model": reward_base(config),
        "base_model_path": str(base_path),
        "preferences": preference_summary,
        "left_out_too_long": too_long,
        "steps": trainer.state.global_step,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "seconds": round(seconds, 1),
        "heldout": {"before": before, "after": after},
        "train_accuracy": fit,
        "gold": gold,
        "judge_gold": judge_gold_accuracy(config, preferences["judge"]),
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        info = {
            "base_model": reward_base(config),
            "base_model_path": str(base_path),
            "judge": preferences["judge"],
            "rubric": preferences["rubric"],
            "heldout_accuracy": after["accuracy"] if after else None,
        }
        write_atomic(output_dir / RM_INFO, json.dumps(info, indent=2))
        finish(output_dir, config, "rm", summary)
    return summary


def finish(output_dir: Path, config: DistillConfig, stage: str, summary: dict[str, Any]) -> None:
    """training_summary.json, the model card (RM or DPO) and the manifest."""
    from distill_prompts import render

    write_atomic(output_dir / "training_summary.json", json.dumps(summary, indent=2))
    command = " ".join(["distill", *sys.argv[1:]])
    card = render("cards/preference.md.jinja", config=config, stage=stage, summary=summary, command=command)
    write_atomic(output_dir / "README.md", card)
    write_manifest(output_dir, f"train {stage}", config_dump(config), {"summary": summary})


def preference_training(layout: RunLayout) -> dict[str, Any]:
    """For the report: what the reward model and DPO stages measured (from their training summaries)."""
    found: dict[str, Any] = {}
    for stage in ("rm", "dpo"):
        directory = layout.adapter(stage)
        path = directory / "training_summary.json" if directory is not None else None
        if path is not None and path.is_file():
            summary = json.loads(path.read_text())
            keep = ("preferences", "heldout", "train_accuracy", "gold", "judge_gold", "train_margins", "loss_type")
            found[stage] = {key: summary.get(key) for key in keep if key in summary}
            counts = (summary.get("preferences") or {}).get("counts") or {}
            found[stage]["left_out"] = {  # every judgement that gave no pair, by why (zeros dropped)
                what: n for what, n in counts.items() if n and what not in ("judged", "kept", "chosen_a", "chosen_b")
            }
    return found

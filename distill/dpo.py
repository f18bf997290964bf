"""`distill train dpo`: Direct Preference Optimization (and its cousins: IPO, hinge/SLiC, robust DPO, ...
through TRL's ``loss_type``) on the judge's preference pairs, with TRL's ``DPOTrainer`` and LoRA.

The reference is where DPO starts (``train.dpo.start_from``): the SFT adapter, which DPO keeps
training while TRL holds a frozen copy of it (a second peft adapter named ``ref``, no second model in
memory); or the base student, with a new adapter (the reference is the base, adapters disabled).
Each step logs TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (β × the policy's
log-ratio to the reference, chosen minus rejected) and ``rewards/accuracies``. After training, the
same implicit reward margin is measured on the seeded held-out pairs (the RM's held-out pairs), with
a 95% bootstrap interval: before training it is 0 by construction (the policy *is* the reference).
The saved adapter (``default`` only, not the frozen ``ref`` copy) loads like the SFT adapter, so eval
and the report compare the DPO student as one more tuned model.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from distill.config import DistillConfig
from distill.errors import ConfigError
from distill.paths import RunLayout
from distill.runlock import locks
from distill.train import (
    is_main_process,
    load_student,
    lora_config,
    make_callbacks,
    prepare_output,
    quiet,
    resume_checkpoint,
    save_adapter,
    tokenized_pair,
    trainer_arguments,
)


def check_dpo(config: DistillConfig, require_adapter: bool = True) -> None:
    """Before any model loads: the SFT adapter DPO starts from exists (unless it is trained first in
    this run: ``require_adapter=False``)."""
    d = config.train.dpo
    if d.start_from == "sft" and require_adapter:
        sft = RunLayout.of(config).sft
        if not (sft / "adapter_model.safetensors").is_file():
            raise ConfigError(
                [
                    f"train.dpo.start_from: sft, but {sft} has no adapter: run `distill train sft` first or set "
                    "train.dpo.start_from=base"
                ]
            )


def sequence_logps(model: Any, tokenizer: Any, prompt: str, answer: str, max_length: int) -> float:
    """Sum of the model's log-probabilities of ``answer``'s tokens after ``prompt`` (chat template)."""
    import torch

    pair = {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}
    row = tokenized_pair(tokenizer, pair, max_length)
    device = next(model.parameters()).device
    ids = torch.tensor([row["input_ids"]], device=device)
    mask = torch.tensor(row["completion_mask"][1:], dtype=torch.bool, device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    chosen = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(chosen[mask].sum())


def heldout_margins(
    model: Any, tokenizer: Any, pairs: list[dict[str, Any]], beta: float, max_length: int, resamples: int
) -> dict[str, Any] | None:
    """DPO's implicit reward margin on held-out pairs: β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))],
    its mean with a 95% bootstrap interval, and the share of pairs with a positive margin (the policy moved
    toward the judge's choice relative to the reference) with its interval."""
    import torch
    from trl.trainer.utils import use_adapter

    from distill.stats import bootstrap_interval, mean

    if not pairs:
        return None
    reference = "ref" if "ref" in model.peft_config else None  # None: adapters disabled, the base model
    was_training = model.training
    model.eval()
    margins = []
    with torch.no_grad():
        for pair in pairs:
            policy = [
                sequence_logps(model, tokenizer, pair["prompt"], pair[k], max_length) for k in ("chosen", "rejected")
            ]
            with use_adapter(model, reference):
                ref = [
                    sequence_logps(model, tokenizer, pair["prompt"], pair[k], max_length)
                    for k in ("chosen", "rejected")
                ]
            margins.append(beta * ((policy[0] - ref[0]) - (policy[1] - ref[1])))
    model.train(was_training)
    positive = [float(m > 0) for m in margins]
    return {
        "pairs": len(pairs),
        "margin": mean(margins),
        "margin_interval": list(bootstrap_interval(margins, resamples)),
        "accuracy": mean(positive),
        "accuracy_interval": list(bootstrap_interval(positive, resamples)),
    }


def logged_margins(output_dir: Path) -> list[float]:
    """TRL's rewards/margins per logged training step, from metrics.jsonl."""
    import json

    path = output_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [row["rewards/margins"] for row in rows if "rewards/margins" in row]


@locks(lambda config, **_: RunLayout.of(config).adapter("dpo") if is_main_process() else None)
def run_dpo(
    config: DistillConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """DPO of the student on the preference pairs; returns the summary."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from distill.preference import conversational, load_preferences, write_preferences
    from distill.reward_model import finish

    check_dpo(config)
    d, train = config.train.dpo, config.train
    layout = RunLayout.of(config)
    output_dir = layout.dpo
    preferences = load_preferences(config)  # data problems surface before the model loads
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)
    start = layout.sft if d.start_from == "sft" else None
    model, tokenizer, base_path = load_student(train, adapter=start, trainable=True)
    peft_config = None if start is not None else lora_config(train, model)
    prepare_output(output_dir, overwrite)
    preference_summary = write_preferences(output_dir, preferences) if is_main_process() else {}
    args = DPOConfig(
        **trainer_arguments(config, output_dir, d.logging_steps, d.save_steps),
        num_train_epochs=d.epochs,
        max_steps=d.max_steps,
        learning_rate=d.learning_rate,
        warmup_steps=d.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        per_device_train_batch_size=d.batch_size,
        gradient_accumulation_steps=d.gradient_accumulation_steps,
        max_length=d.max_length,
        beta=d.beta,
        loss_type=[d.loss_type],
        gradient_checkpointing=False,  # TRL's default (True) slows small CPU runs down and buys nothing
        save_total_limit=d.save_total_limit,
        eval_strategy="no",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([conversational(p) for p in preferences["train"]]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=make_callbacks(output_dir, progress),
    )
    quiet(trainer)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    held_out = heldout_margins(
        trainer.model, tokenizer, preferences["eval"], d.beta, d.max_length, config.eval.bootstrap
    )
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, output_dir)
        shutil.rmtree(output_dir / "ref", ignore_errors=True)  # the frozen reference copy is not the student
    margins = logged_margins(output_dir)
    summary = {
        "stage": "dpo",
        "student": train.student,
        "base_model_path": str(base_path),
        "started_from": str(start) if start is not None else "base",
        "loss_type": d.loss_type,
        "beta": d.beta,
        "preferences": preference_summary,
        "steps": trainer.state.global_step,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "seconds": round(seconds, 1),
        # Training pairs, as TRL logged them: step 1 is measured before any update (0 when the policy
        # starts as the reference).
        "train_margins": {"first": margins[0] if margins else None, "last": margins[-1] if margins else None},
        "heldout": held_out,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        finish(output_dir, config, "dpo", summary)
    return summary

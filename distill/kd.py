"""`distill train kd`: distil the teacher's token distributions into the student (same tokenizer).

**offline** (DistillKit-style): the teacher's top-K distributions captured on the kept rows
(``distill.kd_capture``, generate.capture_logprobs) are the targets. Per answer token, both models'
distributions are folded into K+1 buckets (the teacher's top-K tokens and a tail holding the rest of
the mass: exact for the student, 1 − Σ top-K for the teacher), and

    loss = alpha · T² · KL(teacher ‖ student over the K+1 buckets, at temperature T) + (1 − alpha) · CE

with CE the usual next-token cross-entropy on the row's answer. Both terms and their weighted shares
go to metrics.jsonl every logged step (``kd/kl``, ``kd/ce``, ``kd/kl_term``, ``kd/ce_term``,
``kd/kl_share``), so a KD term too small to matter shows. A LoRA adapter, as in SFT.

**on-policy** (GKD): TRL's ``DistillationTrainer`` (the student samples, the teacher, loaded
locally, scores every sampled token; generalized JSD with ``beta``), TRL's experimental
``GKDTrainer`` when ``lmbda`` < 1 (a share of steps on the dataset's answers instead), or TRL's
experimental ``ServerDistillationTrainer`` when ``teacher_server`` points at a vLLM server.

Both modes need the teacher's tokenizer: the check runs before any model loads (``check_kd``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, config_dump
from distill.errors import ConfigError
from distill.kd_capture import (
    CAPTURE,
    LogprobStore,
    ids_hash,
    load_tokenizer,
    rendered_row,
    tokenizer_identity,
    tokenizer_mismatch,
)
from distill.models import resolve_model
from distill.paths import RunLayout
from distill.runlock import locks
from distill.runstore import write_atomic, write_manifest
from distill.train import (
    SPLIT,
    is_main_process,
    load_pairs,
    load_student,
    lora_config,
    make_callbacks,
    prepare_output,
    quiet,
    resume_checkpoint,
    save_adapter,
    sft_data,
    split_pairs,
    torch_dtype,
    trainer_arguments,
)

KD_SHARE_WARNING = 0.05
"""A KD run whose KL term is on average below this share of the loss gets a warning in its summary."""


# Checks (before any model loads) ---------------------------------------------------------------


def logprobs_dir(config: DistillConfig) -> Path:
    """train.kd.logprobs, else the captured logprobs of the training data's generate run."""
    if config.train.kd.logprobs is not None:
        return config.train.kd.logprobs
    data = sft_data(config)
    if data.is_file():
        raise ConfigError([f"train.kd.logprobs: required when the training data ({data}) is not a generate run dir"])
    return RunLayout(run_dir=data).logprobs  # where that generate run captured them


def kd_teacher(config: DistillConfig) -> str:
    """The on-policy teacher: train.kd.teacher, else teacher.model for a local backend."""
    if config.train.kd.teacher is not None:
        return config.train.kd.teacher
    if config.teacher.backend in ("vllm", "transformers"):
        return config.teacher.model
    raise ConfigError(
        [
            f"train.kd.teacher: required for on-policy KD with the {config.teacher.backend} teacher: a local "
            "copy of the teacher (alias or directory) whose tokenizer is checked and, without "
            "train.kd.teacher_server, whose weights are loaded"
        ]
    )


def check_kd(config: DistillConfig, require_capture: bool = True) -> None:
    """Everything that can be wrong with a KD setup, before any model loads: the mode's inputs, and
    that the student and the teacher share a tokenizer (one error line). ``require_capture=False``
    when generate (with capture) hasn't run yet (distill run)."""
    k = config.train.kd
    if k.mode == "on-policy":
        if k.teacher_server is not None and k.lmbda < 1:
            raise ConfigError(["train.kd.lmbda: must be 1 with train.kd.teacher_server (fully on-policy)"])
        teacher = kd_teacher(config)
        student, teacher_tok = load_tokenizer(config.train.student), load_tokenizer(teacher)
        problem = tokenizer_mismatch(
            tokenizer_identity(student), tokenizer_identity(teacher_tok), config.train.student, teacher
        )
        if problem:
            raise ConfigError([problem])
        return
    student = tokenizer_identity(load_tokenizer(config.train.student, config.train.trust_remote_code))
    directory = logprobs_dir(config)
    if require_capture or (directory / CAPTURE).is_file():
        manifest = LogprobStore(directory).manifest()
        teacher, teacher_name = manifest["tokenizer"], manifest["source"]["model"]
    else:  # generate captures later in this run: check the tokenizer it will render with
        if not config.generate.capture_logprobs:
            raise ConfigError(
                ["generate.capture_logprobs: offline KD needs the teacher's captured logprobs: set it (e.g. 20)"]
            )
        teacher_name = config.generate.capture_tokenizer or config.teacher.model
        if config.generate.capture_tokenizer is None and config.teacher.backend not in ("vllm", "transformers"):
            return  # generate refuses this capture itself (it needs generate.capture_tokenizer)
        teacher = tokenizer_identity(load_tokenizer(teacher_name))
    problem = tokenizer_mismatch(student, teacher, config.train.student, teacher_name)
    if problem:
        raise ConfigError([problem])


# Data ------------------------------------------------------------------------------------------


def kd_rows(
    tokenizer: Any, pairs: list[dict[str, Any]], store: LogprobStore, max_length: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training rows: the student's rendering of each pair (cut to ``max_length``) with the
    teacher's top-K arrays for its answer tokens; and why other rows were left out (not captured,
    rendered to other token ids than the teacher scored, answer cut off entirely)."""
    import numpy as np

    rows, skipped = [], {}
    for pair in pairs:
        stored = store.get(pair["id"])
        ids, start = rendered_row(tokenizer, pair)
        reason = None
        if stored is None:
            reason = "not_captured"
        elif ids_hash(ids) != stored.ids_sha or start != stored.answer_start:
            reason = "rendering_mismatch"
        elif start >= min(len(ids), max_length):
            reason = "answer_cut_off"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        length = min(len(ids), max_length)
        rows.append(
            {
                "id": pair["id"],
                "input_ids": ids[:length],
                "answer_start": start,
                "top_ids": np.asarray(stored.top_ids[: length - start], dtype=np.int64),
                "top_logprobs": np.asarray(stored.top_logprobs[: length - start], dtype=np.float32),
            }
        )
    return rows, skipped


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch: input_ids, attention_mask, answer_mask (1 on answer tokens) and the
    teacher's arrays at the answer tokens' positions (zeros elsewhere)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    k = rows[0]["top_ids"].shape[1]
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "answer_mask": torch.zeros((len(rows), width), dtype=torch.bool),
        "top_ids": torch.zeros((len(rows), width, k), dtype=torch.long),
        "top_logprobs": torch.zeros((len(rows), width, k), dtype=torch.float32),
    }
    for i, row in enumerate(rows):
        n, start = len(row["input_ids"]), row["answer_start"]
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["answer_mask"][i, start:n] = True
        batch["top_ids"][i, start:n] = torch.from_numpy(row["top_ids"])
        batch["top_logprobs"][i, start:n] = torch.from_numpy(row["top_logprobs"])
    return batch


# The loss --------------------------------------------------------------------------------------


def student_buckets(logits: Any, top_ids: Any) -> Any:
    """Student log-probabilities of the teacher's top-K tokens and of everything else (the tail),
    [N, K+1], exact: the tail is a logsumexp over the logits outside the K ids."""
    import torch

    norm = logits.logsumexp(-1, keepdim=True)
    top = logits.gather(-1, top_ids) - norm
    tail = logits.scatter(-1, top_ids, float("-inf")).logsumexp(-1, keepdim=True) - norm
    return torch.cat([top, tail], -1)


def teacher_buckets(top_logprobs: Any) -> Any:
    """Teacher log-probabilities of its top-K tokens and of the tail (1 − their mass), [N, K+1]."""
    import torch

    mass = top_logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)  # fp16 storage can round above 1
    return torch.cat([top_logprobs, torch.log1p(-mass)], -1)


def bucket_kl(teacher: Any, student: Any, temperature: float = 1.0) -> Any:
    """KL(teacher ‖ student) per token over the K+1 buckets, both at ``temperature`` (renormalised
    over the buckets; at T = 1 that changes only the teacher's fp16 rounding)."""
    t = (teacher / temperature).log_softmax(-1)
    s = (student / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)


def loss_terms(model: Any, batch: dict[str, Any], alpha: float, temperature: float) -> dict[str, Any]:
    """Forward the batch; the loss and its parts (tensors) on the answer tokens."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The logits at position p predict the token at p + 1: answer token p is scored by logits p − 1.
    where = batch["answer_mask"][:, 1:]
    chosen = logits[:, :-1][where].float()
    targets = batch["input_ids"][:, 1:][where]
    ce = F.cross_entropy(chosen, targets)
    teacher = teacher_buckets(batch["top_logprobs"][:, 1:][where])
    student = student_buckets(chosen, batch["top_ids"][:, 1:][where])
    kl_tokens = bucket_kl(teacher, student, temperature)
    kl = kl_tokens.mean()
    kl_term, ce_term = alpha * temperature**2 * kl, (1 - alpha) * ce
    row_of = where.nonzero()[:, 0]  # the batch row of every answer token
    return {
        "loss": kl_term + ce_term,
        "kl": kl,
        "ce": ce,
        "kl_term": kl_term,
        "ce_term": ce_term,
        "tail_mass": teacher[:, -1].exp().mean(),
        "top1_agreement": (chosen.argmax(-1) == batch["top_ids"][:, 1:][where][:, 0]).float().mean(),
        "tokens": int(where.sum()),
        "row_kl": kl_tokens.detach().new_zeros(len(where)).index_add(0, row_of, kl_tokens.detach()),
        "row_tokens": where.sum(1),
    }


def heldout_kl(
    model: Any,
    rows: list[dict[str, Any]],
    pad_id: int,
    batch_size: int = 8,
    per_row: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """KL(teacher ‖ student) over the K+1 buckets at T = 1, CE, and top-1 agreement, averaged over
    the answer tokens of ``rows`` (the held-out split), in eval mode; ``per_row`` gets each row's
    (KL summed over its tokens, tokens), for paired intervals."""
    import torch

    if not rows:
        return {"kl": None, "ce": None, "top1_agreement": None, "tokens": 0}
    was_training = model.training
    model.eval()
    totals, tokens = {"kl": 0.0, "ce": 0.0, "top1_agreement": 0.0}, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
            terms = loss_terms(model, batch, alpha=1.0, temperature=1.0)
            for key in totals:
                totals[key] += float(terms[key]) * terms["tokens"]
            tokens += terms["tokens"]
            if per_row is not None:
                per_row += zip(terms["row_kl"].tolist(), terms["row_tokens"].tolist())
    model.train(was_training)
    return {**{key: round(value / tokens, 5) for key, value in totals.items()}, "tokens": tokens}


def make_kd_trainer(alpha: float, temperature: float, pad_id: int, **kwargs: Any) -> Any:
    """A transformers ``Trainer`` whose loss is ``loss_terms`` and whose logs carry its parts."""
    from transformers import Trainer

    class KDTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a mean per batch: the Trainer divides by the accumulation steps

        def __init__(self, **inner: Any) -> None:
            super().__init__(**inner)
            self.kd_metrics: dict[str, list[float]] = {}

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            terms = loss_terms(model, inputs, alpha, temperature)
            if model.training:
                for key in ("kl", "ce", "kl_term", "ce_term", "tail_mass", "top1_agreement"):
                    self.kd_metrics.setdefault(key, []).append(float(terms[key].detach()))
            return (terms["loss"], None) if return_outputs else terms["loss"]

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.kd_metrics and "loss" in logs:
                means = {key: sum(v) / len(v) for key, v in self.kd_metrics.items()}
                logs.update({f"kd/{key}": round(value, 6) for key, value in means.items()})
                total = means["kl_term"] + means["ce_term"]
                logs["kd/kl_share"] = round(means["kl_term"] / total, 6) if total > 0 else None
                self.kd_metrics = {}
            super().log(logs, start_time)

    return KDTrainer(data_collator=lambda rows: collate(rows, pad_id), **kwargs)


# The runs --------------------------------------------------------------------------------------


@locks(lambda config, **_: RunLayout.of(config).adapter("kd") if is_main_process() else None)
def run_kd(
    config: DistillConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """`distill train kd` in train.kd.mode; returns the summary."""
    check_kd(config)
    if config.train.kd.mode == "offline":
        return _offline(config, resume, overwrite, progress)
    return _on_policy(config, resume, overwrite, progress)


def _split(config: DistillConfig) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """The data and its seeded split (the same as SFT's with the same eval_fraction and seed)."""
    data = sft_data(config)
    pairs = load_pairs(data)
    train_pairs, eval_pairs = split_pairs(pairs, config.train.kd.eval_fraction, config.train.seed)
    return data, train_pairs, eval_pairs


def _write_split(output_dir: Path, data: Path, train_ids: list[str], eval_ids: list[str]) -> None:
    if is_main_process():
        write_atomic(output_dir / SPLIT, json.dumps({"data": str(data), "train": train_ids, "eval": eval_ids}))


def _loss_scales(output_dir: Path) -> dict[str, Any]:
    """Mean KL and CE terms over the logged steps, and the KL term's share of the loss."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [row["kd/kl_share"] for row in rows if row.get("kd/kl_share") is not None]
    means = {
        key: round(sum(v) / len(v), 6) if (v := [row[f"kd/{key}"] for row in rows if f"kd/{key}" in row]) else None
        for key in ("kl", "ce", "kl_term", "ce_term")
    }
    return {**means, "kl_share": round(sum(shares) / len(shares), 6) if shares else None}


def _offline(config: DistillConfig, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    from transformers import TrainingArguments

    train, k = config.train, config.train.kd
    output_dir = RunLayout.of(config).kd
    data, train_pairs, eval_pairs = _split(config)
    store = LogprobStore(logprobs_dir(config))
    manifest = store.manifest()
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)  # before the slow model load
    model, tokenizer, base_path = load_student(train)
    train_rows, skipped = kd_rows(tokenizer, train_pairs, store, k.max_length)
    eval_rows, eval_skipped = kd_rows(tokenizer, eval_pairs, store, k.max_length)
    if len(train_rows) < 1:
        raise ConfigError([f"train.kd: no training row has captured logprobs that fit (left out: {skipped})"])
    prepare_output(output_dir, overwrite)
    _write_split(output_dir, data, [r["id"] for r in train_rows], [r["id"] for r in eval_rows])
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(train.seed)  # the adapter's random init: the same whatever ran before in this process
    model = get_peft_model(model, lora_config(train, model))
    pad_id = tokenizer.pad_token_id
    base_rows: list[tuple[float, int]] = []
    before = heldout_kl(model, eval_rows, pad_id, k.batch_size, base_rows) if checkpoint is None else None
    args = TrainingArguments(
        **trainer_arguments(config, output_dir, k.logging_steps, k.save_steps),
        num_train_epochs=k.epochs,
        max_steps=k.max_steps,
        learning_rate=k.learning_rate,
        warmup_steps=k.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        per_device_train_batch_size=k.batch_size,
        gradient_accumulation_steps=k.gradient_accumulation_steps,
        remove_unused_columns=False,
        eval_strategy="no",
        save_total_limit=k.save_total_limit,
    )
    trainer = make_kd_trainer(
        k.alpha,
        k.temperature,
        pad_id,
        model=model,
        args=args,
        train_dataset=train_rows,
        callbacks=make_callbacks(output_dir, progress),
    )
    quiet(trainer)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    kd_by_row: list[tuple[float, int]] = []
    after = heldout_kl(model, eval_rows, pad_id, k.batch_size, kd_by_row)
    compared = compare_heldout(config, eval_pairs, eval_rows, pad_id, base_rows, kd_by_row)
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, output_dir)
    scales = _loss_scales(output_dir)
    summary = {
        "stage": "kd",
        "mode": "offline",
        "student": train.student,
        "base_model_path": str(base_path),
        "data": str(data),
        "logprobs": str(store.dir),
        "k": manifest["k"],
        "alpha": k.alpha,
        "temperature": k.temperature,
        "rows": {"train": len(train_rows), "eval": len(eval_rows)},
        "left_out": {"train": skipped, "eval": eval_skipped},
        "steps": trainer.state.global_step,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "seconds": round(seconds, 1),
        "heldout": {"before": before, "after": after, **compared},
        "loss_scales": scales,
        "warnings": _scale_warnings(k.alpha, scales),
        "metrics": {key: v for key, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        finish(output_dir, config, summary)
    return summary


def finish(output_dir: Path, config: DistillConfig, summary: dict[str, Any]) -> None:
    """training_summary.json, the model card and the manifest."""
    import sys

    from distill_prompts import render

    write_atomic(output_dir / "training_summary.json", json.dumps(summary, indent=2))
    command = " ".join(["distill", *sys.argv[1:]])
    write_atomic(
        output_dir / "README.md", render("cards/kd_adapter.md.jinja", config=config, summary=summary, command=command)
    )
    write_manifest(output_dir, "train kd", config_dump(config), {"summary": summary})


def compare_heldout(
    config: DistillConfig,
    eval_pairs: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    pad_id: int,
    base: list[tuple[float, int]],
    kd: list[tuple[float, int]],
) -> dict[str, Any]:
    """Paired 95% bootstrap intervals (the held-out rows resampled together) of the token-weighted
    held-out KL of the KD student minus the base's, and, when an SFT adapter was trained on the same
    split (train.method sft+kd), the SFT adapter's held-out KL and KD minus SFT."""
    from distill.stats import paired_bootstrap

    tokens = [n for _, n in kd]

    def interval(before: list[tuple[float, int]]) -> list[float] | None:
        found, _ = paired_bootstrap([[s for s, _ in before], [s for s, _ in kd], tokens], lambda b, a, t: (a - b) / t)
        return [round(v, 5) for v in found] if found else None

    compared: dict[str, Any] = {}
    if base and kd:
        compared["kd_minus_base_interval"] = interval(base)
    sft = RunLayout.of(config).adapter("sft")
    if not kd or sft is None or not (sft / "adapter_model.safetensors").is_file() or not (sft / SPLIT).is_file():
        return compared
    if set(json.loads((sft / SPLIT).read_text())["eval"]) != {p["id"] for p in eval_pairs}:
        return compared  # another held-out split: not comparable row by row
    model, _, _ = load_student(config.train, adapter=sft)
    sft_rows: list[tuple[float, int]] = []
    compared["sft"] = heldout_kl(model, eval_rows, pad_id, config.train.kd.batch_size, sft_rows)
    compared["kd_minus_sft_interval"] = interval(sft_rows)
    return compared


def _scale_warnings(alpha: float, scales: dict[str, Any]) -> list[str]:
    share = scales.get("kl_share")
    if alpha > 0 and share is not None and share < KD_SHARE_WARNING:
        return [
            f"the KL term was on average {share:.1%} of the loss (alpha {alpha}): the distillation signal was "
            "negligible next to cross-entropy; raise train.kd.alpha or train.kd.temperature"
        ]
    return []


def answer_logprob(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], max_length: int = 512) -> float | None:
    """Mean per-token logprob the model gives the pairs' answers (teacher forcing), or None."""
    import torch

    from distill.train import tokenized_pair

    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for pair in pairs:
            row = tokenized_pair(tokenizer, pair, max_length)
            ids = torch.tensor([row["input_ids"]], device=device)
            mask = torch.tensor(row["completion_mask"][1:], dtype=torch.bool, device=device)
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            chosen = logp.gather(-1, ids[0, 1:, None])[:, 0][mask]
            total, tokens = total + float(chosen.sum()), tokens + int(mask.sum())
    model.train(was_training)
    return round(total / tokens, 5) if tokens else None


def _on_policy(config: DistillConfig, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    from datasets import Dataset

    train, k = config.train, config.train.kd
    output_dir = RunLayout.of(config).kd
    data, train_pairs, eval_pairs = _split(config)
    teacher_name = kd_teacher(config)
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)  # before the slow model load
    model, tokenizer, base_path = load_student(train)
    tokenizer.padding_side = "left"  # TRL samples with left-padded prompts
    peft_config = lora_config(train, model)
    prepare_output(output_dir, overwrite)
    _write_split(output_dir, data, [p["id"] for p in train_pairs], [p["id"] for p in eval_pairs])
    before = answer_logprob(model, tokenizer, eval_pairs, k.max_length) if checkpoint is None else None
    common = {
        **trainer_arguments(config, output_dir, k.logging_steps, k.save_steps),
        "num_train_epochs": k.epochs,
        "max_steps": k.max_steps,
        "learning_rate": k.learning_rate,
        "warmup_steps": k.warmup_ratio,
        "lr_scheduler_type": "linear",
        "per_device_train_batch_size": k.batch_size,
        "gradient_accumulation_steps": k.gradient_accumulation_steps,
        "save_total_limit": k.save_total_limit,
        "gradient_checkpointing": False,  # TRL's default (True) slows small CPU runs down and buys nothing
        "temperature": k.temperature,
        "beta": k.beta,
    }
    prompts = Dataset.from_list([{"prompt": p["prompt"]} for p in train_pairs])
    trainer_name, teacher_model = "", None
    if k.teacher_server is not None:
        from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

        trainer_name = "ServerDistillationTrainer"
        # TRL: forward KL over the server's top-k, or top-1 support for beta > 0.
        args = ServerDistillationConfig(
            **common,
            max_completion_length=k.max_new_tokens,
            teacher_model_server_url=k.teacher_server,
            loss_top_k=20 if k.beta == 0 else 1,
        )
        trainer = ServerDistillationTrainer(
            model=model, args=args, train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config
        )
    else:
        from transformers import AutoModelForCausalLM

        teacher_model = AutoModelForCausalLM.from_pretrained(
            resolve_model(teacher_name), dtype=torch_dtype(train.precision), use_safetensors=True
        )
        if k.lmbda >= 1:
            from trl import DistillationConfig, DistillationTrainer

            trainer_name = "DistillationTrainer"
            args = DistillationConfig(**common, max_completion_length=k.max_new_tokens)
            trainer = DistillationTrainer(
                model=model,
                teacher_model=teacher_model,
                args=args,
                train_dataset=prompts,
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            trainer_name = "GKDTrainer"
            args = GKDConfig(**common, lmbda=k.lmbda, max_new_tokens=k.max_new_tokens, max_length=k.max_length)
            conversations = Dataset.from_list([{"messages": p["prompt"] + p["completion"]} for p in train_pairs])
            trainer = GKDTrainer(
                model=model,
                teacher_model=teacher_model,
                args=args,
                train_dataset=conversations,
                processing_class=tokenizer,
                peft_config=peft_config,
            )
    for callback in make_callbacks(output_dir, progress):
        trainer.add_callback(callback)
    quiet(trainer)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    after = answer_logprob(trainer.model, tokenizer, eval_pairs, k.max_length)
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, output_dir)
    summary = {
        "stage": "kd",
        "mode": "on-policy",
        "trainer": trainer_name,
        "student": train.student,
        "base_model_path": str(base_path),
        "teacher": k.teacher_server or teacher_name,
        "data": str(data),
        "lmbda": k.lmbda,
        "beta": k.beta,
        "temperature": k.temperature,
        "rows": {"train": len(train_pairs), "eval": len(eval_pairs)},
        "steps": trainer.state.global_step,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "seconds": round(seconds, 1),
        # Mean per-token logprob of the held-out rows' answers (the teacher's) under the student.
        "heldout_answer_logprob": {"before": before, "after": after},
        "metrics": {key: v for key, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        finish(output_dir, config, summary)
    return summary

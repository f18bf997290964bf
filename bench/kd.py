"""What distillation from token distributions costs, measured side by side in one run:

- capture overhead on generate: `distill generate` with the in-process vLLM teacher and the same
  requests and seeded answers (fresh run dirs, request cache off, vLLM prefix caching off), without and with
  generate.capture_logprobs=K, alternating (without, with, without); the ratio of wall times, and
  the capture's own seconds inside the capture run;
- bytes per token of the stored capture (shards; and with the index);
- KD step time vs SFT step time on the same rows: `distill train kd --mode offline` and `distill
  train sft` on the captured rows (same student, LoRA, batch, max length, learning rate, steps),
  alternating (sft, kd, sft, kd, ...); per-step times from metrics.jsonl, first step dropped, median.

    python -m bench.kd [--target 24] [--k 20] [--steps 8] [--batch 8] [--max-length 256]
                       [--student DIR] [--repeats 2]

The student defaults to SmolLM2-135M-Instruct pruned to 10 layers (written to the scratch dir).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def generate_run(teacher: Any, run_dir: Path, target: int, k: int) -> tuple[float, dict[str, Any]]:
    from distill.config import load_config
    from distill.generate import run_generate

    settings = [
        f"run_dir={run_dir}",
        "teacher.backend=vllm",
        f"generate.target={target}",
        "generate.batch_size=4",
        "generate.tasks_per_request=3",
        "generate.max_tokens=320",
        "generate.temperature=0.7",
        "teacher.seed=1",  # seeded sampling: both runs get the same answers, keep the same rows
        "generate.cache=false",
        f"generate.capture_logprobs={k}",
    ]
    started = time.perf_counter()
    summary = run_generate(load_config(None, settings), teacher=teacher)
    return time.perf_counter() - started, summary


def step_times(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["time"] for row in rows if "loss" in row]
    return [b - a for a, b in itertools.pairwise(times)]  # the first step (warm-up) has no predecessor


def train_run(stage: str, data: Path, student: Path, out: Path, steps: int, batch: int, max_length: int) -> list[float]:
    from distill.config import load_config
    from distill.kd import run_kd
    from distill.train import run_sft

    common = {
        "run_dir": out,
        "train.student": student,
        "train.sft.data": data,
        "train.lora.dropout": 0,
        "train.report_to": "[]",
    }
    per_stage = {
        "max_steps": steps,
        "batch_size": batch,
        "max_length": max_length,
        "learning_rate": 1e-3,
        "warmup_ratio": 0,
        "eval_fraction": 0.1,
    }
    settings = {**common, **{f"train.{stage}.{key}": value for key, value in per_stage.items()}}
    config = load_config(None, [f"{key}={value}" for key, value in settings.items()])
    if stage == "sft":
        run_sft(config, overwrite=True, progress=False)
        return step_times(out / "sft")
    run_kd(config, overwrite=True, progress=False)
    return step_times(out / "kd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, default=24, help="Rows kept by each generate run.")
    parser.add_argument("--k", type=int, default=20, help="Alternatives captured per token.")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="Training runs of each kind (alternating).")
    parser.add_argument("--student", type=Path, help="Student directory; default: SmolLM2 pruned to 10 layers.")
    args = parser.parse_args()

    from distill.config import TeacherConfig
    from distill.prune import prune_model
    from distill.teacher import load_teacher

    scratch = Path(tempfile.mkdtemp(prefix="bench-kd-"))
    options = {
        "enforce_eager": True,
        "max_model_len": 2048,
        "cpu_kv_cache_gib": 1,
        "engine_args": {"enable_prefix_caching": False},  # a rerun of the same prompts must not be cheaper
    }
    teacher = load_teacher(TeacherConfig(backend="vllm", model="smollm2-135m-instruct", options=options))
    try:
        plain_a, _ = generate_run(teacher, scratch / "plain-a", args.target, 0)
        captured, summary = generate_run(teacher, scratch / "capture", args.target, args.k)
        plain_b, _ = generate_run(teacher, scratch / "plain-b", args.target, 0)
    finally:
        teacher.close()
    capture = summary["logprobs"]
    plain = statistics.mean([plain_a, plain_b])
    print(f"generate, {args.target} rows, vLLM in-process (SmolLM2-135M teacher):")
    print(f"  without capture {plain_a:.1f} s and {plain_b:.1f} s; with capture (K={args.k}) {captured:.1f} s")
    print(f"  capture overhead: {captured / plain:.3f}x the wall time without it")
    print(f"  inside the capture run: scoring {capture['seconds']:.1f} s of {captured:.1f} s")
    print(
        f"  stored: {capture['tokens']} answer tokens, {capture['shard_bytes']} bytes: "
        f"{capture['bytes_per_token']} bytes/token ({capture['bytes_per_token_with_index']} with the index), "
        f"ids {capture['id_dtype']}, logprobs {capture['logprob_dtype']}"
    )

    student = args.student
    if student is None:
        student = scratch / "smollm2-10l"
        prune_model("smollm2-135m-instruct", 10, student)
    data = scratch / "capture"
    times: dict[str, list[float]] = {"sft": [], "kd": []}
    for repeat in range(args.repeats):
        for stage in ("sft", "kd"):
            out = scratch / f"{stage}-{repeat}"
            times[stage] += train_run(stage, data, student, out, args.steps, args.batch, args.max_length)
    sft, kd = statistics.median(times["sft"]), statistics.median(times["kd"])
    print(f"training on the same {capture['rows']} rows ({student}), batch {args.batch}, max length {args.max_length}:")
    print(f"  median step: SFT {sft:.2f} s, offline KD (K={args.k}) {kd:.2f} s: KD/SFT {kd / sft:.3f}")
    print(f"  steps timed: SFT {len(times['sft'])}, KD {len(times['kd'])} (first step of each run dropped)")


if __name__ == "__main__":
    main()

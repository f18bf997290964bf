"""SFT throughput: `distill train sft` vs a plain TRL SFTTrainer script with identical settings on
the same data (same model, LoRA, batch, length, steps, learning rate and precision), plus distill
with packing and with padding-free batches. Each run is a fresh subprocess (clean peak memory);
runs alternate so machine drift hits all of them. Prints tokens/s (real, non-padding tokens, as
TRL counts them), peak RSS, and ratios to the plain TRL script.

The plain script is also run once with TRL's own precision default (`bf16=True` unless fp16): on
a CPU without native bfloat16 that default is what a TRL user gets, and distill's precision
`auto` (float32 there) is the difference.

    python -m bench.sft_throughput [--model smollm2-135m-instruct] [--steps 12] [--repeats 2]
                                   [--batch 8] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(path: Path, rows: int = 256) -> Path:
    """Seed tasks with answers of varied length (padding matters), deterministic."""
    from distill_prompts import PROMPTS_DIR

    seeds = [json.loads(line) for line in (PROMPTS_DIR / "seed_tasks.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    with path.open("w") as handle:
        for i in range(rows):
            seed = seeds[i % len(seeds)]
            output = " ".join([seed["output"]] * rng.choice([1, 1, 2, 3]))
            handle.write(
                json.dumps(
                    {
                        "id": f"r{i}",
                        "instruction": seed["instruction"],
                        "input": seed.get("input", ""),
                        "output": output,
                    }
                )
                + "\n"
            )
    return path


def plain_trl(
    model_name: str, data: Path, out: Path, steps: int, batch: int, max_length: int, trl_precision: bool
) -> dict[str, float]:
    """What a user would write with TRL directly: same model, LoRA, data and SFTConfig; with
    ``trl_precision`` TRL picks the precision (its default), else the one distill picks."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distill.config import TrainConfig
    from distill.models import resolve_model
    from distill.train import torch_dtype

    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch_dtype(TrainConfig().precision)  # what distill's precision auto picks here
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trl_precision else dtype)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows
        ]
    )
    precision = {} if trl_precision else {"bf16": dtype == torch.bfloat16}
    args = SFTConfig(
        **precision,
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-4,
        max_length=max_length,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    tokens = max(float(e.get("num_tokens", 0)) for e in trainer.state.log_history)
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"]}


def distill_sft(
    model_name: str, data: Path, out: Path, steps: int, batch: int, max_length: int, mode: str
) -> dict[str, float]:
    from distill.config import load_config
    from distill.train import run_sft

    overrides = [
        f"run_dir={out}",
        f"train.student={model_name}",
        f"train.sft.data={data}",
        f"train.sft.max_steps={steps}",
        f"train.sft.batch_size={batch}",
        f"train.sft.max_length={max_length}",
        "train.sft.eval_fraction=0",
        "train.sft.warmup_ratio=0",
        "train.sft.save_steps=100000",
        "train.report_to=[]",
        f"train.sft.packing={mode == 'packing'}",
        f"train.sft.padding_free={mode == 'padding_free'}",
    ]
    summary = run_sft(load_config(None, overrides), progress=False)
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    tokens = max(float(r.get("num_tokens", 0)) for r in rows)
    return {"tokens": tokens, "seconds": summary["metrics"]["train_runtime"]}


def one(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.one in ("trl", "trl_defaults"):
            result = plain_trl(
                args.model, Path(args.data), out, args.steps, args.batch, args.max_length, args.one == "trl_defaults"
            )
        else:
            result = distill_sft(args.model, Path(args.data), out, args.steps, args.batch, args.max_length, args.one)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--modes", default="trl,distill,packing,padding_free,trl_defaults", help="Which runs, comma-separated."
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data.jsonl")
        modes = args.modes.split(",")
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:
                if mode == "trl_defaults" and repeat > 0:
                    continue  # slow on CPUs without bfloat16, and only a reference: once is enough
                started = time.perf_counter()
                output = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.sft_throughput",
                        "--one",
                        mode,
                        "--data",
                        str(data),
                        "--model",
                        args.model,
                        "--steps",
                        str(args.steps),
                        "--batch",
                        str(args.batch),
                        "--max-length",
                        str(args.max_length),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                result = json.loads(output.split("RESULT ", 1)[1])
                result["wall_s"] = time.perf_counter() - started
                runs[mode].append(result)
    summary = {}
    for mode, results in runs.items():
        rate = statistics.median(r["tokens"] / r["seconds"] for r in results)
        summary[mode] = {
            "tok_s": round(rate, 1),
            "runs_tok_s": [round(r["tokens"] / r["seconds"], 1) for r in results],
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in results)),
        }
    base = summary["trl"]["tok_s"] if "trl" in summary else None
    print(
        f"\n{args.model}, LoRA r16 all-linear, batch {args.batch}, max_length {args.max_length}, "
        f"{args.steps} steps, median of {args.repeats} (TRL's bf16 default: 1 run)"
    )
    for mode, row in summary.items():
        row["ratio_vs_trl"] = round(row["tok_s"] / base, 3) if base else None
        label = {
            "trl": "plain TRL SFTTrainer",
            "trl_defaults": "plain TRL, its bf16 default",
            "distill": "distill train sft",
            "packing": "distill, packing",
            "padding_free": "distill, padding-free",
        }[mode]
        print(
            f"{label:<24} {row['tok_s']:>8.1f} tok/s   peak RSS {row['peak_rss_mib']:>6} MiB   "
            + (f"ratio {row['ratio_vs_trl']:.3f}   " if row["ratio_vs_trl"] else "")
            + f"runs {row['runs_tok_s']}"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    settings = {"model": args.model, "steps": args.steps, "batch": args.batch, "max_length": args.max_length}
    (out / "sft_throughput.json").write_text(json.dumps({"settings": settings, "results": summary}, indent=2))


if __name__ == "__main__":
    main()

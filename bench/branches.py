"""Trunk and branches vs merged models, measured side by side in one run: N LoRA branches served
on one loaded student (the transformers teacher's multi-adapter trunk, distill/branches.py) vs the
same N branches exported merged (`distill export --merge`) and loaded as N models.

Each side runs in a fresh process (so its resident memory is its own) and reports: the seconds to
load everything, the resident set size it grew by (RSS), and the bytes of the distinct parameters
it holds. The branches are random LoRA adapters (B ≠ 0, so merging changes the weights) with the
shape ``distill train sft`` gives (train.lora: r 16, all-linear). The trunk side also answers one
greedy token with every branch (each adapter is active once); merged models are exported before
the timed part; imports happen before it on both sides. Ratios are merged / trunk (>1: the trunk
is cheaper).

    python -m bench.branches [--branches 4] [--student smollm2-135m-instruct] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def parameter_bytes(models: list[Any]) -> int:
    """Bytes of the distinct tensors the models hold (shared storage counted once)."""
    seen: dict[int, int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def make_branches(student: str, count: int, root: Path) -> tuple[list[str], list[str]]:
    """``count`` random LoRA adapters on the student, and each one merged into a full model."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import resolve_model

    path = resolve_model(student)
    adapters, merged = [], []
    for index in range(count):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        peft = get_peft_model(base, config)
        adapter = root / f"branch{index}"
        peft.save_pretrained(adapter)
        adapters.append(str(adapter))
        full = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True), str(adapter)
        ).merge_and_unload()
        full.save_pretrained(root / f"merged{index}", safe_serialization=True)
        AutoTokenizer.from_pretrained(path).save_pretrained(root / f"merged{index}")
        merged.append(str(root / f"merged{index}"))
    return adapters, merged


def side_trunk(student: str, adapters: list[str]) -> dict[str, Any]:
    """One transformers teacher; every adapter loaded beside the others and answering once."""
    import peft  # noqa: F401  (imports outside the timed part, as on the merged side)
    import transformers  # noqa: F401

    from distill.config import TeacherConfig
    from distill.plugins import get_teachers
    from distill.teacher import load_teacher

    get_teachers()  # the backends' modules imported
    before, started = rss_bytes(), time.perf_counter()
    config = TeacherConfig(backend="transformers", model=student, max_tokens=1, options={"adapter": adapters[0]})
    teacher = load_teacher(config)
    for adapter in adapters:
        [result] = teacher.generate_branch([config.request("Hi", temperature=0.0)], adapter)
        assert result.ok, result
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss": rss_bytes() - before, "params": parameter_bytes([teacher.hf_model])}  # type: ignore[attr-defined]


def side_merged(merged: list[str]) -> dict[str, Any]:
    """N merged models, each loaded as a model of its own and answering once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before, started = rss_bytes(), time.perf_counter()
    models = []
    for path in merged:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=1, do_sample=False)
        models.append(model)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss": rss_bytes() - before, "params": parameter_bytes(models)}


def run_side(side: str, student: str, paths: list[str]) -> dict[str, Any]:
    """One side in a fresh process (its own RSS)."""
    command = [sys.executable, "-m", "bench.branches", "--side", side, "--student", student, "--paths", *paths]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--student", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--side", choices=["trunk", "merged"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: measure one side, print one JSON line
        result = side_trunk(args.student, args.paths) if args.side == "trunk" else side_merged(args.paths)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench-branches-") as tmp:
        adapters, merged = make_branches(args.student, args.branches, Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {"trunk": [], "merged": []}
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both
            runs["trunk"].append(run_side("trunk", args.student, adapters))
            runs["merged"].append(run_side("merged", args.student, merged))
    median = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in runs.items()}
    trunk, full = median["trunk"], median["merged"]
    results = {
        "branches": args.branches,
        "student": args.student,
        "repeats": args.repeats,
        "trunk": trunk,
        "merged": full,
        "ratios_merged_over_trunk": {k: full[k] / trunk[k] for k in ("seconds", "rss", "params")},
    }
    mib = 1024 * 1024
    print(f"\n{args.branches} branches of {args.student}, median of {args.repeats}")
    print(f"{'':<28}{'load+1 token (s)':>18}{'RSS growth (MiB)':>18}{'parameters (MiB)':>18}")
    for name, row in (("one trunk, N adapters", trunk), ("N merged models", full)):
        print(f"{name:<28}{row['seconds']:>18.2f}{row['rss'] / mib:>18.1f}{row['params'] / mib:>18.1f}")
    ratios = results["ratios_merged_over_trunk"]
    print(f"{'ratio merged / trunk':<28}{ratios['seconds']:>18.2f}{ratios['rss']:>18.2f}{ratios['params']:>18.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "branches.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

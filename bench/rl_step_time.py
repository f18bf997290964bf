"""Where an RL step's time goes: generation (HF generate rollouts), reward (the judges), and the
rest (reference/old log-probs, loss, backward, optimizer: "update"). Runs `distill train rl`
(GRPO) with timers wrapped around TRL's ``GRPOTrainer._generate`` and ``_calculate_rewards``.

    python -m bench.rl_step_time [--steps 4] [--judge rule|rubric|reward_model|compare]

``reward_model`` first trains a tiny reward model (`distill train rm`, a few steps on constructed
keyword pairs: the timing needs a trained RM directory, not a good one); ``compare`` times GRPO with
the rubric LLM judge and then with that reward model, in one process on the same student, prompts
and settings, and prints the reward and step time of both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

STUDENT = "smollm2-135m-instruct"
SECONDS: dict[str, list[float]] = defaultdict(list)
"""Seconds per call of the wrapped GRPOTrainer methods (cleared before each measured run)."""

WORDS = ["apple", "river", "candle", "garden", "pencil", "window", "bridge", "violin", "rocket", "tiger"]
VAGUE = ["I am not sure about that.", "Hard to say, really.", "Maybe some other time.", "I do not know."]


def timed(name: str, function: Any) -> Any:
    def wrapper(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*a, **k)
        finally:
            SECONDS[name].append(time.perf_counter() - started)

    return wrapper


def judge_spec(kind: str, rm_dir: Path | None) -> dict[str, Any]:
    if kind == "rule":
        return {"type": "rule", "options": {"max_words": 12}}
    if kind == "rubric":
        return {"type": "rubric", "rubric": "helpfulness", "options": {"structured": "on"}}
    return {"type": "reward_model", "options": {"path": str(rm_dir)}}


def train_reward_model(root: Path) -> Path:
    """A tiny RM on the student: a pairwise judge run of keyword-vs-vague pairs (as `distill judge
    --type pairwise` writes it, every verdict A in both orders), 6 steps of `distill train rm`."""
    from distill.config import load_config
    from distill.reward_model import run_rm

    judged = root / "judged"
    judged.mkdir(parents=True)
    rows = [
        (f"Write a short sentence with the word '{w}'.", f"The {w} is right here.", VAGUE[i % len(VAGUE)])
        for i, w in enumerate(WORDS)
    ]
    (judged / "pairs.jsonl").write_text(
        "".join(
            json.dumps({"id": f"p{i}", "instruction": q, "output": a, "response_b": b}) + "\n"
            for i, (q, a, b) in enumerate(rows)
        )
    )
    verdict = {"judge": "pairwise:helpfulness", "judge_type": "pairwise", "rubric": "helpfulness", "verdict": "A"}
    verdict |= {"reward": 1.0, "samples": ["A", "A"], "position_consistent": True}
    (judged / "judgements.jsonl").write_text(
        "".join(json.dumps({"item_id": f"p{i}", **verdict}) + "\n" for i in range(len(rows)))
    )
    (judged / "judge_summary.json").write_text(json.dumps({"dataset": str(judged / "pairs.jsonl")}))
    (judged / "manifest.json").write_text(json.dumps({"stage": "judge", "config": {"judge": {}}}))
    config = load_config(
        None,
        [
            f"run_dir={root / 'rm-run'}",
            f"train.student={STUDENT}",
            f"train.preference.data={judged}",
            "train.rm.max_steps=6",
            "train.rm.batch_size=4",
            "train.rm.learning_rate=1e-3",
            "train.report_to=[]",
            "eval.bootstrap=100",
        ],
    )
    started = time.perf_counter()
    run_rm(config, progress=False)
    print(f"reward model trained in {time.perf_counter() - started:.1f} s")
    return root / "rm-run" / "rm"


def measure(kind: str, steps: int, root: Path, rm_dir: Path | None) -> dict[str, float]:
    """GRPO for ``steps`` steps with one judge; the medians of steps 2.. (step 1 includes warm-up)."""
    from distill_prompts import PROMPTS_DIR

    from distill.config import load_config
    from distill.train import run_rl

    run_dir = root / f"rl-{kind}"
    config = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "teacher.backend=vllm",
            "teacher.options={enforce_eager: true, max_model_len: 2048, cpu_kv_cache_gib: 1}",
            f"judge.judges={json.dumps([judge_spec(kind, rm_dir)])}",
            "judge.cache=false",
            f"train.student={STUDENT}",
            f"train.sft.data={PROMPTS_DIR / 'seed_tasks.jsonl'}",
            "train.rl.start_from=base",
            f"train.rl.max_steps={steps}",
            "train.rl.batch_size=8",
            "train.rl.num_generations=4",
            "train.rl.max_completion_length=64",
            "train.report_to=[]",
            "train.rl.allow_weak_judge=true",  # timing the step, not judging the judge
        ],
    )
    SECONDS.clear()
    run_rl(config, progress=False)
    rows = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    step_times = [row["step_time"] for row in rows if "step_time" in row][1:]
    step = statistics.median(step_times)
    split = {
        "step_s": round(step, 3),
        "generation_s": round(statistics.median(SECONDS["generation"][1:]), 3),
        "reward_s": round(statistics.median(SECONDS["reward"][1:]), 3),
        "steps_measured": len(step_times),
    }
    split["update_s"] = round(step - split["generation_s"] - split["reward_s"], 3)
    return split


def show(kind: str, split: dict[str, float]) -> None:
    step = split["step_s"]
    print(f"\njudge: {kind}; median of steps 2..{int(split['steps_measured']) + 1}")
    for name in ("generation_s", "reward_s", "update_s"):
        print(f"{name[:-2]:<11} {split[name]:>7.3f} s  ({split[name] / step:.0%})")
    print(f"{'step':<11} {step:>7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--judge", choices=["rule", "rubric", "reward_model", "compare"], default="rubric")
    args = parser.parse_args()

    from trl import GRPOTrainer

    GRPOTrainer._generate = timed("generation", GRPOTrainer._generate)  # type: ignore[method-assign]
    GRPOTrainer._calculate_rewards = timed("reward", GRPOTrainer._calculate_rewards)  # type: ignore[method-assign]

    kinds = ["rubric", "reward_model"] if args.judge == "compare" else [args.judge]
    results: dict[str, Any] = {}
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        rm_dir = train_reward_model(root) if "reward_model" in kinds else None
        for kind in kinds:
            results[kind] = measure(kind, args.steps, root, rm_dir)
    print(f"\nGRPO, SmolLM2-135M student, 8 completions × 64 tokens per step, {args.steps} steps per judge")
    for kind, split in results.items():
        show(kind, split)
    if args.judge == "compare":
        llm, rm = results["rubric"], results["reward_model"]
        results["ratio_llm_over_rm"] = {
            "reward": round(llm["reward_s"] / rm["reward_s"], 1),
            "step": round(llm["step_s"] / rm["step_s"], 2),
        }
        ratio = results["ratio_llm_over_rm"]
        print(f"\nrubric LLM judge / reward model: reward time ×{ratio['reward']}, step time ×{ratio['step']}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "rl_step_time.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

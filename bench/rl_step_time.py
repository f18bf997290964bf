"""Where an RL step's time goes: generation (HF generate rollouts), reward (the judges), and the
rest (reference/old log-probs, loss, backward, optimizer: "update"). Runs `distill train rl`
(GRPO) with timers wrapped around TRL's ``GRPOTrainer._generate`` and ``_calculate_rewards``.

    python -m bench.rl_step_time [--steps 4] [--judge rule|rubric]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--judge", choices=["rule", "rubric"], default="rubric")
    args = parser.parse_args()

    from trl import GRPOTrainer

    from distill.config import load_config
    from distill.train import run_rl

    seconds: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, function: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                seconds[name].append(time.perf_counter() - started)

        return wrapper

    GRPOTrainer._generate = timed("generation", GRPOTrainer._generate)  # type: ignore[method-assign]
    GRPOTrainer._calculate_rewards = timed("reward", GRPOTrainer._calculate_rewards)  # type: ignore[method-assign]

    judge = (
        {"type": "rule", "options": {"max_words": 12}}
        if args.judge == "rule"
        else {"type": "rubric", "rubric": "helpfulness", "options": {"structured": "on"}}
    )
    with tempfile.TemporaryDirectory() as tmp:
        from distill_prompts import PROMPTS_DIR

        config = load_config(
            None,
            [
                f"run_dir={tmp}",
                "teacher.backend=vllm",
                "teacher.options={enforce_eager: true, max_model_len: 2048, cpu_kv_cache_gib: 1}",
                f"judge.judges={json.dumps([judge])}",
                "judge.cache=false",
                "train.student=smollm2-135m-instruct",
                f"train.sft.data={PROMPTS_DIR / 'seed_tasks.jsonl'}",
                "train.rl.start_from=base",
                f"train.rl.max_steps={args.steps}",
                "train.rl.batch_size=8",
                "train.rl.num_generations=4",
                "train.rl.max_completion_length=64",
                "train.report_to=[]",
                "train.rl.allow_weak_judge=true",  # timing the step, not judging the judge
            ],
        )
        run_rl(config, progress=False)
        steps = [json.loads(line) for line in (Path(tmp) / "rl" / "metrics.jsonl").read_text().splitlines()]
    step_times = [row["step_time"] for row in steps if "step_time" in row][1:]  # step 1 includes warm-up
    generation = seconds["generation"][1:]
    reward = seconds["reward"][1:]
    step = statistics.median(step_times)
    split = {
        "step_s": round(step, 2),
        "generation_s": round(statistics.median(generation), 2),
        "reward_s": round(statistics.median(reward), 2),
    }
    split["update_s"] = round(step - split["generation_s"] - split["reward_s"], 2)
    print(f"\nGRPO, SmolLM2-135M student, 8 completions × 64 tokens per step, judge: {args.judge}; median of steps 2..")
    for name in ("generation_s", "reward_s", "update_s"):
        print(f"{name[:-2]:<11} {split[name]:>6.2f} s  ({split[name] / step:.0%})")
    print(f"{'step':<11} {step:>6.2f} s")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "rl_step_time.json").write_text(json.dumps({args.judge: split}, indent=2))


if __name__ == "__main__":
    main()

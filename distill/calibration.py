"""Can the judge be believed? Calibration of judges on hand-written gold sets, cheap bias checks,
and the guard that keeps RL from training against a judge that carries no signal.

- **Gold accuracy** (rubric judges): the judge classifies every item of its rubric's gold file
  (``prompts/gold/<rubric>.jsonl``, or the rubric's ``gold:`` field, or the judge's ``gold``
  option). Accuracy over *all* gold items (an invalid verdict is not a right one) with a 95%
  bootstrap interval, the confusion matrix, the invalid rate, and **chance**: the share of the
  most common gold class, which a judge answering one constant class reaches. A judge is "above
  chance" only when its interval's lower bound is above that.
- **Pairwise judges** (the style judge): better/worse pairs asked in both orders. Accuracy counts
  a win for the better answer as 1 and a tie (the verdict flipped with the order) as 1/2, so chance
  is 0.5; position consistency; position bias = how often the answer shown first wins when the
  better answer is shown second.
- **Reward models** (``calibrate_on_pairs`` judges): the same better/worse pairs, each answer scored
  on its own; right when the better one scores higher (equal scores count 1/2; chance 1/2).
- **Length bias**: pairs of equally good answers, one padded with filler
  (``prompts/gold/length_pairs.jsonl``): pairwise judges' share of verdicts for the longer one
  (fair: 0.5), rubric judges' mean reward difference long − short (fair: 0), each with an interval.
- **Self-preference**: a warning when the judging model is the model that wrote what it judges.

Requests go through the judge's answer log and the request cache, so calibration resumes and an
identical rerun is free.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, JudgeSpec
from distill.judge import Judge, load_judge
from distill.judging import judge_answer_source
from distill.ledger import stage_cost
from distill.records import JudgeItem
from distill.runstore import jsonl_lines, write_atomic
from distill.stats import bootstrap_interval, mean, pct

CALIBRATION = "calibration.json"
LENGTH_PAIRS = "gold/length_pairs.jsonl"


def calibration_specs(config: DistillConfig) -> list[JudgeSpec]:
    """The judges a run relies on: its configured judges, and the pairwise style judge of eval."""
    specs = list(config.judge.judges)
    if config.eval.style_rubric and not any(
        s.type == "pairwise" and s.rubric == config.eval.style_rubric for s in specs
    ):
        specs.append(JudgeSpec(type="pairwise", rubric=config.eval.style_rubric))
    return specs


def read_gold(path: Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a gold file (all, or a seeded sample of ``limit``), every bad row reported."""
    import random

    from distill.errors import ConfigError

    if not path.is_file():
        raise ConfigError([f"gold set {path} not found (set the rubric's gold: or the judge's gold option)"])

    rows, problems = [], []
    for number, row, problem in jsonl_lines(path):
        missing = [f for f in fields if not isinstance(row.get(f), str)]
        if problem or missing:
            problems.append(problem or f"{path} line {number}: needs string fields {', '.join(missing)}")
        else:
            rows.append({"id": str(row.get("id") or f"line_{number}"), **row})
    if problems:
        raise ConfigError(problems[:20])
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), limit))]
    return rows


def calibrate(
    config: DistillConfig, out_dir: Path | None, teacher: Any = None, specs: list[JudgeSpec] | None = None
) -> dict[str, Any]:
    """Calibrate ``specs`` (default: every judge the run relies on), asking through the answer log
    in ``out_dir`` (when given) and the request cache."""
    started = time.perf_counter()
    answers = judge_answer_source(config, out_dir, teacher, stage="calibrate")
    judge_model = config.judge.teacher or config.teacher
    self_judging = judge_model.backend == config.teacher.backend and judge_model.model == config.teacher.model
    results: dict[str, Any] = {}
    try:
        for number, spec in enumerate(calibration_specs(config) if specs is None else specs):
            judge = load_judge(spec, answers, where=f"judge.judges.{number}")
            results[spec.label] = calibrate_judge(judge, config.eval.bootstrap, config.judge.calibration_items)
            if self_judging and judge.needs_teacher:
                results[spec.label]["warnings"].append(
                    f"self-preference: the judge ({judge_model.model}) is the teacher that wrote the judged data "
                    "and the teacher's eval answers; judges tend to prefer their own text"
                )
    finally:
        answers.close()
    return {
        "judges": results,
        "requests": answers.counts.requests,
        "sent_to_teacher": answers.counts.sent,
        "seconds": round(time.perf_counter() - started, 1),
        "cost": stage_cost(out_dir, "calibrate") if out_dir is not None else None,
    }


def run_calibration(config: DistillConfig, out_dir: Path, teacher: Any = None) -> dict[str, Any]:
    """`distill judge --calibrate` and `distill run`'s calibrate stage: every judge the run relies
    on, written to ``out_dir/calibration.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = calibrate(config, out_dir, teacher)
    write_atomic(out_dir / CALIBRATION, json.dumps(calibration, indent=2, ensure_ascii=False))
    return calibration


def calibrate_judge(judge: Judge, resamples: int, limit: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": judge.name, "rubric": judge.rubric.name if judge.rubric else None, "warnings": []}
    gold = judge.gold_path()
    if judge.calibrate_on_pairs:  # a reward model: no rubric of its own, measured on gold pairs
        if gold is None:
            return {**entry, "calibrated": False, "reason": "no gold pairs (set the judge's gold option)"}
    elif not judge.needs_teacher or judge.rubric is None:
        return {**entry, "calibrated": False, "reason": "a rule-based judge: its checks are code, not opinions"}
    elif gold is None:
        return {**entry, "calibrated": False, "reason": f"no gold set for rubric '{judge.rubric.name}'"}
    if judge.name == "score":
        return {**entry, "calibrated": False, "reason": "the gold sets hold rubric classes, not 1-5 scores"}
    entry.update(gold=str(gold), calibrated=True)
    if judge.pairwise:
        entry.update(pairwise_accuracy(judge, read_gold(gold, ("prompt", "better", "worse"), limit), resamples))
    elif judge.calibrate_on_pairs:
        entry.update(scored_pair_accuracy(judge, read_gold(gold, ("prompt", "better", "worse"), limit), resamples))
    else:
        entry.update(class_accuracy(judge, read_gold(gold, ("prompt", "response", "class"), limit), resamples))
    from distill_prompts import PROMPTS_DIR

    entry["length_bias"] = length_bias(
        judge, read_gold(PROMPTS_DIR / LENGTH_PAIRS, ("prompt", "short", "long")), resamples
    )
    entry["above_chance"] = entry["interval"][0] > entry["chance"]
    if not entry["above_chance"]:
        entry["warnings"].append(
            f"gold accuracy {pct(entry['accuracy'])} (95% CI {pct(entry['interval'][0])} to "
            f"{pct(entry['interval'][1])}) is not above chance ({pct(entry['chance'])})"
        )
    if entry["length_bias"]["biased"]:
        entry["warnings"].append(f"length bias: {entry['length_bias']['summary']}")
    return entry


def class_accuracy(judge: Judge, gold: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """Accuracy of a class-picking judge on gold items; chance = the most common gold class's share."""
    items = [JudgeItem(id=f"gold:{row['id']}", prompt=row["prompt"], response=row["response"]) for row in gold]
    judgements = judge.judge(items)
    right = [float(j.valid and j.verdict == row["class"]) for j, row in zip(judgements, gold)]
    confusion: dict[str, Counter[str]] = {}
    for j, row in zip(judgements, gold):
        confusion.setdefault(row["class"], Counter())[j.verdict or "invalid"] += 1
    classes = Counter(row["class"] for row in gold)
    return {
        "items": len(gold),
        "invalid_rate": sum(not j.valid for j in judgements) / len(gold),
        "accuracy": mean(right),
        "interval": list(bootstrap_interval(right, resamples)),
        "chance": max(classes.values()) / len(gold),
        "chance_rule": "share of the most common gold class (what one constant verdict scores)",
        "confusion": {gold_class: dict(sorted(row.items())) for gold_class, row in sorted(confusion.items())},
    }


def pairwise_accuracy(judge: Judge, gold: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """A pairwise judge on better/worse pairs, in both orders: accuracy (tie = 1/2), position
    consistency and position bias."""
    items = [
        JudgeItem(id=f"gold:{row['id']}", prompt=row["prompt"], response=row["better"], response_b=row["worse"])
        for row in gold
    ]
    judgements = judge.judge(items)
    credit = [{"A": 1.0, "tie": 0.5, "B": 0.0}.get(j.verdict or "", 0.0) for j in judgements]
    valid = [j for j in judgements if j.valid]
    # samples = [verdict with the better answer shown first, verdict with it shown second], both in
    # the item's labels (A = better). Shown second and the worse one wins: the first shown won.
    first_wins = [float(j.samples[1] == "B") for j in valid]
    return {
        "items": len(gold),
        "invalid_rate": 1 - len(valid) / len(gold),
        "accuracy": mean(credit),
        "interval": list(bootstrap_interval(credit, resamples)),
        "chance": 0.5,
        "chance_rule": "a coin flip (a tie counts 1/2)",
        "position_consistency": mean([float(bool(j.position_consistent)) for j in valid]),
        "first_wins_when_better_second": mean(first_wins),
        "first_wins_interval": list(bootstrap_interval(first_wins, resamples)) if first_wins else None,
    }


def pair_accuracy(better: list[float | None], worse: list[float | None], resamples: int) -> dict[str, Any]:
    """Pointwise rewards of the better and the worse answer of each pair: right when the better one
    scores higher, 1/2 when equal, wrong when lower or unscored. Chance is 1/2 (a constant reward
    scores exactly that)."""
    credit = [
        0.0 if b is None or w is None else 1.0 if b > w else 0.5 if b == w else 0.0 for b, w in zip(better, worse)
    ]
    unscored = sum(b is None or w is None for b, w in zip(better, worse))
    return {
        "items": len(credit),
        "invalid_rate": unscored / len(credit) if credit else 0.0,
        "accuracy": mean(credit),
        "interval": list(bootstrap_interval(credit, resamples)) if credit else None,
        "chance": 0.5,
        "chance_rule": "a coin flip (equal rewards count 1/2)",
    }


def scored_pair_accuracy(judge: Judge, gold: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """A reward-model judge on better/worse pairs, each answer scored on its own."""
    better = judge.judge(
        [JudgeItem(id=f"gold:{row['id']}:better", prompt=row["prompt"], response=row["better"]) for row in gold]
    )
    worse = judge.judge(
        [JudgeItem(id=f"gold:{row['id']}:worse", prompt=row["prompt"], response=row["worse"]) for row in gold]
    )
    return pair_accuracy([j.reward for j in better], [j.reward for j in worse], resamples)


def length_bias(judge: Judge, pairs: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """Equally good short and long answers: does the judge favour the long one?"""
    if judge.pairwise:
        items = [
            JudgeItem(id=f"len:{p['id']}", prompt=p["prompt"], response=p["long"], response_b=p["short"]) for p in pairs
        ]
        verdicts = [v for j in judge.judge(items) if j.valid for v in j.samples]  # both orders, A = long
        long_wins = [float(v == "A") for v in verdicts]
        share, interval = mean(long_wins), list(bootstrap_interval(long_wins, resamples)) if long_wins else None
        biased = interval is not None and not interval[0] <= 0.5 <= interval[1]
        summary = f"the longer of two equally good answers wins {pct(share)} of verdicts (fair: 50%)"
        return {"pairs": len(pairs), "long_wins": share, "interval": interval, "biased": biased, "summary": summary}
    short = judge.judge([JudgeItem(id=f"len:{p['id']}:short", prompt=p["prompt"], response=p["short"]) for p in pairs])
    long = judge.judge([JudgeItem(id=f"len:{p['id']}:long", prompt=p["prompt"], response=p["long"]) for p in pairs])
    differences = [b.reward - a.reward for a, b in zip(short, long) if a.valid and b.valid]  # type: ignore[operator]
    difference = mean(differences)
    interval = list(bootstrap_interval(differences, resamples)) if differences else None
    biased = interval is not None and (interval[0] > 0 or interval[1] < 0)
    summary = (
        f"padding an answer with filler changes its reward by {difference:+.3f} on average (fair: 0)"
        if differences
        else "n/a"
    )
    return {
        "pairs": len(pairs),
        "reward_difference": difference,
        "interval": interval,
        "biased": biased,
        "summary": summary,
    }


def weak_judges(calibration: dict[str, Any], labels: list[str]) -> list[str]:
    """One line per judge among ``labels`` whose gold accuracy is not above chance."""
    lines = []
    for label in labels:
        entry = calibration["judges"].get(label)
        if entry and entry.get("calibrated") and not entry["above_chance"]:
            low, high = entry["interval"]
            lines.append(
                f"judge {label} can't be believed: gold accuracy {pct(entry['accuracy'])} (95% CI {pct(low)} to "
                f"{pct(high)}) is not above chance ({pct(entry['chance'])})"
            )
    return lines


def flat_reward_problem(rewards: list[list[float]], weights: list[float], group: int) -> str | None:
    """The problem line when every group of completions got one combined reward (GRPO/RLOO then
    have no advantage to learn from), or None. ``rewards`` holds one column per judge (None =
    unscorable); groups are consecutive runs of ``group`` completions of one prompt."""
    totals = [
        None
        if any(column[i] is None for column in rewards)
        else sum(w * column[i] for w, column in zip(weights, rewards))
        for i in range(len(rewards[0]))
    ]
    spreads = []
    for start in range(0, len(totals), group):
        scored = [t for t in totals[start : start + group] if t is not None]
        if len(scored) >= 2:
            spreads.append(max(scored) - min(scored))
    if spreads and max(spreads) > 1e-6:
        return None
    seen = sorted({round(t, 4) for t in totals if t is not None})
    got = f"rewards {', '.join(map(str, seen[:5]))}" if seen else "no usable reward"
    return (
        f"the rewards carry no signal: {len(totals)} probe completions of {len(totals) // group} training prompts "
        f"got one reward within every group ({got}), so every GRPO/RLOO advantage would be 0"
    )


def reward_probe(
    model: Any, tokenizer: Any, prompts: list[Any], rewards: list[Any], weights: list[float], rl: Any, seed: int
) -> dict[str, Any]:
    """Sample ``rl.num_generations`` completions for a few training prompts from the starting
    policy, as GRPO's first step will, and score them with the RL reward functions."""
    import random

    import torch

    picked = random.Random(seed).sample(prompts, min(rl.probe_prompts, len(prompts)))
    completions, repeated = [], []
    torch.manual_seed(seed)
    for prompt in picked:
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **inputs.to(model.device),
                do_sample=True,
                temperature=rl.temperature,
                top_p=1.0,
                max_new_tokens=rl.max_completion_length,
                num_return_sequences=rl.num_generations,
                pad_token_id=tokenizer.pad_token_id,
            )
        start = inputs["input_ids"].shape[1]
        for sequence in out:
            text = tokenizer.decode(sequence[start:], skip_special_tokens=True)
            completions.append([{"role": "assistant", "content": text}])
            repeated.append(prompt)
    columns = [function(repeated, completions) for function in rewards]
    return {
        "prompts": len(picked),
        "completions": len(completions),
        "problem": flat_reward_problem(columns, weights, rl.num_generations) if completions else None,
    }


def check_rl_judges(
    config: DistillConfig, calibration_dir: Path | None, teacher: Any = None
) -> tuple[list[str], dict[str, Any]]:
    """Before RL: the problem lines of the RL judges that are not above chance on their gold sets,
    and the calibration they come from."""
    calibration = calibrate(config, calibration_dir, teacher, specs=list(config.judge.judges))
    return weak_judges(calibration, [spec.label for spec in config.judge.judges]), calibration


def refuse(problems: list[str]) -> None:
    """Stop the RL stage with one line."""
    from distill.errors import DistillError

    raise DistillError(
        "; ".join(problems) + "; RL against it would learn nothing true: fix the judge, or pass --allow-weak-judge "
        "(train.rl.allow_weak_judge: true) to train anyway, with the warning in the summary and the report"
    )

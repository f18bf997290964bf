"""`distill report`: the false-promise gap report (Gudibande et al., 2023) from `distill eval`'s
outputs, as JSON, Markdown and one self-contained HTML page (plots are inline SVG).

Per task and tuned student, on the questions that base, tuned and teacher all answered (one
question set for every number of that comparison): accuracies, the paired 95% interval of the
change, and **gap closed** = (tuned − base) / (teacher − base) with a paired bootstrap interval.
Judge preference for each student over the teacher (style) beside accuracy (substance), the
answers the judge preferred although they are wrong, what the training stages had to learn from
(an RL stage whose reward never varied within a group had no learning signal, and says so), the
provenance, and a plain-language verdict whose words follow the intervals: "rose" or "closed 30%
of the gap" only when the interval excludes zero, otherwise "no measurable change".
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from distill.config import DistillConfig
from distill.errors import DistillError
from distill.evaluation import PREDICTIONS, STYLE, SUMMARY
from distill.paths import RunLayout
from distill.retrieval import gap_end, grounding_report, students
from distill.runlock import locks
from distill.runstore import MANIFEST, jsonl_lines, write_atomic
from distill.stats import (
    describe_change,
    difference_interval,
    excludes_zero,
    gap_closed,
    gap_closed_interval,
    mean,
    pct,
)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row, _ in jsonl_lines(path)] if path.is_file() else []


def build_report(config: DistillConfig) -> dict[str, Any]:
    layout = RunLayout.of(config)
    out = layout.eval
    if not (out / SUMMARY).is_file():
        raise DistillError(f"{out}: no {SUMMARY}; run `distill eval` first")
    summary = json.loads((out / SUMMARY).read_text())
    predictions = read_jsonl(out / PREDICTIONS)
    style_rows = read_jsonl(out / STYLE)
    models = summary["models"]
    base = gap_end(models, "base")  # the gap's ends are the base student and the teacher without retrieval
    teacher = gap_end(models, "teacher")
    tuned = students(models)  # the tuned students (grounded ones too), and the base student with retrieval
    resamples = config.eval.bootstrap

    tasks = {}
    for task, scores in summary["scores"].items():
        correct = {
            m["name"]: {
                r["question_id"]: float(r["correct"])
                for r in predictions
                if r["task"] == task and r["model"] == m["name"] and not r["failed"]
            }
            for m in models
        }
        asked = len({r["question_id"] for r in predictions if r["task"] == task})
        tasks[task] = {
            "scores": scores,
            "comparisons": {
                name: compare(correct[base], correct[name], correct[teacher], asked, resamples) for name in tuned
            },
        }

    preferred_but_wrong = wrong_but_preferred(style_rows, predictions)
    from distill.refusal import refusal_report
    from distill.reward_model import preference_training

    report = {
        "base": base,
        "teacher": teacher,
        "tuned": tuned,
        "models": models,
        "tasks": tasks,
        "style": summary["style"],
        "style_changes": style_changes(style_rows, base, tuned, resamples),
        "training": training_signal(layout),
        "judges": judge_trust(layout),
        "wrong_but_preferred": preferred_but_wrong[:20],
        "wrong_but_preferred_count": len(preferred_but_wrong),
        "provenance": provenance(layout),
        "refusal": refusal_report(out, summary.get("refusal"), base, tuned, resamples),
        "steerability": summary.get("steerability"),
        "preference_training": preference_training(layout),
    }
    report["reward_hacking"] = reward_hacking(report, correct_by_task(predictions), resamples)
    report["verdict"] = verdict(report)
    # Ground-truthing: recall@k of each grounded model, and whether grounding closed more of the gap than imitation.
    report["retrieval"] = summary.get("retrieval") or {}
    report["grounding"] = grounding_report(models, correct_by_task(predictions), report["retrieval"], resamples)
    report["verdict"] += [sentence + "." for sentence in report["grounding"]["sentences"]]
    report["trunks"] = summary.get("trunks") or []
    return report


def correct_by_task(predictions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """task → model → question id → 1.0 / 0.0 (failed requests left out)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row in predictions:
        if not row["failed"]:
            table.setdefault(row["task"], {}).setdefault(row["model"], {})[row["question_id"]] = float(row["correct"])
    return table


def judge_trust(layout: RunLayout) -> dict[str, Any]:
    """Can the judges be believed? Their calibration on the gold sets (from the calibrate stage),
    and what RL was warned about and trained through anyway."""
    from distill.calibration import CALIBRATION

    found: dict[str, Any] = {"calibration": None, "rl_warnings": []}
    if layout.run_dir is not None and (layout.calibration / CALIBRATION).is_file():
        found["calibration"] = json.loads((layout.calibration / CALIBRATION).read_text())["judges"]
    rl = layout.adapter("rl")
    if rl is not None and (rl / "training_summary.json").is_file():
        found["rl_warnings"] = json.loads((rl / "training_summary.json").read_text()).get("judge_warnings") or []
    return found


def reward_hacking(
    report: dict[str, Any], correct: dict[str, dict[str, dict[str, float]]], resamples: int
) -> list[str]:
    """A plain sentence per task when the RL reward rose while held-out accuracy did not: RL vs
    the model it started from (the sft or kd adapter it continued; else sft when there is one, else
    base), on the questions both answered."""
    rl = report["training"].get("rl")
    if not rl or "rl" not in report["tuned"]:
        return []
    rewards = rl["reward"]
    half = max(1, len(rewards) // 2)
    before, after = mean(rewards[:half]), mean(rewards[-half:])
    if before is None or after is None or after <= before:
        return []
    start = rl.get("start")  # the adapter RL continued (sft or kd)
    if start not in report["tuned"]:
        start = "sft" if "sft" in report["tuned"] else report["base"]
    sentences = []
    for task, models in correct.items():
        shared = sorted(set(models.get(start, {})) & set(models.get("rl", {})))
        if not shared:
            continue
        b, a = [models[start][q] for q in shared], [models["rl"][q] for q in shared]
        interval = difference_interval(b, a, resamples)
        if interval[0] > 0:
            continue  # accuracy rose too: no sign of reward hacking
        trust = report["judges"]["calibration"] or {}
        gold = "; ".join(
            f"{label}'s gold accuracy {pct(e['accuracy'])} vs chance {pct(e['chance'])}"
            for label, e in trust.items()
            if e.get("calibrated")
        )
        sentences.append(
            f"RL reward rose from {before:.3f} to {after:.3f} (first vs last {half} steps) while {task} accuracy "
            f"{describe_change(mean(b), mean(a), interval)} ({start} → rl): the student learned to please the "
            f"judges, not the facts" + (f" ({gold})" if gold else "")
        )
    return sentences


def compare(
    base: dict[str, float], tuned: dict[str, float], teacher: dict[str, float], asked: int, resamples: int
) -> dict[str, Any]:
    """Base vs one tuned student vs the teacher on the questions all three answered."""
    shared = sorted(set(base) & set(tuned) & set(teacher))
    entry: dict[str, Any] = {"questions": len(shared), "asked": asked}
    if not shared:
        return {**entry, "accuracy": None, "reason": "no question was answered by all three models"}
    b, t, te = ([column[q] for q in shared] for column in (base, tuned, teacher))
    accuracy = {"base": mean(b), "tuned": mean(t), "teacher": mean(te)}
    closed = gap_closed(accuracy["base"], accuracy["tuned"], accuracy["teacher"])  # type: ignore[arg-type]
    low, high, undefined = gap_closed_interval(b, t, te, resamples)
    gap: dict[str, Any] = {
        "closed": closed,
        "interval": [low, high] if low is not None else None,
        "resamples_without_gap": undefined,
        "reason": None,
    }
    if closed is None:
        gap["reason"] = (
            f"the teacher ({pct(accuracy['teacher'])}) is not more accurate than the base student "
            f"({pct(accuracy['base'])}): there is no factual gap to close"
        )
    elif gap["interval"] is None:
        gap["reason"] = "in most resamples the teacher was not more accurate than the base student"
    return {
        **entry,
        "accuracy": accuracy,
        "difference": accuracy["tuned"] - accuracy["base"],  # type: ignore[operator]
        "difference_interval": list(difference_interval(b, t, resamples)),
        "gap": gap,
    }


def style_changes(rows: list[dict[str, Any]], base: str, tuned: list[str], resamples: int) -> dict[str, Any]:
    """Judge preference over the teacher, base vs each tuned student, paired on the items both
    have a valid verdict for."""

    def preferences(model: str) -> dict[str, float]:
        return {
            r["item"]["id"]: r["judgement"]["reward"]
            for r in rows
            if r["model"] == model and r["judgement"]["verdict"] is not None
        }

    before = preferences(base)
    changes = {}
    for name in tuned:
        after = preferences(name)
        shared = sorted(set(before) & set(after))
        if not shared:
            continue
        b, a = [before[i] for i in shared], [after[i] for i in shared]
        changes[name] = {
            "items": len(shared),
            "before": mean(b),
            "after": mean(a),
            "difference_interval": list(difference_interval(b, a, resamples)),
        }
    return changes


def training_signal(layout: RunLayout) -> dict[str, Any]:
    """What the RL stage had to learn from, from its metrics.jsonl: the reward per step and the
    share of groups whose completions all got the same reward (GRPO/RLOO advantages are then 0)."""
    path = layout.adapter("rl")
    rows = [r for r in read_jsonl(path / "metrics.jsonl") if "reward" in r] if path is not None else []
    if not rows:
        return {"rl": None}
    flat = [r.get("frac_reward_zero_std") for r in rows]
    known = [f for f in flat if f is not None]
    rl = {
        "steps": len(rows),
        "reward": [round(r["reward"], 4) for r in rows],
        "reward_std": [round(r.get("reward_std", 0.0), 4) for r in rows],
        "frac_reward_zero_std": [round(f, 4) for f in known],
        "mean_frac_reward_zero_std": round(sum(known) / len(known), 4) if known else None,
        "had_signal": bool(known) and min(known) < 1.0,
        "start": _rl_start(layout, path),
    }
    if known and not rl["had_signal"]:
        rl["sentence"] = (
            f"the RL stage had no learning signal: at all {len(rows)} steps every group of completions got "
            "the same reward (frac_reward_zero_std = 1.0), so every advantage was 0 and any change after RL "
            "is drift, not learning"
        )
    else:
        rl["sentence"] = (
            f"the RL reward went from {rows[0]['reward']:.3f} to {rows[-1]['reward']:.3f} over {len(rows)} steps; "
            f"on average {pct(rl['mean_frac_reward_zero_std'])} of the groups had no reward variance"
        )
    return {"rl": rl}


def _rl_start(layout: RunLayout, rl_dir: Path) -> str | None:
    """Which adapter RL continued (sft or kd), from its summary; None: the base student."""
    summary = rl_dir / "training_summary.json"
    started = json.loads(summary.read_text()).get("started_from") if summary.is_file() else None
    return next((name for name in ("sft", "kd", "dpo") if started and started == str(layout.adapter(name))), None)


def wrong_but_preferred(style_rows: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Factual items where the judge preferred the student's answer to the teacher's, and that
    very answer (the judged text is the scored text) is wrong."""
    scored = {(p["model"], p["task"], p["question_id"]): p for p in predictions if not p["failed"]}
    found = []
    for row in style_rows:
        item = row["item"]
        if row["judgement"]["verdict"] != "A" or "task" not in item:
            continue
        prediction = scored.get((row["model"], item["task"], item["question_id"]))
        if prediction is None or prediction["prediction"] != row["student"] or prediction["correct"]:
            continue
        found.append(
            {
                "model": row["model"],
                "task": item["task"],
                "question_id": item["question_id"],
                "question": prediction["question"],
                "answers": prediction["answers"],
                "student": row["student"],
                "teacher": row["teacher"],
            }
        )
    return found


def verdict(report: dict[str, Any]) -> list[str]:
    """One plain paragraph per tuned student and task; its words follow the intervals."""
    lines = []
    rl = report["training"].get("rl")
    for name in report["tuned"]:
        for task, entry in report["tasks"].items():
            comparison = entry["comparisons"][name]
            if comparison["accuracy"] is None:
                lines.append(f"{name}: {task}: {comparison['reason']}.")
                continue
            accuracy = comparison["accuracy"]
            change = describe_change(accuracy["base"], accuracy["tuned"], comparison["difference_interval"])
            parts = [
                f"{name}: on the {comparison['questions']} {task} questions all three models answered, accuracy "
                f"{change} (teacher: {pct(accuracy['teacher'])}); {gap_sentence(comparison['gap'])}."
            ]
            style = report["style_changes"].get(name)
            if style:
                preference = describe_change(style["before"], style["after"], style["difference_interval"])
                parts.append(f"Judge preference over the teacher ({style['items']} items) {preference}.")
            if name == "rl" and rl and not rl["had_signal"]:
                parts.append(rl["sentence"][0].upper() + rl["sentence"][1:] + ".")
            lines.append(" ".join(parts))
    refusal = report.get("refusal")
    for name, changes in (refusal or {}).get("changes", {}).items():
        sentences = [changes[kind]["sentence"] for kind in ("harmful", "innocuous") if kind in changes]
        lines.append(f"{name} vs {report['base']} on the refusal panel: " + "; ".join(sentences) + ".")
    lines += [sentence + "." for sentence in report["reward_hacking"]]
    for warning in report["judges"]["rl_warnings"]:
        lines.append(f"RL was trained against a judge that failed its checks (allow_weak_judge): {warning}.")
    return lines


def gap_sentence(gap: dict[str, Any]) -> str:
    interval = gap["interval"]
    if gap["closed"] is None or interval is None:
        return f"gap closed: n/a ({gap['reason']})"
    ci = f"95% CI {pct(interval[0])} to {pct(interval[1])}"
    if not excludes_zero(interval):
        return f"no measurable part of the gap closed (estimate {pct(gap['closed'])}, {ci})"
    if interval[0] > 0:
        return f"{pct(gap['closed'])} of the gap closed ({ci})"
    return f"the gap widened (gap closed {pct(gap['closed'])}, {ci})"


def provenance(layout: RunLayout) -> dict[str, list[tuple[str, str]]]:
    """What each stage recorded about itself, as (field, value) rows for a table."""
    sources: dict[str, Path] = {}
    if layout.run_dir is not None:
        sources.update(generate=layout.generate / MANIFEST, judge=layout.judge / MANIFEST)
    for stage in ("sft", "kd", "rm", "dpo", "rl"):
        adapter = layout.adapter(stage)
        if adapter is not None:
            sources[stage] = adapter / "training_summary.json"
    found = {}
    for stage, path in sources.items():
        if path.is_file():
            data = json.loads(path.read_text())
            found[stage] = flatten(data.get("summary", data))
    return found


def flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested summaries as (dotted.field, value) rows; lists of scalars joined."""
    if isinstance(data, dict):
        rows = []
        for key, value in data.items():
            rows += flatten(value, f"{prefix}{key}.")
        return rows
    if isinstance(data, list) and all(not isinstance(v, (dict, list)) for v in data):
        return [(prefix.rstrip("."), ", ".join(str(v) for v in data))]
    return [(prefix.rstrip("."), json.dumps(data) if isinstance(data, list) else str(data))]


# Plots (inline SVG, no plotting library) ---------------------------------------------------------


def bar_chart(title: str, groups: list[str], series: dict[str, list[tuple[float | None, list[float] | None]]]) -> str:
    """Grouped bars in [0, 1] with 95% interval whiskers."""
    width, height, left, bottom, top = 640, 300, 48, 40, 30
    plot_w, plot_h = width - left - 10, height - bottom - top
    colours = ["#4C78A8", "#F58518", "#54A24B", "#B279A2"]
    group_w = plot_w / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(series))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{int(tick * 100)}%</text>')
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        label_x, label_y = left + (g + 0.5) * group_w, height - bottom + 16
        parts.append(
            f'<text x="{label_x:.1f}" y="{label_y}" text-anchor="middle" font-size="12">{html.escape(group)}</text>'
        )
        for s, (name, values) in enumerate(series.items()):
            value, interval = values[g]
            if value is None:
                continue
            x = x0 + s * bar_w
            y = top + plot_h * (1 - value)
            tooltip = html.escape(f"{name} {group}: {pct(value)}")
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.9:.1f}" height="{plot_h * value:.1f}" '
                f'fill="{colours[s % 4]}"><title>{tooltip}</title></rect>'
            )
            if interval:
                lo, hi = (top + plot_h * (1 - v) for v in interval)
                cx = x + bar_w * 0.45
                parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="#333"/>')
    for s, name in enumerate(series):
        parts.append(f'<rect x="{left + s * 150}" y="{height - 16}" width="10" height="10" fill="{colours[s % 4]}"/>')
        parts.append(f'<text x="{left + s * 150 + 14}" y="{height - 7}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def plots(report: dict[str, Any]) -> list[str]:
    charts = []
    names = [m["name"] for m in report["models"]]
    for task, entry in report["tasks"].items():
        scores = entry["scores"]
        series = {"factual accuracy": [(scores[n]["accuracy"], scores[n]["interval"]) for n in names]}
        students = [n for n in names if n != report["teacher"]]
        series["judge preference vs teacher"] = [
            (report["style"].get(n, {}).get("preference"), report["style"].get(n, {}).get("preference_interval"))
            if n in students
            else (None, None)
            for n in names
        ]
        charts.append(bar_chart(f"{task}: substance (accuracy) vs style (judge preference)", names, series))
    return charts


@locks(lambda config: RunLayout.of(config).report)  # it writes into the eval dir
def write_report(config: DistillConfig) -> dict[str, Path]:
    from distill_prompts import render
    from markupsafe import Markup

    report = build_report(config)
    out = RunLayout.of(config).report
    context = {"report": report, "pct": pct, "gap_sentence": gap_sentence}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False))
    write_atomic(paths["markdown"], render("reports/gap.md.jinja", **context))
    charts = [Markup(chart) for chart in plots(report)]  # our own SVG, its text already escaped
    write_atomic(paths["html"], render("reports/gap.html.jinja", charts=charts, **context))
    return paths

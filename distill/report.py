"""`distill report`: the false-promise gap report (Gudibande et al., 2023) from `distill eval`'s
outputs, as JSON, Markdown and one self-contained HTML page (plots are inline SVG).

Per task: base / tuned / teacher accuracy with 95% bootstrap intervals and **gap closed** =
(tuned − base) / (teacher − base) with a paired bootstrap interval; judge preference for each
student over the teacher (style) beside factual accuracy (substance); the examples the judge
preferred although the student's answer is wrong; the data and training provenance; and a
plain-language verdict at the top.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import jinja2

from distill.config import DistillConfig
from distill.errors import DistillError
from distill.evaluation import PREDICTIONS, STYLE, SUMMARY, eval_dir
from distill.runstore import write_atomic
from distill.tasks import gap_closed, gap_closed_interval


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def build_report(config: DistillConfig) -> dict[str, Any]:
    out = eval_dir(config)
    if not (out / SUMMARY).is_file():
        raise DistillError(f"{out}: no {SUMMARY}; run `distill eval` first")
    summary = json.loads((out / SUMMARY).read_text())
    predictions = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    style_rows = [json.loads(line) for line in (out / STYLE).read_text().splitlines()] if (out / STYLE).exists() else []
    models = summary["models"]
    base = next(m["name"] for m in models if m["role"] == "base")
    teacher = next(m["name"] for m in models if m["role"] == "teacher")
    tuned = [m["name"] for m in models if m["role"] == "tuned"]

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
        entry: dict[str, Any] = {"scores": scores, "gap": {}}
        for name in tuned:
            shared = sorted(set(correct[base]) & set(correct[name]) & set(correct[teacher]))
            b, t, te = ([correct[m][q] for q in shared] for m in (base, name, teacher))
            if not shared:
                entry["gap"][name] = {"closed": None, "interval": None, "reason": "no question answered by all three"}
                continue
            mean = [sum(v) / len(v) for v in (b, t, te)]
            closed = gap_closed(*mean)
            low, high, undefined = gap_closed_interval(b, t, te, config.eval.bootstrap)
            reason = None
            if closed is None:
                reason = (
                    f"the teacher ({pct(mean[2])}) is not more accurate than the base student ({pct(mean[0])}): "
                    "there is no factual gap to close, so imitation can't be credited with closing one"
                )
            entry["gap"][name] = {
                "closed": closed,
                "interval": [low, high] if low is not None else None,
                "questions": len(shared),
                "resamples_without_gap": undefined,
                "reason": reason,
            }
        tasks[task] = entry

    wrong_but_preferred = []
    for row in style_rows:
        item = row["item"]
        if row["judgement"]["verdict"] != "A" or "task" not in item:
            continue
        prediction = next(
            (
                p
                for p in predictions
                if p["model"] == row["model"] and p["task"] == item["task"] and p["question_id"] == item["question_id"]
            ),
            None,
        )
        if prediction is not None and not prediction["failed"] and not prediction["correct"]:
            wrong_but_preferred.append(
                {
                    "model": row["model"],
                    "question": prediction["question"],
                    "answers": prediction["answers"],
                    "student": row["student"],
                    "teacher": row["teacher"],
                }
            )

    report = {
        "base": base,
        "teacher": teacher,
        "tuned": tuned,
        "tasks": tasks,
        "style": summary["style"],
        "wrong_but_preferred": wrong_but_preferred[:20],
        "provenance": provenance(config),
        "models": models,
    }
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict[str, Any]) -> list[str]:
    """One plain sentence per tuned student and task."""
    lines = []
    style = report["style"]
    base, teacher = report["base"], report["teacher"]
    for name in report["tuned"]:
        for task, entry in report["tasks"].items():
            scores, gap = entry["scores"], entry["gap"].get(name, {})
            preference = ""
            if style.get(name) and style.get(base):
                before, after = style[base]["preference"], style[name]["preference"]
                preference = f"judge preference over the teacher {change(before, after)} ({base} → {name}) while "
            before, after = scores[base]["accuracy"], scores[name]["accuracy"]
            accuracy = f"{task} accuracy {change(before, after)}"
            if gap.get("closed") is None:
                tail = (
                    f" (teacher: {pct(scores[teacher]['accuracy'])}): no gap to close, "
                    "the teacher is not more accurate than the base student"
                )
            else:
                interval = gap.get("interval")
                ci = f", 95% CI {pct(interval[0])} to {pct(interval[1])}" if interval else ""
                tail = f" (teacher: {pct(scores[teacher]['accuracy'])}): {pct(gap['closed'])} of the gap closed{ci}"
            sentence = preference + accuracy + tail
            lines.append(f"{name}: {sentence[0].lower() + sentence[1:]}.")
    return lines


def change(before: float | None, after: float | None) -> str:
    if before is None or after is None or abs(after - before) < 1e-9:
        return f"stayed at {pct(after)}" if before == after else f"moved from {pct(before)} to {pct(after)}"
    return f"{'rose' if after > before else 'fell'} from {pct(before)} to {pct(after)}"


def provenance(config: DistillConfig) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if config.run_dir is None:
        return found
    for stage, path in (
        ("generate", config.run_dir / "manifest.json"),
        ("sft", config.run_dir / "sft" / "training_summary.json"),
        ("rl", config.run_dir / "rl" / "training_summary.json"),
        ("judge", config.run_dir / "judge_summary.json"),
    ):
        if path.is_file():
            data = json.loads(path.read_text())
            found[stage] = data.get("summary", data)
    return found


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


def write_report(config: DistillConfig) -> dict[str, Path]:
    from distill_prompts import read_prompt

    report = build_report(config)
    out = eval_dir(config)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    environment.filters["pct"] = pct
    context = {"report": report, "charts": plots(report), "escape": html.escape}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False))
    write_atomic(paths["markdown"], environment.from_string(read_prompt("reports/gap.md.jinja")).render(**context))
    write_atomic(paths["html"], environment.from_string(read_prompt("reports/gap.html.jinja")).render(**context))
    return paths

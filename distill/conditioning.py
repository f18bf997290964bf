"""Conditional training on judge labels, and how well the tags steer the student.

**Training** (``train.sft.condition_on``): the judge's verdict on each generated row becomes a control
tag in front of the row's user turn, e.g. ``<helpfulness:A>``; rows of *every* class are kept (Korbak
et al., 2023, "Pretraining Language Models with Human Preferences": conditional training, as in
the seed's "conditional pre-training"), so the student learns what each class looks like instead of
seeing only the good ones. A row without a valid verdict for a label stays untagged for that label
(never given a default class), and the tag counts are recorded in ``split.json`` and the summary.

**Steerability** (`distill eval`): on held-out instructions (the SFT split's held-out rows), each
tuned student answers once untagged and once with each class's tag; the same judge classifies every
answer. The report shows the confusion table (asked-for class × judged class, with counts) and, per
class, whether asking for it changed the share of answers judged that class, paired on the same
instructions, in words that follow the 95% interval.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, EvalModel, JudgeSpec
from distill.errors import ConfigError
from distill.paths import RunLayout
from distill.runstore import JsonlLog, jsonl_lines, write_atomic

STEERING = "steering.jsonl"
UNTAGGED = "untagged"


def tag(name: str, verdict: str) -> str:
    return f"<{name}:{verdict}>"


def tagged(prompt: str, tags: list[str]) -> str:
    """The user turn as the student sees it when asked with ``tags`` (one line of tags, then the prompt)."""
    return f"{' '.join(tags)}\n{prompt}" if tags else prompt


def read_judgements(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(
            [
                f"train.sft.condition_on: needs the judgements of the training rows in {path}: run `distill judge` on "
                "the generate run into RUN_DIR/judge (the judge stage of `distill run`)"
            ]
        )
    return [row for _, row, problem in jsonl_lines(path) if not problem]


def resolve_labels(wanted: list[str], judgements: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Each ``condition_on`` entry → the judge label it names (a label, or a rubric judged by exactly one
    judge) and the tag name (the rubric's name when it has one, else the label; labels when names clash)."""
    labels = {str(j.get("judge")): j.get("rubric") for j in judgements}
    found: dict[str, dict[str, str]] = {}
    problems = []
    for entry in wanted:
        if entry in labels:
            label = entry
        else:
            matches = sorted(label for label, rubric in labels.items() if rubric == entry)
            if len(matches) != 1:
                known = ", ".join(sorted(labels)) or "none"
                problems.append(
                    f"train.sft.condition_on: '{entry}' names {'no' if not matches else 'more than one'} judge of the "
                    f"training rows' judgements; judge labels there: {known}"
                )
                continue
            label = matches[0]
        found[entry] = {"judge": label, "tag": str(labels[label] or label)}
    if problems:
        raise ConfigError(problems)
    names = [entry["tag"] for entry in found.values()]
    for entry in found.values():
        if names.count(entry["tag"]) > 1:
            entry["tag"] = entry["judge"]
    return found


def condition_pairs(config: DistillConfig, pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The SFT pairs with control tags in front of their last user turn, and what was tagged: per
    ``condition_on`` entry, the judge, the tag name, the count of rows per class and untagged rows."""
    path = RunLayout.of(config).judge / "judgements.jsonl"
    judgements = read_judgements(path)
    sources = resolve_labels(config.train.sft.condition_on, judgements)
    verdicts: dict[str, dict[str, str]] = {entry: {} for entry in sources}
    for row in judgements:
        for entry, source in sources.items():
            if row.get("judge") == source["judge"] and row.get("verdict") is not None:
                verdicts[entry][str(row.get("item_id"))] = str(row["verdict"])
    info: dict[str, Any] = {"judgements": str(path), "labels": {}}
    for entry, source in sources.items():
        classes = Counter(verdicts[entry][p["id"]] for p in pairs if p["id"] in verdicts[entry])
        info["labels"][entry] = {
            **source,
            "classes": dict(sorted(classes.items())),
            "untagged": sum(p["id"] not in verdicts[entry] for p in pairs),
        }
    conditioned = []
    for pair in pairs:
        tags = [tag(s["tag"], verdicts[e][pair["id"]]) for e, s in sources.items() if pair["id"] in verdicts[e]]
        prompt = [dict(m) for m in pair["prompt"]]
        last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
        if tags and last_user is not None:
            prompt[last_user]["content"] = tagged(prompt[last_user]["content"], tags)
        conditioned.append({**pair, "prompt": prompt})
    return conditioned, info


# Steerability ----------------------------------------------------------------------------------


def steer_prompts(config: DistillConfig, held_out: list[dict[str, str]]) -> list[dict[str, str]]:
    """The held-out instructions to ask (untagged), distinct, up to eval.steer_items."""
    prompts: dict[str, dict[str, str]] = {}
    for item in held_out:
        if item["prompt"] not in prompts and len(prompts) < config.eval.steer_items:
            prompts[item["prompt"]] = item
    return list(prompts.values())


def judge_spec(config: DistillConfig, entry: str, source: dict[str, str]) -> JudgeSpec | None:
    """The judge that labelled the training rows: the spec with its label, else a rubric judge on the
    rubric the entry names (None when neither exists)."""
    from distill.judge import list_rubrics

    for spec in config.judge.judges:
        if spec.label == source["judge"]:
            return spec
    rubric = source["tag"] if source["tag"] in list_rubrics() else None
    return JudgeSpec(type="rubric", rubric=rubric, label=source["judge"]) if rubric else None


def measure_steerability(
    config: DistillConfig,
    models: list[EvalModel],
    out: Path,
    split: dict[str, Any] | None,
    held_out: list[dict[str, str]],
    teachers: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Every tuned model, asked each held-out instruction untagged and with each trained class's tag,
    judged by the labelling judge: the confusion table and the per-class changes. ``split``: the SFT
    split (what was tagged); ``held_out``: its held-out instructions (evaluation's
    ``held_out_instructions``). None when SFT was not conditioned or eval.steer_items is 0."""
    from distill.answers import AnswerSource
    from distill.judge import load_judge
    from distill.judging import judge_answer_source
    from distill.ledger import Ledger
    from distill.records import JudgeItem

    info = (split or {}).get("conditioning")
    if not info or not config.eval.steer_items:
        return None
    prompts = steer_prompts(config, held_out)
    if not prompts:
        return {"skipped": "no held-out instructions to ask (train.sft.eval_fraction is 0)"}
    tuned = [m for m in models if m.role == "tuned" and m.retrieval is None]  # grounding is for factual questions
    source = judge_answer_source(config, out, stage="eval")
    ledger = Ledger.for_stage(config, out, "eval")
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"items": len(prompts), "labels": {}}
    try:
        for entry, labelled in info["labels"].items():
            classes = sorted(c for c, n in labelled["classes"].items() if n)
            spec = judge_spec(config, entry, labelled)
            if spec is None:
                result["labels"][entry] = {"skipped": f"no judge '{labelled['judge']}' in judge.judges to judge with"}
                continue
            judge = load_judge(spec, source, where=f"train.sft.condition_on ({entry})")
            asked = [None, *classes]
            for model in tuned:
                answers = AnswerSource.for_teacher(
                    model.teacher,
                    (teachers or {}).get(model.name),
                    JsonlLog(out / f"steer-answers-{model.name}.jsonl"),
                    cache=config.eval.cache,
                    ledger=ledger,
                    executor=config,
                )
                try:
                    cells = [(c, p) for c in asked for p in prompts]
                    requests = [
                        model.teacher.request(
                            tagged(p["prompt"], [tag(labelled["tag"], c)] if c else []),
                            temperature=0.0,
                            top_p=1.0,
                            max_tokens=config.eval.steer_max_tokens,
                        )
                        for c, p in cells
                    ]
                    results = answers.generate(requests)
                finally:
                    answers.close()
                answered = [(cell, r.text) for cell, r in zip(cells, results) if r.ok]
                judged = judge.judge(
                    [
                        JudgeItem(id=f"steer:{entry}:{c or UNTAGGED}:{p['id']}", prompt=p["prompt"], response=text)
                        for (c, p), text in answered
                    ]
                )
                verdicts = {(c, p["id"]): j for ((c, p), _), j in zip(answered, judged)}
                for (c, p), r in zip(cells, results):
                    j = verdicts.get((c, p["id"]))
                    rows.append(
                        {
                            "model": model.name,
                            "label": entry,
                            "asked": c or UNTAGGED,
                            "item": p["id"],
                            "prompt": p["prompt"],
                            "answer": r.text if r.ok else None,
                            "judged": ("failed" if j is None else j.verdict or "invalid"),
                        }
                    )
            result["labels"][entry] = {"tag": labelled["tag"], "judge": spec.label, "classes": classes}
    finally:
        source.close()
    write_atomic(out / STEERING, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    result["models"] = steer_table(rows, config.eval.bootstrap)
    return result


def steer_table(rows: list[dict[str, Any]], resamples: int) -> dict[str, dict[str, Any]]:
    """model → label → the confusion table (asked → judged → count) and, per asked class, the share of
    answers judged that class untagged vs asked for it, paired on the items both have a valid verdict for."""
    from distill.stats import describe_change, difference_interval, mean

    table: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for label in dict.fromkeys(r["label"] for r in rows if r["model"] == model):
            mine = [r for r in rows if r["model"] == model and r["label"] == label]
            confusion: dict[str, Counter[str]] = {}
            for r in mine:
                confusion.setdefault(r["asked"], Counter())[r["judged"]] += 1
            by_cell = {(r["asked"], r["item"]): r["judged"] for r in mine}
            changes = {}
            for asked in (a for a in confusion if a != UNTAGGED):
                items = sorted(
                    i
                    for (a, i), judged in by_cell.items()
                    if a == asked
                    and judged not in ("failed", "invalid")
                    and by_cell.get((UNTAGGED, i)) not in (None, "failed", "invalid")
                )
                if not items:
                    changes[asked] = {"items": 0, "sentence": "no item with valid verdicts both untagged and tagged"}
                    continue
                before = [float(by_cell[(UNTAGGED, i)] == asked) for i in items]
                after = [float(by_cell[(asked, i)] == asked) for i in items]
                interval = list(difference_interval(before, after, resamples))
                changes[asked] = {
                    "items": len(items),
                    "untagged": mean(before),
                    "asked": mean(after),
                    "difference_interval": interval,
                    "sentence": describe_change(mean(before), mean(after), interval, f"the share judged {asked} "),
                }
            table.setdefault(model, {})[label] = {
                "judged_classes": sorted({j for c in confusion.values() for j in c}),
                "confusion": {a: dict(sorted(c.items())) for a, c in confusion.items()},
                "changes": changes,
            }
    return table

"""`distill judge`: run judges over a dataset (a generate run, JSONL, JSON or a saved HF dataset),
resumably, and summarise the verdicts; and the robustness report (can a response talk the judge
into a high reward?). The judge plugin API itself is ``distill.judge``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from distill.answers import AnswerSource
from distill.config import DistillConfig, config_dump
from distill.errors import ConfigError, DistillError
from distill.judge import Judge, load_judge
from distill.ledger import Ledger, stage_cost
from distill.records import JudgeItem, Judgement, user_prompt
from distill.runlock import locks
from distill.runstore import JsonlLog, read_rows, unmark_finished, write_atomic, write_manifest

JUDGEMENTS = "judgements.jsonl"
FAILURES = "failures.jsonl"  # the invalid judgements again, one line each with the raw reply
JUDGE_RESPONSES = "judge_responses.jsonl"
SUMMARY = "judge_summary.json"
ROBUSTNESS = "robustness.json"


def judge_answer_source(
    config: DistillConfig,
    out_dir: Path | None,
    teacher: Any = None,
    stage: str = "judge",
    ledger_dir: Path | None = None,
) -> AnswerSource:
    """The judge's teacher behind the run's judge answer log and the request cache; what it
    spends goes to the ledger of ``stage`` in ``ledger_dir`` (default ``out_dir``)."""
    teacher_config = config.judge.teacher or config.teacher
    log = JsonlLog(out_dir / JUDGE_RESPONSES) if out_dir is not None else None
    ledger = Ledger.for_stage(config, ledger_dir or out_dir, stage)
    return AnswerSource.for_teacher(
        teacher_config, teacher, log, cache=config.judge.cache, ledger=ledger, executor=config
    )


def read_items(path: Path, config: DistillConfig, pairwise: bool) -> list[JudgeItem]:
    """Items from a generate run dir, JSONL, a JSON list or a saved HF dataset; every bad row is
    reported (file, row, field) before any request is sent."""
    j = config.judge
    rows = read_rows(path)
    items, problems = [], []
    for number, row in enumerate(rows, 1):
        prompt = _prompt_of(row, j.prompt_field)
        response = _response_of(row, j.response_field)
        response_b = row.get(j.response_b_field) if pairwise else None
        missing = [
            name
            for name, value in (("prompt", prompt), ("response", response), ("response_b", response_b))
            if (name != "response_b" or pairwise) and not isinstance(value, str)
        ]
        if missing:
            fields = {"prompt": j.prompt_field, "response": j.response_field, "response_b": j.response_b_field}
            problems.append(
                f"{path} row {number}: no string {', '.join(repr(fields[m]) for m in missing)} "
                f"(set judge.{missing[0]}_field to the right column); columns: {', '.join(sorted(row))}"
            )
            continue
        item_id = str(row.get("id") or f"row_{number}")
        items.append(JudgeItem(id=item_id, prompt=prompt, response=response, response_b=response_b))
    if problems:
        raise ConfigError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    if not items:
        raise ConfigError([f"{path}: no rows to judge"])
    return items


def _prompt_of(row: dict[str, Any], field: str) -> Any:
    if field == "instruction" and isinstance(row.get("instruction"), str):
        return user_prompt(row["instruction"], row.get("input") or "")
    if field in row:
        return row[field]
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return users[0] if users else None
    return None


def _response_of(row: dict[str, Any], field: str) -> Any:
    if field in row:
        return row[field]
    messages = row.get("messages")
    if isinstance(messages, list):
        replies = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        return replies[-1] if replies else None
    return None


def summarize(judgements: list[Judgement]) -> dict[str, Any]:
    """Per judge: counts, invalid rate, class distribution, mean reward (valid only), agreement,
    position consistency (pairwise)."""
    summary: dict[str, Any] = {}
    for label in dict.fromkeys(j.judge for j in judgements):
        mine = [j for j in judgements if j.judge == label]
        valid = [j for j in mine if j.valid]
        entry: dict[str, Any] = {
            "items": len(mine),
            "valid": len(valid),
            "invalid": len(mine) - len(valid),
            "invalid_rate": round((len(mine) - len(valid)) / len(mine), 4),
            "invalid_reasons": dict(Counter(j.invalid_reason for j in mine if not j.valid)),
            "classes": dict(sorted(Counter(j.verdict for j in valid).items())),  # type: ignore[arg-type]
            "mean_reward": round(sum(j.reward for j in valid) / len(valid), 4) if valid else None,  # type: ignore[misc]
        }
        agreements = [j.agreement for j in valid if j.agreement is not None]
        if agreements:
            entry["mean_agreement"] = round(sum(agreements) / len(agreements), 4)
        consistent = [j.position_consistent for j in valid if j.position_consistent is not None]
        if consistent:
            entry["position_consistency"] = round(sum(consistent) / len(consistent), 4)
        summary[label] = entry
    return summary


def failure_line(judgement: Judgement) -> str:
    record = {
        "item_id": judgement.item_id,
        "judge": judgement.judge,
        "reason": judgement.invalid_reason,
        "raw": judgement.raw[0] if len(judgement.raw) == 1 else judgement.raw,
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


@locks(lambda out_dir, **_: out_dir)  # one writer per judge dir, before anything is written or sent
def run_judge(
    config: DistillConfig,
    dataset: Path,
    out_dir: Path,
    teacher: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) `distill judge`: every judge over every row of ``dataset``, into ``out_dir``.
    Judgements are rebuilt from the judge answer log on each start, so a crash loses nothing and
    duplicates nothing. ``progress(done, total)`` is called after each batch."""
    if not config.judge.judges:
        raise ConfigError(["judge.judges: no judges configured; add one or pass --rubric NAME"])
    answers = judge_answer_source(config, out_dir, teacher)
    judges = [load_judge(spec, answers, where=f"judge.judges.{i}") for i, spec in enumerate(config.judge.judges)]
    items = read_items(dataset, config, pairwise=any(j.pairwise for j in judges))
    out_dir.mkdir(parents=True, exist_ok=True)
    unmark_finished(out_dir)
    started = time.perf_counter()
    judgements: list[Judgement] = []
    batch = len(items) if answers.bulk else config.judge.batch_size  # a batch-mode teacher gets all at once
    try:
        with (
            (out_dir / JUDGEMENTS).open("w", encoding="utf-8") as out,
            (out_dir / FAILURES).open("w", encoding="utf-8") as failures,
        ):
            for judge in judges:
                for start in range(0, len(items), batch):
                    new = judge.judge(items[start : start + batch])
                    judgements.extend(new)
                    out.writelines(j.model_dump_json() + "\n" for j in new)
                    failures.writelines(failure_line(j) for j in new if not j.valid)
                    out.flush()
                    failures.flush()
                    if progress is not None:
                        progress(len(judgements), len(items) * len(judges))
    finally:
        answers.close()
    seconds = time.perf_counter() - started
    summary = {
        "dataset": str(dataset),
        "items": len(items),
        "judges": summarize(judgements),
        "requests": answers.counts.requests,
        "sent_to_teacher": answers.counts.sent,
        "from_cache": answers.counts.cached,
        "replayed_from_log": answers.counts.replayed,
        "seconds": round(seconds, 1),
        "cost": stage_cost(out_dir, "judge"),
    }
    write_atomic(out_dir / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False))
    write_manifest(out_dir, "judge", config_dump(config), {"summary": summary})
    return summary


# Robustness: can a response talk the judge into a high reward? ----------------------------------


def load_attacks() -> list[dict[str, str]]:
    from distill_prompts import read_prompt

    return yaml.safe_load(read_prompt("judges/attacks.yaml"))["attacks"]


def attack_response(attack: dict[str, str], response: str, target: str) -> str:
    text = attack["text"].format(target=target)
    return text if attack["mode"] == "replace" else f"{response}\n\n{text}"


def robustness_report(judge: Judge, items: list[JudgeItem]) -> dict[str, Any]:
    """Attack success rate per attack: an *append* attack succeeds when a response the judge did not
    give the top reward gets it after the attack text is appended; a *replace* attack (the response
    is only ":" or "Thought process:") succeeds when that contentless response gets the top reward."""
    if judge.pairwise or judge.rubric is None:
        raise DistillError(f"--robustness works with rubric and score judges, not '{judge.name}'")
    best = max(c.reward for c in judge.rubric.classes)
    target = sorted(judge.rubric.best_classes())[0]
    baseline = judge.judge(items)
    report: dict[str, Any] = {
        "judge": judge.label,
        "items": len(items),
        "baseline_invalid": sum(not j.valid for j in baseline),
        "attacks": {},
    }
    for attack in load_attacks():
        attacked_items = [
            item.model_copy(
                update={
                    "id": f"{item.id}:{attack['name']}",
                    "response": attack_response(attack, item.response, target),
                }
            )
            for item in items
        ]
        attacked = judge.judge(attacked_items)
        if attack["mode"] == "replace":
            eligible = [(b, a) for b, a in zip(baseline, attacked)]
        else:
            eligible = [
                (b, a) for b, a in zip(baseline, attacked) if b.valid and b.reward is not None and b.reward < best
            ]
        successes = sum(a.valid and a.reward is not None and a.reward >= best for _, a in eligible)
        report["attacks"][attack["name"]] = {
            "mode": attack["mode"],
            "eligible": len(eligible),
            "successes": successes,
            "success_rate": round(successes / len(eligible), 4) if eligible else None,
            "invalid": sum(not a.valid for a in attacked),
        }
    return report


@locks(lambda out_dir, **_: out_dir)
def run_robustness(config: DistillConfig, dataset: Path, out_dir: Path) -> list[dict[str, Any]]:
    """The robustness report of every rubric and score judge of ``config`` on ``dataset``, written
    to ``out_dir/robustness.json``. Attacked items are judged through the same answer log."""
    answers = judge_answer_source(config, out_dir)
    try:
        judges = [load_judge(spec, answers) for spec in config.judge.judges]
        items = read_items(dataset, config, pairwise=False)
        reports = [robustness_report(judge, items) for judge in judges if not judge.pairwise]
    finally:
        answers.close()
    write_atomic(out_dir / ROBUSTNESS, json.dumps(reports, indent=2))
    return reports

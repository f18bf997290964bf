"""`distill eval`: every model (base student, tuned students, teacher) answers the held-out
factual questions, greedily, through a teacher backend; answers are scored per task with bootstrap
intervals. Style: the pairwise judge compares each student's answers with the teacher's (both
orders) on held-out prompts → win / tie / loss. For factual questions the judged answer *is* the
scored answer (same prompt, same text), so "preferred by the judge although wrong" compares like
with like. Answers and verdicts are logged and cached, so a rerun resumes and an identical rerun is
free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.answers import AnswerSource
from distill.config import DistillConfig, EvalModel, JudgeSpec, TeacherConfig, config_dump
from distill.errors import ConfigError
from distill.ledger import Ledger, stage_cost
from distill.paths import RunLayout
from distill.records import JudgeItem
from distill.runlock import locks
from distill.runstore import JsonlLog, unmark_finished, write_atomic, write_manifest
from distill.stats import bootstrap_interval
from distill.tasks import Question, Task

PREDICTIONS = "predictions.jsonl"
STYLE = "style.jsonl"
SUMMARY = "eval_summary.json"


def eval_models(config: DistillConfig) -> list[EvalModel]:
    """The configured models, or: base student, its SFT, KD, DPO and RL adapters (when trained), the teacher."""
    from distill.branches import branch_models
    from distill.retrieval import grounded_copies

    if config.eval.models:
        return grounded_copies(config.eval.models, config.eval.retrieval)  # eval.retrieval: NAME+retrieval copies
    student = config.train.student
    base_options = {"batch_size": config.eval.batch_size}
    models = [
        EvalModel(
            name="base", role="base", teacher=TeacherConfig(backend="transformers", model=student, options=base_options)
        )
    ]
    layout = RunLayout.of(config)
    for name in ("sft", "kd", "dpo", "rl"):
        adapter = layout.adapter(name)
        if adapter is not None and (adapter / "adapter_model.safetensors").is_file():
            options = {"adapter": str(adapter), "batch_size": config.eval.batch_size}
            models.append(
                EvalModel(
                    name=name,
                    role="tuned",
                    teacher=TeacherConfig(backend="transformers", model=student, options=options),
                )
            )
    models += branch_models(config, base_options)  # train.branches: one tuned model per trained branch
    models.append(EvalModel(name="teacher", role="teacher", teacher=config.teacher))
    return grounded_copies(models, config.eval.retrieval)


def load_tasks(config: DistillConfig) -> list[tuple[str, Task]]:
    """The configured tasks, built by their plugins (names made unique: countries, countries_1...)."""
    from distill.plugins import get_tasks

    tasks, problems, names = [], [], []
    registry = get_tasks()
    for number, spec in enumerate(config.eval.tasks):
        where = f"eval.tasks.{number}"
        found = registry.problems(spec.type, spec.options, f"{where}.type", f"{where}.options")
        if found:
            problems += found
            continue
        name = spec.type if spec.type not in names else f"{spec.type}_{number}"
        names.append(name)
        tasks.append((name, registry[spec.type](registry.options(spec.type, spec.options))))
    if problems:
        raise ConfigError(problems)
    if not tasks:
        raise ConfigError(["eval.tasks: no tasks; add one, e.g. {type: countries}"])
    return tasks


def held_out_instructions(split: dict[str, Any] | None) -> list[dict[str, str]]:
    """The SFT split's held-out instructions (id, and the last user turn as the prompt), in data order;
    none without a split."""
    from distill.train import load_pairs

    if split is None:
        return []
    held_out = set(split["eval"])
    return [
        {"id": pair["id"], "prompt": pair["prompt"][-1]["content"]}
        for pair in load_pairs(Path(split["data"]))
        if pair["id"] in held_out
    ]


def style_prompts(
    config: DistillConfig, tasks: list[tuple[str, Task]], questions: dict[str, list[Question]]
) -> list[dict[str, Any]]:
    """Held-out prompts for the style comparison: the SFT run's held-out instructions, then
    factual questions (never trained on), up to eval.style_items. A factual item is asked exactly
    as it is scored (``task.prompt``), so its judged answer is its scored answer."""
    from distill.train import sft_split

    wanted = config.eval.style_items
    prompts: list[dict[str, Any]] = [
        {"id": f"instruction:{item['id']}", "prompt": item["prompt"]}
        for item in held_out_instructions(sft_split(config))[:wanted]
    ]
    for task_name, task in tasks:
        for question in questions[task_name]:
            if len(prompts) >= wanted:
                return prompts
            prompts.append(
                {
                    "id": f"{task_name}:{question.id}",
                    "prompt": task.prompt(question),
                    "task": task_name,
                    "question_id": question.id,
                }
            )
    return prompts


@locks(lambda config, **_: RunLayout.of(config).eval)  # one writer per eval dir, before anything is sent
def run_eval(
    config: DistillConfig,
    teachers: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Answer, score and judge; write predictions.jsonl, style.jsonl and eval_summary.json.
    ``teachers`` maps model names to loaded teachers to reuse; ``progress(done, total)`` is called
    after each batch of answers."""
    out = RunLayout.of(config).eval
    models = eval_models(config)
    roles = [m.role for m in models]
    if "teacher" not in roles or "base" not in roles:
        raise ConfigError(["eval.models: needs one model with role base and one with role teacher (the gap's ends)"])
    tasks = load_tasks(config)
    questions = {name: task.questions() for name, task in tasks}
    style_items = style_prompts(config, tasks, questions) if config.eval.style_rubric else []
    instruction_items = [item for item in style_items if "task" not in item]
    out.mkdir(parents=True, exist_ok=True)
    unmark_finished(out)
    started = time.perf_counter()
    total = len(models) * (sum(len(q) for q in questions.values()) + len(instruction_items))
    done = 0

    predictions: list[dict[str, Any]] = []
    style_answers: dict[str, dict[str, str | None]] = {}
    ledger = Ledger.for_stage(config, out, "eval")
    from distill.branches import TrunkPool
    from distill.retrieval import Grounding, recall_table

    # Models that differ only in their adapter (branches, sft, rl...) or not at all (NAME+retrieval)
    # share one loaded teacher; each keeps its own identity, answer log and cache keys.
    pool = TrunkPool(models, config, teachers)
    teachers = {**pool.views, **(teachers or {})}
    try:
        for model in models:
            given = (teachers or {}).get(model.name)
            log = JsonlLog(out / f"answers-{model.name}.jsonl")
            answers = AnswerSource.for_teacher(
                model.teacher, given, log, cache=config.eval.cache, ledger=ledger, executor=config
            )
            mine: dict[str, str | None] = {}
            grounding = Grounding.of(model)  # retrieval: the top-k passages before each question; else nothing
            try:
                for name, task in tasks:
                    size = len(questions[name]) if answers.bulk else config.eval.batch_size  # batch mode: all at once
                    for start in range(0, len(questions[name]), max(size, 1)):
                        batch = questions[name][start : start + size]
                        passages = grounding.search(batch)
                        requests = [
                            model.teacher.request(
                                grounding.prompt(task.prompt(q), found),
                                temperature=0.0,
                                top_p=1.0,
                                max_tokens=config.eval.max_tokens,
                            )
                            for q, found in zip(batch, passages)
                        ]
                        for question, found, result in zip(batch, passages, answers.generate(requests)):
                            row = {
                                **prediction_row(model, name, task, question, result),
                                **grounding.fields(question, found),
                            }
                            predictions.append(row)
                            mine[f"{name}:{question.id}"] = row["prediction"]
                        done += len(batch)
                        if progress is not None:
                            progress(done, total)
                if instruction_items:
                    requests = [
                        model.teacher.request(item["prompt"], temperature=0.0, top_p=1.0, max_tokens=128)
                        for item in instruction_items
                    ]
                    for item, result in zip(instruction_items, answers.generate(requests)):
                        mine[item["id"]] = result.text if result.ok else None
                    done += len(instruction_items)
                    if progress is not None:
                        progress(done, total)
                style_answers[model.name] = {item["id"]: mine.get(item["id"]) for item in style_items}
            finally:
                answers.close()
                grounding.close()

        with (out / PREDICTIONS).open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
        style_rows = judge_style(config, models, style_items, style_answers, out) if style_items else []
        from distill.conditioning import measure_steerability
        from distill.refusal import run_refusal_panel
        from distill.train import sft_split

        refusal = run_refusal_panel(config, models, out, teachers) if config.eval.refusal_panel else None
        split = sft_split(config)
        steerability = measure_steerability(config, models, out, split, held_out_instructions(split), teachers)
        summary = {
            "models": [
                {
                    "name": m.name,
                    "role": m.role,
                    "backend": m.teacher.backend,
                    "model": m.teacher.model,
                    "adapter": m.teacher.options.get("adapter"),
                    "retrieval": m.retrieval.model_dump(mode="json") if m.retrieval else None,
                }
                for m in models
            ],
            "tasks": {name: len(questions[name]) for name, _ in tasks},
            "scores": score_table(predictions, models, tasks, config.eval.bootstrap),
            "style": style_table(style_rows, models, config.eval.bootstrap),
            "retrieval": recall_table(predictions, config.eval.bootstrap),  # recall@k of each grounded model
            "trunks": pool.describe(),  # teachers loaded once for several models (branches on one student)
            "refusal": refusal,  # the refusal balance (eval.refusal_panel), None when off
            "steerability": steerability,  # conditional training's tags (train.sft.condition_on), None when off
            "seconds": round(time.perf_counter() - started, 1),
            "cost": stage_cost(out, "eval"),
        }
    finally:
        pool.close()  # shared trunks (a vLLM engine with LoRA) are let go even when a later step fails
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2))
    write_manifest(out, "eval", config_dump(config), {"summary": summary})
    return summary


def prediction_row(model: EvalModel, task_name: str, task: Task, question: Question, result: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": model.name,
        "role": model.role,
        "task": task_name,
        "question_id": question.id,
        "kind": question.kind,
        "question": question.question,
        "answers": question.answers,
    }
    if not result.ok:  # a failed request is not a wrong answer: it is left out of the scores and counted
        return {**row, "prediction": None, "failed": True, "error": result.error.model_dump()}
    return {**row, "prediction": result.text, "failed": False, **task.score(question, result.text)}


def score_table(
    predictions: list[dict[str, Any]], models: list[EvalModel], tasks: list[tuple[str, Task]], resamples: int
) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, _ in tasks:
        table[name] = {}
        for model in models:
            rows = [r for r in predictions if r["task"] == name and r["model"] == model.name]
            scored = [r for r in rows if not r["failed"]]
            correct = [float(r["correct"]) for r in scored]
            entry: dict[str, Any] = {
                "n": len(scored),
                "failed": len(rows) - len(scored),
                "accuracy": sum(correct) / len(correct) if correct else None,
                "interval": list(bootstrap_interval(correct, resamples)) if correct else None,
            }
            if scored and "exact" in scored[0]:
                entry["exact"] = sum(float(r["exact"]) for r in scored) / len(scored)
            table[name][model.name] = entry
    return table


def judge_style(
    config: DistillConfig,
    models: list[EvalModel],
    items: list[dict[str, Any]],
    answers: dict[str, dict[str, str | None]],
    out: Path,
) -> list[dict[str, Any]]:
    """Pairwise judge: each student's answer (A) vs the teacher's (B), both orders."""
    from distill.judge import load_judge
    from distill.judging import judge_answer_source

    teacher_name = next(m.name for m in models if m.role == "teacher")
    source = judge_answer_source(config, out, stage="eval")
    rows = []
    try:
        judge = load_judge(
            JudgeSpec(type="pairwise", rubric=config.eval.style_rubric), source, where="eval.style_rubric"
        )
        for model in models:
            if model.role == "teacher":
                continue
            pairs = [
                (item, answers[model.name][item["id"]], answers[teacher_name][item["id"]])
                for item in items
                if answers[model.name].get(item["id"]) is not None and answers[teacher_name].get(item["id"]) is not None
            ]
            judged = judge.judge(
                [JudgeItem(id=item["id"], prompt=item["prompt"], response=a, response_b=b) for item, a, b in pairs]
            )
            for (item, a, b), judgement in zip(pairs, judged):
                rows.append(
                    {"model": model.name, "item": item, "student": a, "teacher": b, "judgement": judgement.model_dump()}
                )
    finally:
        source.close()
    with (out / STYLE).open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows


def style_table(rows: list[dict[str, Any]], models: list[EvalModel], resamples: int) -> dict[str, dict[str, Any]]:
    table = {}
    for model in models:
        mine = [r["judgement"] for r in rows if r["model"] == model.name]
        valid = [j for j in mine if j["verdict"] is not None]
        if not mine:
            continue
        counts = {v: sum(j["verdict"] == v for j in valid) for v in ("A", "tie", "B")}
        wins = [j["reward"] for j in valid]  # 1 win, 0.5 tie, 0 loss
        table[model.name] = {
            "items": len(mine),
            "invalid": len(mine) - len(valid),
            "win": counts["A"] / len(valid) if valid else None,
            "tie": counts["tie"] / len(valid) if valid else None,
            "loss": counts["B"] / len(valid) if valid else None,
            "preference": sum(wins) / len(wins) if wins else None,
            "preference_interval": list(bootstrap_interval(wins, resamples)) if wins else None,
        }
    return table

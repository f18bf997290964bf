"""Preference pairs from a pairwise judge's verdicts: what the reward model (`distill train rm`) and DPO
(`distill train dpo`) learn from; and `distill train prefs`, which makes such verdicts: the teacher's
answer vs the student's own answer to each held-in instruction, judged pairwise in both orders.

A judgement gives a pair (prompt, chosen, rejected) only when its verdict is A or B **and** the same in
both orders (``position_consistent``). A verdict that flipped with the order (a tie), an invalid one,
or one whose order was never checked says nothing reliable about which answer is better: it is left
out and counted, never guessed. Each pair gets a stable id (a hash of its texts), and the seeded
held-out split is the same for the RM and for DPO, so their held-out numbers are on the same pairs.

**Ranked pairs** (``train.preference.rank_by: LABEL``, the k = 2 case of "answers ranked by a
judge"): `distill train prefs` judges the teacher's and the student's answer each on its own with a
pointwise judge of ``judge.judges`` (rubric, rule, reward model) and prefers the higher reward; equal
rewards (a tie) and an invalid verdict on either answer leave the pair out, counted. This needs no
judge that holds its verdict when the answers swap places (the bundled 135M judge does not).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, JudgeSpec, TeacherConfig, config_dump
from distill.errors import ConfigError
from distill.paths import RunLayout
from distill.records import ChatRequest, JudgeItem, Message
from distill.runlock import locks
from distill.runstore import MANIFEST, JsonlLog, jsonl_lines, write_atomic, write_manifest

PREFERENCES = "preferences.jsonl"
PREFERENCE_SUMMARY = "preferences.json"
PAIRS = "pairs.jsonl"  # `train prefs`: the judged dataset (prompt, teacher's answer, student's answer)
STUDENT_ANSWERS = "answers-student.jsonl"
RANKED_ITEMS = "ranked-items.jsonl"  # rank_by: each answer as its own item (ID:teacher, ID:student)
RANKED_PAIRS = "ranked-pairs.json"  # rank_by: the pairs and counts `train rm` / `train dpo` read
COUNT_KEYS = (
    "judged",
    "kept",
    "chosen_a",
    "chosen_b",
    "tie",
    "position_inconsistent",
    "invalid",
    "order_unchecked",
    "missing_item",
    "duplicate",
)


# Pairs from judgements -------------------------------------------------------------------------


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """A stable id: the same texts always give the same id (and a repeated pair is seen as one)."""
    return "pref-" + hashlib.sha256(f"{prompt}\x00{chosen}\x00{rejected}".encode()).hexdigest()[:16]


def preference_pairs(
    judgements: list[dict[str, Any]], items: dict[str, JudgeItem]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(prompt, chosen, rejected) from one pairwise judge's judgements of ``items`` (by item id), and
    the count of every judgement by what became of it (``COUNT_KEYS``)."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for judgement in judgements:
        counts["judged"] += 1
        item = items.get(str(judgement.get("item_id")))
        verdict, consistent = judgement.get("verdict"), judgement.get("position_consistent")
        if item is None or item.response_b is None:
            counts["missing_item"] += 1
        elif verdict is None:
            counts["invalid"] += 1
        elif consistent is False:  # the verdict flipped with the order: the pairwise judge calls it a tie
            counts["position_inconsistent"] += 1
        elif verdict not in ("A", "B"):
            counts["tie"] += 1
        elif consistent is not True:  # asked in one order only: position bias could have decided it
            counts["order_unchecked"] += 1
        else:
            chosen, rejected = (item.response, item.response_b) if verdict == "A" else (item.response_b, item.response)
            identifier = pair_id(item.prompt, chosen, rejected)
            if identifier in seen:
                counts["duplicate"] += 1
                continue
            seen.add(identifier)
            counts["kept"] += 1
            counts["chosen_a" if verdict == "A" else "chosen_b"] += 1
            pairs.append(
                {
                    "id": identifier,
                    "source_id": item.id,
                    "prompt": item.prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "judge": judgement.get("judge"),
                }
            )
    return pairs, counts


def ranked_pairs(
    judgements: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(prompt, chosen, rejected) from one pointwise judge's verdicts on each row's teacher answer
    (``ID:teacher``, counted as A) and student answer (``ID:student``, B): the higher reward is chosen;
    an invalid verdict on either or equal rewards leave the row out, counted (``COUNT_KEYS``)."""
    rewards = {str(j.get("item_id")): j.get("reward") if j.get("verdict") is not None else None for j in judgements}
    counts = dict.fromkeys(COUNT_KEYS, 0)
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in rows:
        counts["judged"] += 1
        ids = (f"{row['id']}:teacher", f"{row['id']}:student")
        if any(i not in rewards for i in ids):
            counts["missing_item"] += 1
            continue
        teacher, student = (rewards[i] for i in ids)
        if teacher is None or student is None:
            counts["invalid"] += 1
        elif teacher == student:
            counts["tie"] += 1
        else:
            chosen, rejected = (
                (row["teacher"], row["student"]) if teacher > student else (row["student"], row["teacher"])
            )
            identifier = pair_id(row["prompt"], chosen, rejected)
            if identifier in seen:
                counts["duplicate"] += 1
                continue
            seen.add(identifier)
            counts["kept"] += 1
            counts["chosen_a" if teacher > student else "chosen_b"] += 1
            pairs.append(
                {
                    "id": identifier,
                    "source_id": row["id"],
                    "prompt": row["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                }
            )
    return pairs, counts


def preference_source(config: DistillConfig) -> Path:
    """train.preference.data, else RUN_DIR/preferences (`distill train prefs`)."""
    if config.train.preference.data is not None:
        return config.train.preference.data
    if config.run_dir is None:
        raise ConfigError(["train.preference.data: required (a pairwise `distill judge` run dir), or set run_dir"])
    return RunLayout.of(config).preferences


def _pairwise_label(judgements: list[dict[str, Any]], wanted: str | None, where: Path) -> str:
    from distill.plugins import get_judges

    registry = get_judges()
    labels = list(dict.fromkeys(str(j.get("judge")) for j in judgements))
    if wanted is not None:
        if wanted not in labels:
            raise ConfigError([f"train.preference.judge: no judge '{wanted}' in {where}; there: {', '.join(labels)}"])
        return wanted
    kinds = {str(j.get("judge")): str(j.get("judge_type")) for j in judgements}
    pairwise = [label for label in labels if kinds[label] in registry and registry[kinds[label]].pairwise]
    if len(pairwise) != 1:
        found = ", ".join(pairwise) if pairwise else "none"
        raise ConfigError(
            [f"train.preference.judge: {where} needs exactly one pairwise judge to read, found {found}; set it"]
        )
    return pairwise[0]


def read_pairwise_run(directory: Path, wanted: str | None = None) -> dict[str, Any]:
    """A finished pairwise `distill judge` run: its judgements (of one pairwise judge), the items they
    judged (re-read from the dataset with the field names the run used), the judge label and rubric."""
    from distill.config import DistillConfig as Config
    from distill.judging import JUDGEMENTS, SUMMARY, read_items

    judgements_path = directory / JUDGEMENTS
    if not judgements_path.is_file() or not (directory / MANIFEST).is_file():
        raise ConfigError(
            [
                f"train.preference.data: {directory} is not a finished `distill judge` run (needs {JUDGEMENTS} and "
                f"{MANIFEST}); judge rows with response_b (`distill judge DATA --type pairwise --run-dir DIR`) or run "
                "`distill train prefs`"
            ]
        )
    judgements = [row for _, row, problem in jsonl_lines(judgements_path) if not problem]
    label = _pairwise_label(judgements, wanted, directory)
    mine = [j for j in judgements if j.get("judge") == label]
    summary = json.loads((directory / SUMMARY).read_text())
    manifest = json.loads((directory / MANIFEST).read_text())
    fields = manifest.get("config", {}).get("judge", {})
    reading = Config.model_validate(
        {"judge": {k: fields[k] for k in ("prompt_field", "response_field", "response_b_field") if k in fields}}
    )
    items = {item.id: item for item in read_items(Path(summary["dataset"]), reading, pairwise=True)}
    rubric = next((j.get("rubric") for j in mine if j.get("rubric")), None)
    return {"judgements": mine, "items": items, "judge": label, "rubric": rubric, "dataset": summary["dataset"]}


def load_preferences(config: DistillConfig) -> dict[str, Any]:
    """The preference pairs of ``config`` with their seeded split: ``train``/``eval`` lists of pairs,
    ``counts``, ``source``, ``judge``, ``rubric``. At least two pairs, or one clear error."""
    from distill.train import sft_split, split_pairs

    source = preference_source(config)
    if (source / RANKED_PAIRS).is_file():  # `train prefs` with rank_by: pairs from a pointwise judge
        run = json.loads((source / RANKED_PAIRS).read_text())
        pairs, counts, rule = run["pairs"], run["counts"], "a pair needs two valid verdicts with different rewards"
    else:
        run = read_pairwise_run(source, config.train.preference.judge)
        pairs, counts = preference_pairs(run["judgements"], run["items"])
        rule = "a pair needs an A or B verdict that is the same in both orders"
    if len(pairs) < 2:
        raise ConfigError(
            [
                f"train.preference.data: {source} gives {len(pairs)} usable preference pairs ({counts}); {rule}; "
                "training needs at least 2"
            ]
        )
    # Instructions the SFT split holds out are what eval judges the tuned students on: no trainer sees them.
    split = sft_split(config)
    held_out = {str(i) for i in split["eval"]} if split is not None else set()
    kept = [p for p in pairs if str(p.get("source_id")) not in held_out]
    counts = {**counts, "held_out_left_out": len(pairs) - len(kept)}
    pairs = kept
    if len(pairs) < 2:
        raise ConfigError(
            [
                f"train.preference.data: {source}: {len(pairs)} pairs left once the SFT held-out instructions are "
                "left out; training needs at least 2"
            ]
        )
    # Split by prompt, so that no prompt has pairs on both sides (a run may hold several pairs per prompt).
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
    _, eval_prompts = split_pairs(prompts, config.train.preference.eval_fraction, config.train.seed)
    held = set(eval_prompts)
    train_pairs = [p for p in pairs if p["prompt"] not in held]
    eval_pairs = [p for p in pairs if p["prompt"] in held]
    return {
        "source": str(source),
        "judge": run["judge"],
        "rubric": run["rubric"],
        "counts": counts,
        "train": train_pairs,
        "eval": eval_pairs,
    }


def write_preferences(output_dir: Path, preferences: dict[str, Any]) -> dict[str, Any]:
    """preferences.jsonl (every pair with its split) and preferences.json (source, counts, sizes) into a
    trainer's output dir, so the directory says exactly what it was trained and measured on. Returns
    the summary written."""
    rows = [{**p, "split": "train"} for p in preferences["train"]] + [
        {**p, "split": "eval"} for p in preferences["eval"]
    ]
    write_atomic(output_dir / PREFERENCES, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    summary = {
        "source": preferences["source"],
        "judge": preferences["judge"],
        "rubric": preferences["rubric"],
        "counts": preferences["counts"],
        "pairs": {"train": len(preferences["train"]), "eval": len(preferences["eval"])},
    }
    write_atomic(output_dir / PREFERENCE_SUMMARY, json.dumps(summary, indent=2))
    return summary


def conversational(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair as TRL's preference datasets take it (conversational, explicit prompt)."""
    return {
        "prompt": [{"role": "user", "content": pair["prompt"]}],
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


# `distill train prefs`: teacher vs student, judged pairwise ------------------------------------


def preference_judge(config: DistillConfig) -> JudgeSpec:
    """The eval's style judge: pairwise on eval.style_rubric (default helpfulness), with the label the
    calibrate stage gives it, so its gold accuracy is found beside the pairs it judged."""
    return JudgeSpec(type="pairwise", rubric=config.eval.style_rubric or "helpfulness")


@locks(lambda config, **_: RunLayout.of(config).preferences)
def run_prefs(config: DistillConfig, judge_teacher: Any = None) -> dict[str, Any]:
    """The student (train.preference.student: its SFT adapter, or the base) answers every held-in
    instruction greedily; the pairwise judge compares the teacher's answer (A) with the student's (B) in
    both orders. Writes a pairwise judge run into RUN_DIR/preferences (``pairs.jsonl``, judgements,
    summary, manifest) that `train rm` and `train dpo` read. Answers and verdicts are logged and cached:
    a rerun resumes."""
    from distill.answers import AnswerSource
    from distill.judging import run_judge
    from distill.ledger import Ledger
    from distill.train import load_pairs, sft_data, sft_split

    p = config.train.preference
    layout = RunLayout.of(config)
    out = layout.preferences
    pairs = load_pairs(sft_data(config))
    split = sft_split(config)
    if split is not None:  # held-in only: the SFT split's held-out rows stay unseen by every trainer
        train_ids = set(split["train"])
        pairs = [pair for pair in pairs if pair["id"] in train_ids]
    options: dict[str, Any] = {"batch_size": config.eval.batch_size}
    if p.student == "sft":
        adapter = layout.sft
        if not (adapter / "adapter_model.safetensors").is_file():
            raise ConfigError(
                [
                    f"train.preference.student: sft, but {adapter} has no adapter: run `distill train sft` first "
                    "or set it to base"
                ]
            )
        options["adapter"] = str(adapter)
    student = TeacherConfig(backend="transformers", model=config.train.student, options=options)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    answers = AnswerSource.for_teacher(
        student,
        None,
        JsonlLog(out / STUDENT_ANSWERS),
        cache=config.eval.cache,
        ledger=Ledger.for_stage(config, out, "prefs"),
    )
    try:
        requests = [
            ChatRequest(
                messages=[Message(role=m["role"], content=m["content"]) for m in pair["prompt"]],
                temperature=0.0,
                top_p=1.0,
                max_tokens=p.max_tokens,
            )
            for pair in pairs
        ]
        results = answers.generate(requests)
    finally:
        answers.close()
    rows, failed = [], 0
    for pair, result in zip(pairs, results):
        if not result.ok or not result.text.strip():
            failed += 1  # no second answer: no pair (counted)
            continue
        prompt = pair["prompt"][-1]["content"]
        rows.append(
            {"id": pair["id"], "prompt": prompt, "teacher": pair["completion"][-1]["content"], "student": result.text}
        )
    if not rows:
        raise ConfigError([f"train prefs: the student answered none of the {len(pairs)} held-in instructions"])
    write_atomic(out / PAIRS, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if p.rank_by is not None:
        return _rank_prefs(config, out, rows, started, failed, len(pairs), judge_teacher)
    (out / RANKED_PAIRS).unlink(missing_ok=True)  # a pairwise run now: an earlier ranked one must not be read
    spec = preference_judge(config)
    judge_config = config.model_copy(
        update={
            "judge": config.judge.model_copy(
                update={
                    "judges": [spec],
                    "prompt_field": "prompt",
                    "response_field": "teacher",
                    "response_b_field": "student",
                }
            )
        }
    )
    judged = run_judge(judge_config, out / PAIRS, out, teacher=judge_teacher)
    _, counts = preference_pairs(
        [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines() if line.strip()],
        {
            row["id"]: JudgeItem(id=row["id"], prompt=row["prompt"], response=row["teacher"], response_b=row["student"])
            for row in rows
        },
    )
    summary = {
        "instructions": len(pairs),
        "student": p.student,
        "student_failed": failed,
        "judge": spec.label,
        "rubric": spec.rubric,
        "counts": counts,
        "teacher_preferred": counts["chosen_a"],
        "student_preferred": counts["chosen_b"],
        "judge_summary": judged["judges"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    # run_judge wrote the manifest read_pairwise_run checks; keep its config (field names) and add ours.
    write_manifest(out, "train prefs", config_dump(judge_config), {"summary": summary})
    return summary


def _rank_prefs(
    config: DistillConfig,
    out: Path,
    rows: list[dict[str, Any]],
    started: float,
    failed: int,
    instructions: int,
    judge_teacher: Any,
) -> dict[str, Any]:
    """`train prefs` with train.preference.rank_by: each answer judged on its own, the higher reward chosen."""
    from distill.judging import JUDGEMENTS, run_judge

    label = config.train.preference.rank_by
    spec = next((s for s in config.judge.judges if s.label == label), None)
    if spec is None:
        known = ", ".join(s.label for s in config.judge.judges) or "none"
        raise ConfigError([f"train.preference.rank_by: no judge labelled '{label}' in judge.judges; there: {known}"])
    (out / RANKED_PAIRS).unlink(missing_ok=True)  # written last: present means finished
    items = [
        {"id": f"{row['id']}:{who}", "prompt": row["prompt"], "response": row[who]}
        for row in rows
        for who in ("teacher", "student")
    ]
    write_atomic(out / RANKED_ITEMS, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    judge_config = config.model_copy(
        update={
            "judge": config.judge.model_copy(
                update={"judges": [spec], "prompt_field": "prompt", "response_field": "response"}
            )
        }
    )
    judged = run_judge(judge_config, out / RANKED_ITEMS, out, teacher=judge_teacher)
    judgements = [row for _, row, problem in jsonl_lines(out / JUDGEMENTS) if not problem]
    pairs, counts = ranked_pairs(judgements, rows)
    summary = {
        "instructions": instructions,
        "student": config.train.preference.student,
        "student_failed": failed,
        "judge": spec.label,
        "rubric": spec.rubric,
        "ranked": True,
        "counts": counts,
        "teacher_preferred": counts["chosen_a"],
        "student_preferred": counts["chosen_b"],
        "judge_summary": judged["judges"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    record = {"judge": spec.label, "rubric": spec.rubric, "counts": counts, "pairs": pairs}
    write_atomic(out / RANKED_PAIRS, json.dumps(record, indent=2, ensure_ascii=False))
    write_manifest(out, "train prefs", config_dump(judge_config), {"summary": summary})
    return summary

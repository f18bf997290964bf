"""`distill generate`: Alpaca-style self-instruct data that survives crashes and shows its provenance.

Top to bottom: load seed tasks → for each batch of requests (built deterministically from the
seed, the request index and the tasks kept so far) take answers from the run's own log, else the
request cache, else the teacher → save answers (append + fsync) → parse → filter → dedup → append
rows. The answer log is the source of truth: a rerun replays it and rebuilds every output
identically, so killing the process at any moment loses nothing and duplicates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill_prompts import load_template, render

from distill.answers import AnswerSource, RequestCache
from distill.config import DistillConfig, FilterConfig, config_dump
from distill.dedup import NearDuplicateIndex
from distill.errors import ConfigError, DistillError
from distill.ledger import Ledger, stage_cost
from distill.records import (
    ChatRequest,
    ChatResult,
    Instruction,
    Message,
    Provenance,
    SimilarInstruction,
    Usage,
    user_prompt,
)
from distill.runlock import locks
from distill.runstore import JsonlLog, jsonl_lines, unmark_finished, write_atomic, write_manifest
from distill.teacher import Teacher

log = logging.getLogger(__name__)

RESPONSES = "responses.jsonl"
INSTRUCTIONS = "instructions.jsonl"
REJECTED = "rejected.jsonl"
FAILURES = "failures.jsonl"


# Seed tasks ------------------------------------------------------------------------------------


def load_seed_tasks(path: Path | None) -> list[dict[str, Any]]:
    """Seed tasks from JSONL; every problem reported (file and line) before any request is sent."""
    if path is None:
        from distill_prompts import PROMPTS_DIR

        path = PROMPTS_DIR / "seed_tasks.jsonl"
    if not path.is_file():
        raise ConfigError([f"generate.seed_file: {path} not found"])
    tasks, problems = [], []
    for number, row, problem in jsonl_lines(path):
        if problem is not None:
            problems.append(problem)
            continue
        for name in ("instruction", "output"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                problems.append(f"{path} line {number}: '{name}' must be a non-empty string")
        if not isinstance(row.get("input", ""), str):
            problems.append(f"{path} line {number}: 'input' must be a string")
        row.setdefault("id", f"seed_{number}")
        tasks.append(row)
    if problems:
        raise ConfigError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    if not tasks:
        raise ConfigError([f"generate.seed_file: {path} has no tasks; give at least a few seed tasks"])
    return tasks


# Requests and replies --------------------------------------------------------------------------


def reply_schema(tasks_per_request: int) -> dict[str, Any]:
    task = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("instruction", "input", "output")},
        "required": ["instruction", "input", "output"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"tasks": {"type": "array", "items": task, "minItems": 1, "maxItems": tasks_per_request}},
        "required": ["tasks"],
        "additionalProperties": False,
    }


_TASK_HEADER = re.compile(r"^\W*task\s*\d+\W*$", re.I | re.M)
_FIELD = re.compile(r"^\W*(instruction|input|output)\W*:\s?", re.I | re.M)


def parse_reply(text: str, reply_format: str) -> tuple[list[dict[str, str]], list[str]]:
    """Tasks from a teacher reply, and a problem line for each part that is not a task."""
    if reply_format == "json":
        candidate = text.strip()
        fenced = re.search(r"```(?:json)?\s*(.*?)```", candidate, re.S)
        if fenced:
            candidate = fenced.group(1)
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError as exc:
            return [], [f"reply is not JSON: {exc.msg} at char {exc.pos}"]
        items = data.get("tasks") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return [], ["reply JSON has no 'tasks' list"]
        tasks, problems = [], []
        for position, item in enumerate(items):
            if (
                isinstance(item, dict)
                and isinstance(item.get("instruction"), str)
                and isinstance(item.get("output"), str)
            ):
                tasks.append(
                    {
                        "instruction": item["instruction"].strip(),
                        "input": str(item.get("input") or "").strip(),
                        "output": item["output"].strip(),
                    }
                )
            else:
                problems.append(
                    f"task {position}: needs string 'instruction' and 'output', got {json.dumps(item)[:200]}"
                )
        return tasks, problems
    blocks = [block for block in _TASK_HEADER.split(text) if block.strip()]
    tasks, problems = [], []
    for position, block in enumerate(blocks):
        parts = _FIELD.split(block)
        fields: dict[str, str] = {}
        for name, value in zip(parts[1::2], parts[2::2]):
            fields.setdefault(name.lower(), value.strip())
        if fields.get("instruction") and "output" in fields:
            tasks.append(
                {"instruction": fields["instruction"], "input": fields.get("input", ""), "output": fields["output"]}
            )
        else:
            problems.append(f"block {position}: no 'Instruction:' and 'Output:' fields: {block.strip()[:200]!r}")
    if not blocks:
        problems.append("reply has no 'Task N' blocks")
    return tasks, problems


def rejection_reason(task: dict[str, str], filters: FilterConfig, truncated: bool) -> str | None:
    """Why a parsed task is rejected (before dedup), or None."""
    instruction = task["instruction"]
    words = instruction.split()
    if truncated and filters.reject_truncated:
        return "truncated"
    if len(words) < filters.min_instruction_words:
        return "too_short"
    if len(words) > filters.max_instruction_words:
        return "too_long"
    lowered = instruction.lower()
    for phrase in filters.blocklist:
        if re.search(rf"\b{re.escape(phrase.lower())}\b", lowered):
            return f"blocklist:{phrase}"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_with_non_ascii"
    if not task["output"].strip():
        return "empty_output"
    return None


def chat_messages(task: dict[str, str]) -> list[Message]:
    user = user_prompt(task["instruction"], task.get("input", ""))
    return [Message(role="user", content=user), Message(role="assistant", content=task["output"])]


# The run ---------------------------------------------------------------------------------------


@dataclass
class GenerateState:
    kept: list[Instruction] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    sent: int = 0
    cached: int = 0
    replayed: int = 0
    usage: Usage = field(default_factory=Usage)


class Generator:
    """One `distill generate` run over one run directory."""

    def __init__(self, config: DistillConfig, teacher: Teacher | None = None):
        if config.run_dir is None:
            raise ConfigError(["run_dir: required for generate; set run_dir or pass --run-dir"])
        self.config = config
        self.settings = config.generate
        self.run_dir = config.run_dir
        self.seeds = load_seed_tasks(self.settings.seed_file)
        found = load_template(self.settings.template)
        if found is None:
            raise ConfigError([f"generate.template: {self.settings.template} not found under prompts/ or as a path"])
        self.template, self.template_sha = found
        self._teacher = teacher
        self.reply_format = self._reply_format()
        self.index = NearDuplicateIndex(self.settings.filters.rouge_l_threshold)
        for seed in self.seeds:  # like Alpaca, new tasks must differ from the seeds too
            self.index.add(seed["instruction"])
        self.state = GenerateState()
        self.captured: dict[str, Any] | None = None  # the logprob capture's summary (capture_logprobs)

    def _reply_format(self) -> str:
        if self.settings.reply_format != "auto":
            return self.settings.reply_format
        from distill.plugins import get_teachers

        backend = self._teacher.name if self._teacher else self.config.teacher.backend
        return "json" if get_teachers()[backend].supports_response_format else "text"

    def build_request(self, index: int) -> tuple[ChatRequest, list[str]]:
        """Request number ``index``: the same seed, settings and kept tasks give the same request."""
        s = self.settings
        rng = random.Random(f"{s.seed}:{index}")
        examples = rng.sample(self.seeds, min(s.examples_per_request, len(self.seeds)))
        if s.generated_examples_per_request and self.state.kept:
            pool = self.state.kept
            for row in rng.sample(pool, min(s.generated_examples_per_request, len(pool))):
                examples.append(
                    {"id": row.id, "instruction": row.instruction, "input": row.input, "output": row.output}
                )
        prompt = self.template.render(examples=examples, num_tasks=s.tasks_per_request, reply_format=self.reply_format)
        request = ChatRequest(
            messages=[Message(role="user", content=prompt)],
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            seed=self.config.teacher.seed,
            response_format=reply_schema(s.tasks_per_request) if self.reply_format == "json" else None,
        )
        # The slot number is part of the id: identical prompts in two slots are two samples.
        request.id = hashlib.sha256(f"{request.content_hash()}:{index}".encode()).hexdigest()[:20]
        return request, [str(e["id"]) for e in examples]

    def run(self, progress: Any = None) -> dict[str, Any]:
        s = self.settings
        self.run_dir.mkdir(parents=True, exist_ok=True)
        unmark_finished(self.run_dir)
        ledger = Ledger.for_stage(self.config, self.run_dir, "generate")
        answers = AnswerSource.for_teacher(
            self.config.teacher,
            self._teacher,
            JsonlLog(self.run_dir / RESPONSES),
            cache=s.cache,
            ledger=ledger,
            executor=self.config,
        )
        # Derived outputs are rebuilt from the answer log on every start: never a duplicate row.
        outputs = {
            name: (self.run_dir / name).open("w", encoding="utf-8") for name in (INSTRUCTIONS, REJECTED, FAILURES)
        }
        judge, judge_answers = self._filter_judge(answers)
        capture = None
        if s.capture_logprobs:  # the teacher's token distributions on the kept rows (distill train kd)
            from distill.kd_capture import capture_for_generate
            from distill.paths import RunLayout

            capture = capture_for_generate(self.config, answers, RunLayout.of(self.config).logprobs)
        started = time.perf_counter()
        try:
            index = 0
            while len(self.state.kept) < s.target and index < s.max_requests:
                batch = [self.build_request(i) for i in range(index, min(index + s.batch_size, s.max_requests))]
                index += len(batch)
                results = answers.generate([request for request, _ in batch])
                candidates: list[Instruction] = []
                for (request, seed_ids), result in zip(batch, results):
                    candidates += self._process(request, seed_ids, result, outputs, pending=len(candidates))
                    if judge is None:
                        self._keep(candidates, outputs)
                        candidates = []
                    if len(self.state.kept) + len(candidates) >= s.target:
                        break
                if judge is not None:
                    self._judge_and_keep(judge, candidates, outputs)
                for handle in outputs.values():
                    handle.flush()
                if capture is not None:
                    capture.capture(self.state.kept)
                self._count(answers)
                if progress is not None:
                    progress(self.state, time.perf_counter() - started)
        finally:
            for handle in outputs.values():
                handle.close()
            if judge_answers is not None:
                judge_answers.close()
            answers.close()
        self._count(answers)
        if capture is not None:
            self.captured = capture.finish(self.state.kept)
        return self.finish(time.perf_counter() - started)

    def _count(self, answers: AnswerSource) -> None:
        counts = answers.counts
        self.state.requests, self.state.sent = counts.requests, counts.sent
        self.state.cached, self.state.replayed = counts.cached, counts.replayed

    def _filter_judge(self, answers: AnswerSource) -> tuple[Any, AnswerSource | None]:
        """The judge of generate.judge (or None), on its own answer log. With no separate judge
        teacher, it shares the generating teacher (one engine in memory)."""
        if self.settings.judge is None:
            return None, None
        from distill.config import JudgeSpec
        from distill.judge import load_judge
        from distill.judging import JUDGE_RESPONSES

        specs = {spec.label: spec for spec in self.config.judge.judges}
        spec = specs.get(self.settings.judge) or JudgeSpec(type="rubric", rubric=self.settings.judge)
        log = JsonlLog(self.run_dir / JUDGE_RESPONSES)
        judge_teacher = self.config.judge.teacher
        if judge_teacher is None:
            judge_answers = AnswerSource(
                load_teacher=lambda: answers.teacher,
                identity=answers.identity,
                teacher_class=answers.teacher_class,
                model=answers.model,
                log=log,
                cache=RequestCache() if self.config.judge.cache else None,
                owns_teacher=False,
                ledger=answers.ledger,
                options=answers.options,
            )
        else:
            judge_answers = AnswerSource.for_teacher(
                judge_teacher, None, log, cache=self.config.judge.cache, ledger=answers.ledger, executor=self.config
            )
        return load_judge(spec, judge_answers, where="generate.judge"), judge_answers

    def _keep(self, rows: list[Instruction], outputs: dict[str, Any]) -> None:
        for row in rows:
            if len(self.state.kept) >= self.settings.target:
                return
            self.state.kept.append(row)
            outputs[INSTRUCTIONS].write(row.model_dump_json() + "\n")

    def _judge_and_keep(self, judge: Any, candidates: list[Instruction], outputs: dict[str, Any]) -> None:
        """Keep candidates the judge rewards >= min_reward and that are still no near-duplicate of
        a kept row, in order; reject the rest (an invalid verdict is a rejection with its raw
        text, never a pass). Only kept rows join the dedup index."""
        from distill.records import JudgeItem

        if not candidates:
            return
        items = [JudgeItem(id=row.id, prompt=row.messages[0].content, response=row.output) for row in candidates]
        for row, judgement in zip(candidates, judge.judge(items)):
            if len(self.state.kept) >= self.settings.target:
                return
            task = {"instruction": row.instruction, "input": row.input, "output": row.output}
            reason, similar = self._dedup(row.instruction, add=False)  # rows kept earlier in this batch count
            if reason is None and not (judgement.valid and judgement.reward >= self.settings.min_reward):
                reason = "judge_invalid" if not judgement.valid else "low_reward"
            if reason is not None:
                self._reject(
                    outputs,
                    row.id,
                    row.provenance.request_id,
                    reason,
                    task,
                    similar,
                    judgement=judgement.model_dump(),
                )
                continue
            self.index.add(row.instruction)
            kept = row.model_copy(
                update={
                    "judge_reward": judgement.reward,
                    "most_similar_instructions": similar,
                    "max_rouge_l": similar[0].rouge_l if similar else 0.0,
                }
            )
            self._keep([kept], outputs)

    def _dedup(self, instruction: str, add: bool) -> tuple[str | None, list[SimilarInstruction]]:
        """("near_duplicate" or None, the kept instructions within reach); ``add`` puts a kept one
        into the index."""
        if add:
            kept, neighbours = self.index.check_and_add(instruction)
        else:
            neighbours = self.index.neighbours(instruction)
            kept = not (neighbours and neighbours[0].score >= self.index.threshold)
        similar = [
            SimilarInstruction(instruction=self.index.texts[n.index], rouge_l=round(n.score, 4))
            for n in neighbours[:10]
        ]
        return (None if kept else "near_duplicate"), similar

    def _reject(
        self,
        outputs: dict[str, Any],
        row_id: str,
        request_id: str,
        reason: str,
        task: dict[str, str],
        similar: list[SimilarInstruction],
        **extra: Any,
    ) -> None:
        self.state.rejected[reason.split(":")[0]] += 1
        record = {
            "id": row_id,
            "request_id": request_id,
            "reason": reason,
            **task,
            "most_similar_instructions": [n.model_dump() for n in similar],
            **extra,
        }
        outputs[REJECTED].write(json.dumps(record, ensure_ascii=False) + "\n")

    def _process(
        self, request: ChatRequest, seed_ids: list[str], result: ChatResult, outputs: dict[str, Any], pending: int = 0
    ) -> list[Instruction]:
        """Parse, filter and dedup one reply; return the rows that pass (not yet kept)."""
        state, s = self.state, self.settings
        candidates: list[Instruction] = []
        state.usage.prompt_tokens += result.usage.prompt_tokens
        state.usage.completion_tokens += result.usage.completion_tokens

        def fail(reason: str, **extra: Any) -> None:
            state.failed[reason.split(":")[0]] += 1
            outputs[FAILURES].write(json.dumps({"request_id": request.id, "reason": reason, **extra}) + "\n")

        if result.error is not None:
            fail(f"teacher_error:{result.error.kind}", error=result.error.model_dump())
            return candidates
        text, finish_reason = result.texts[0], result.finish_reasons[0]
        tasks, problems = parse_reply(text, self.reply_format)
        if not tasks:
            fail("unparseable_reply", problems=problems, finish_reason=finish_reason, raw=text)
            return candidates
        for problem in problems:
            fail("unparseable_task", problem=problem, raw=text)
        created = result.created or datetime.now(timezone.utc).isoformat()
        for position, task in enumerate(tasks):
            if len(state.kept) + pending + len(candidates) >= s.target:
                return candidates
            row_id = f"{request.id}-{position}"
            truncated = finish_reason == "length" and position == len(tasks) - 1  # Alpaca: the last one
            reason = rejection_reason(task, s.filters, truncated)
            similar: list[SimilarInstruction] = []
            if reason is None:
                # Without a judge every row that passes is kept, so it joins the index now; with a
                # judge only rows the judge keeps may join (checked again in _judge_and_keep).
                reason, similar = self._dedup(task["instruction"], add=self.settings.judge is None)
            if reason is not None:
                self._reject(outputs, row_id, request.id, reason, task, similar)
                continue
            row = Instruction(
                id=row_id,
                instruction=task["instruction"],
                input=task["input"],
                output=task["output"],
                messages=chat_messages(task),
                most_similar_instructions=similar,
                max_rouge_l=similar[0].rouge_l if similar else 0.0,
                provenance=Provenance(
                    backend=result.backend,
                    model=result.model,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_tokens=request.max_tokens,
                    seed=request.seed,
                    template_sha256=self.template_sha,
                    seed_ids=seed_ids,
                    request_id=request.id,
                    item_index=position,
                    created=created,
                    usage=result.usage,
                ),
            )
            candidates.append(row)
        return candidates

    def finish(self, seconds: float) -> dict[str, Any]:
        """Write the dataset (HF, Parquet, alpaca.json), the card and the manifest; return the summary."""
        state, s = self.state, self.settings
        summary: dict[str, Any] = {
            "kept": len(state.kept),
            "target": s.target,
            "complete": len(state.kept) >= s.target,
            "requests": state.requests,
            "sent_to_teacher": state.sent,
            "from_cache": state.cached,
            "replayed_from_log": state.replayed,
            "rejected": dict(state.rejected),
            "failed": dict(state.failed),
            "usage": state.usage.model_dump(),
            "seconds": round(seconds, 1),
            "cost_usd": self.cost(),
            "cost": stage_cost(self.run_dir, "generate"),
            "reply_format": self.reply_format,
            **({"logprobs": self.captured} if self.captured is not None else {}),
        }
        rows = [row.model_dump(mode="json") for row in state.kept]
        write_dataset(self.run_dir, rows)
        write_atomic(
            self.run_dir / "alpaca.json",
            json.dumps(
                [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows],
                indent=2,
                ensure_ascii=False,
            ),
        )
        write_atomic(self.run_dir / "README.md", dataset_card(self.config, summary))
        write_manifest(self.run_dir, "generate", config_dump(self.config), {"summary": summary})
        return summary

    def cost(self) -> float | None:
        """What this run's generate stage paid its teachers, from its ledger, as their plugins price
        it (None: a price is unknown, or nothing was billed)."""
        cost = stage_cost(self.run_dir, "generate")["usd"]
        return None if cost is None else round(cost, 4)


def write_dataset(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The kept rows as a Hugging Face dataset (save_to_disk) and Parquet, each written atomically."""
    import datasets

    dataset = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"id": []})
    staging = run_dir / "dataset.partial"
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    shutil.rmtree(run_dir / "dataset", ignore_errors=True)
    staging.rename(run_dir / "dataset")
    dataset.to_parquet(str(run_dir / "instructions.parquet.tmp"))
    (run_dir / "instructions.parquet.tmp").replace(run_dir / "instructions.parquet")


def dataset_card(config: DistillConfig, summary: dict[str, Any]) -> str:
    return render(
        "cards/dataset.md.jinja", config=config, summary=summary, command=" ".join(["distill", *sys.argv[1:]])
    )


@locks(lambda config, **_: config.run_dir)  # one writer per run dir, before anything is written or sent
def run_generate(config: DistillConfig, teacher: Teacher | None = None, progress: Any = None) -> dict[str, Any]:
    """Run (or resume) `distill generate` for a validated config; return the summary."""
    if config.generate.target > config.generate.max_requests * config.generate.tasks_per_request:
        raise DistillError("generate.target can't be reached: it exceeds max_requests × tasks_per_request")
    return Generator(config, teacher).run(progress)

"""The teacher's token distributions on the kept rows, captured compactly for offline distillation.

What is captured: for every kept row, the teacher *scores* the row as the student will be trained
on it: the chat-rendered prompt and the row's answer, teacher-forced (``ChatRequest.prompt_logprobs``:
vLLM's ``prompt_logprobs``, one transformers forward pass, or a vLLM OpenAI-compatible server). For
every answer token (the closing end-of-turn tokens included, as SFT trains on them) it keeps the
token's id and logprob and the teacher's top-K alternatives (ids and logprobs). Not the logprobs
that came with the self-instruct reply: those were conditioned on the self-instruct prompt and on
JSON escaping, not on the row's own instruction, so they are the wrong targets for the student.

Storage, ``RUN_DIR/logprobs/`` (``LogprobStore``):

    shard-<hash>.safetensors  per batch of rows: token_ids [N], token_logprobs [N] (fp16),
                              top_ids [N, K] (uint16 when the vocabulary fits, else int32),
                              top_logprobs [N, K] (fp16): 2 + 2 + 4K bytes per token with uint16 ids
    index.jsonl               one line per captured row: id, shard, offset, length, where its answer
                              starts in the rendered sequence, and a hash of the rendered ids
    capture.json              K, dtypes, the tokenizer's identity, counts, bytes per token

A shard is written atomically before its index lines are appended (fsynced), so a SIGKILL leaves at
worst an unreferenced shard; the rows of that batch are scored again on the rerun. A row is in the
index at most once per rendering; ``finish`` compacts the index to exactly the kept rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, DistillError
from distill.records import ChatRequest, Message
from distill.runstore import JsonlLog, write_atomic

INDEX = "index.jsonl"
CAPTURE = "capture.json"
FP16_FLOOR = -60000.0  # fp16's lowest finite value is -65504: -inf alternatives are stored as this


# Tokenizers ------------------------------------------------------------------------------------


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """A model's tokenizer (alias, directory or hub id) with the chat template distill trains with:
    its own, or distill's default for base models without one. Loads no weights."""
    from transformers import AutoTokenizer

    from distill.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        from distill_prompts import read_prompt

        tokenizer.chat_template = read_prompt("chat_templates/default.jinja")
    return tokenizer


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What must match between teacher and student for token-level distillation: the vocabulary
    (every token string and its id, added tokens included) as a hash, and its size. The chat
    template is recorded too, but only the rendered ids decide (they are compared row by row)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16],
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16],
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
    }


def tokenizer_mismatch(student: dict[str, Any], teacher: dict[str, Any], student_name: str, teacher_name: str) -> str:
    """One line saying why two tokenizers can't be used for token-level distillation, or ''."""
    if student["vocab_sha256"] == teacher["vocab_sha256"]:
        return ""
    return (
        f"tokenizer mismatch: student {student_name} ({student['vocab_size']} tokens, vocab {student['vocab_sha256']}) "
        f"and teacher {teacher_name} ({teacher['vocab_size']} tokens, vocab {teacher['vocab_sha256']}) "
        "don't share a vocabulary, so the teacher's token distributions mean nothing to the student; use a "
        "student with the teacher's tokenizer (e.g. `distill models prune TEACHER --keep-layers N --out DIR`) "
        "or a cross-tokenizer method such as TRL's GOLD"
    )


def rendered_row(tokenizer: Any, pair: dict[str, Any]) -> tuple[list[int], int]:
    """The row's token ids exactly as training renders them (``train.tokenized_pair``, uncut) and
    where its answer starts."""
    from distill.train import tokenized_pair

    tokens = tokenized_pair(tokenizer, pair, max_length=1 << 30)
    mask = tokens["completion_mask"]
    return tokens["input_ids"], mask.index(1) if 1 in mask else len(mask)


def ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


# The store -------------------------------------------------------------------------------------


@dataclass
class RowLogprobs:
    """The teacher's distribution on one row's answer tokens (numpy arrays, as stored)."""

    token_ids: Any  # [T]
    token_logprobs: Any  # [T]
    top_ids: Any  # [T, K]
    top_logprobs: Any  # [T, K]
    answer_start: int  # index of the first answer token in the rendered sequence
    ids_sha: str  # hash of the rendered ids the scores belong to


class LogprobStore:
    """``RUN_DIR/logprobs/``: append-only shards + index (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.index = JsonlLog(directory / INDEX)
        self._entries: dict[str, dict[str, Any]] | None = None
        self._shards: dict[str, dict[str, Any]] = {}

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """Row id → its latest index line (a torn last line is dropped and its rows redone)."""
        if self._entries is None:
            self._entries = {row["id"]: row for row in self.index.read()}
        return self._entries

    def manifest(self) -> dict[str, Any]:
        path = self.dir / CAPTURE
        if not path.is_file():
            raise ConfigError(
                [
                    f"{self.dir}: no captured logprobs ({CAPTURE} missing); run `distill generate` with "
                    "generate.capture_logprobs=K (K ≤ 20) first"
                ]
            )
        return json.loads(path.read_text())

    def write(self, rows: list[tuple[str, RowLogprobs]], k: int) -> None:
        """One shard for these rows, then their index lines (fsynced). Ids are uint16 when every id in
        the shard fits (vocabularies up to 65,536 tokens), else int32."""
        import numpy as np
        from safetensors.numpy import save_file

        if not rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        top = max(max(int(r.top_ids.max()), int(r.token_ids.max())) for _, r in rows)
        id_dtype = "uint16" if top <= 65535 else "int32"
        name = f"shard-{hashlib.sha256('|'.join(r[0] + r[1].ids_sha for r in rows).encode()).hexdigest()[:16]}"
        arrays = {
            "token_ids": np.concatenate([r.token_ids for _, r in rows]).astype(id_dtype),
            "token_logprobs": np.concatenate([r.token_logprobs for _, r in rows]).astype(np.float16),
            "top_ids": np.concatenate([r.top_ids for _, r in rows]).astype(id_dtype),
            "top_logprobs": np.concatenate([r.top_logprobs for _, r in rows]).astype(np.float16),
        }
        temporary = self.dir / f"{name}.safetensors.tmp"
        save_file(arrays, str(temporary))
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, self.dir / f"{name}.safetensors")
        lines, offset = [], 0
        for row_id, row in rows:
            length = len(row.token_ids)
            lines.append(
                {
                    "id": row_id,
                    "shard": name,
                    "offset": offset,
                    "length": length,
                    "answer_start": row.answer_start,
                    "ids_sha": row.ids_sha,
                    "k": k,
                }
            )
            offset += length
        self.index.append(lines)
        self.entries.update((line["id"], line) for line in lines)

    def get(self, row_id: str) -> RowLogprobs | None:
        """A row's stored arrays (fp16 logprobs as stored), or None if it wasn't captured."""
        entry = self.entries.get(row_id)
        if entry is None:
            return None
        shard = self._shard(entry["shard"])
        part = slice(entry["offset"], entry["offset"] + entry["length"])
        return RowLogprobs(
            token_ids=shard["token_ids"][part],
            token_logprobs=shard["token_logprobs"][part],
            top_ids=shard["top_ids"][part],
            top_logprobs=shard["top_logprobs"][part],
            answer_start=entry["answer_start"],
            ids_sha=entry["ids_sha"],
        )

    def _shard(self, name: str) -> dict[str, Any]:
        from safetensors.numpy import load_file

        if name not in self._shards:
            path = self.dir / f"{name}.safetensors"
            if not path.is_file():
                raise DistillError(f"{path}: listed in {self.index.path} but missing; run the capture again")
            self._shards[name] = load_file(str(path))
        return self._shards[name]

    def compact(self, keep: list[str]) -> None:
        """Rewrite the index with exactly the rows in ``keep`` (their latest lines, in that order) and
        delete shards nothing refers to any more (those of a SIGKILLed batch, stale renderings); a
        shard that still holds one kept row stays whole."""
        lines = [self.entries[row_id] for row_id in keep if row_id in self.entries]
        write_atomic(self.dir / INDEX, "".join(json.dumps(line) + "\n" for line in lines))
        self._entries = {line["id"]: line for line in lines}
        used = {line["shard"] for line in lines}
        for path in self.dir.glob("shard-*.safetensors*"):
            if path.name.split(".")[0] not in used:
                path.unlink(missing_ok=True)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("shard-*.safetensors"))


# Capture ---------------------------------------------------------------------------------------


@dataclass
class CaptureCounts:
    rows: int = 0
    scored: int = 0  # rows sent to the teacher in this process
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class LogprobCapture:
    """Scores kept rows with the teacher and stores their top-K distributions (resumable)."""

    def __init__(self, directory: Path, k: int, tokenizer: Any, teacher: Any, source: dict[str, Any]):
        """``teacher``: a zero-argument callable returning the loaded teacher (loaded only when a row
        still needs scoring); ``source``: what the capture came from (backend, model), recorded."""
        if not 1 <= k <= 20:
            raise ConfigError([f"generate.capture_logprobs: must be between 1 and 20, got {k}"])
        self.store = LogprobStore(directory)
        self.k = k
        self.tokenizer = tokenizer
        self.identity = tokenizer_identity(tokenizer)
        self._teacher = teacher
        self.source = source
        self.counts = CaptureCounts()
        self._tried: set[str] = set()  # rows attempted in this process: a failure is retried on the next run
        previous = directory / CAPTURE
        if previous.is_file():
            recorded = json.loads(previous.read_text())
            if (
                recorded.get("k") != k
                or recorded.get("tokenizer", {}).get("vocab_sha256") != self.identity["vocab_sha256"]
            ):
                self.store.compact([])  # another K or tokenizer: nothing stored can be reused
            (directory / CAPTURE).unlink()  # a capture in progress is not a finished one

    def capture(self, rows: list[Any]) -> None:
        """Score every row (``Instruction`` or dict with messages) not captured yet, in one batch."""
        from distill.train import conversation

        started = time.perf_counter()
        todo: list[tuple[str, list[int], int, ChatRequest]] = []
        for row in rows:
            data = row if isinstance(row, dict) else row.model_dump(mode="json")
            row_id = str(data["id"])
            if row_id in self._tried:
                continue
            self._tried.add(row_id)
            pair = conversation(data)
            if pair is None:
                self._fail("no_conversation")
                continue
            ids, start = rendered_row(self.tokenizer, {"prompt": pair[0], "completion": pair[1]})
            entry = self.store.entries.get(row_id)
            if entry is not None and entry["ids_sha"] == ids_hash(ids) and entry.get("k") == self.k:
                continue  # captured before this run
            messages = [Message.model_validate(m) for m in pair[0] + pair[1]]
            request = ChatRequest(messages=messages, max_tokens=1, temperature=0.0, prompt_logprobs=self.k)
            todo.append((row_id, ids, start, request))
        if todo:
            results = self._teacher().generate([request for *_, request in todo])
            stored = []
            for (row_id, ids, start, _), result in zip(todo, results):
                self.counts.scored += 1
                scored = self._row(result, ids, start)
                if isinstance(scored, str):
                    self._fail(scored)
                else:
                    stored.append((row_id, scored))
            self.store.write(stored, self.k)
        self.counts.seconds += time.perf_counter() - started

    def _fail(self, reason: str) -> None:
        self.counts.failed[reason] = self.counts.failed.get(reason, 0) + 1

    def _row(self, result: Any, ids: list[int], start: int) -> RowLogprobs | str:
        """The answer tokens' scores of one result, or why there are none."""
        import numpy as np

        if result.error is not None:
            if result.error.fatal:
                raise DistillError(f"capturing logprobs: {result.error.message}")
            return f"teacher_error:{result.error.kind}"
        if result.prompt_token_ids != ids:
            # The teacher rendered the conversation differently (another chat template, BOS): its
            # scores would belong to other tokens than the student trains on.
            return "rendering_mismatch"
        positions = result.prompt_logprobs[start:]
        if not positions or any(p is None or p.top_ids is None or len(p.top_ids) < self.k for p in positions):
            return "incomplete_logprobs"
        top = [sorted(p.top_ids.items(), key=lambda item: -item[1])[: self.k] for p in positions]
        return RowLogprobs(
            token_ids=np.array(ids[start:]),
            token_logprobs=np.maximum(np.array([p.logprob for p in positions], dtype=np.float32), FP16_FLOOR),
            top_ids=np.array([[i for i, _ in t] for t in top]),
            top_logprobs=np.maximum(np.array([[v for _, v in t] for t in top], dtype=np.float32), FP16_FLOOR),
            answer_start=start,
            ids_sha=ids_hash(ids),
        )

    def finish(self, kept: list[Any]) -> dict[str, Any]:
        """Compact the index to the kept rows and write capture.json; return its summary."""
        kept_ids = [str(row["id"] if isinstance(row, dict) else row.id) for row in kept]
        self.store.compact(kept_ids)
        tokens = sum(entry["length"] for entry in self.store.entries.values())
        shard_bytes = self.store.nbytes()
        index_bytes = (self.store.dir / INDEX).stat().st_size if (self.store.dir / INDEX).exists() else 0
        summary = {
            "k": self.k,
            "rows": len(self.store.entries),
            "kept_rows": len(kept_ids),
            "missing_rows": len(kept_ids) - len(self.store.entries),
            "tokens": tokens,
            "shard_bytes": shard_bytes,
            "bytes_per_token": round(shard_bytes / tokens, 1) if tokens else None,
            "bytes_per_token_with_index": round((shard_bytes + index_bytes) / tokens, 1) if tokens else None,
            "id_dtype": sorted({str(self.store.get(i).top_ids.dtype) for i in self.store.entries}),
            "logprob_dtype": "float16",
            "tokenizer": self.identity,
            "source": self.source,
            "scored_this_run": self.counts.scored,
            "failed": dict(self.counts.failed),
            "seconds": round(self.counts.seconds, 1),
        }
        self.store.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.store.dir / CAPTURE, json.dumps(summary, indent=2))
        return summary


def capture_for_generate(config: Any, answers: Any, directory: Path) -> LogprobCapture | None:
    """The capture of `distill generate` (generate.capture_logprobs > 0), or None. The tokenizer is
    generate.capture_tokenizer, else the teacher's own model (local backends)."""
    k = config.generate.capture_logprobs
    if not k:
        return None
    name = config.generate.capture_tokenizer
    if name is None:
        if config.teacher.backend not in ("vllm", "transformers"):
            raise ConfigError(
                [
                    "generate.capture_tokenizer: required with the "
                    f"{config.teacher.backend} teacher: a local copy of the served model's tokenizer (alias or "
                    "directory), to render rows as the student will see them"
                ]
            )
        name = config.teacher.model
    tokenizer = load_tokenizer(name)
    source = {"backend": config.teacher.backend, "model": config.teacher.model, "tokenizer": name}
    return LogprobCapture(directory, k, tokenizer, lambda: answers.teacher, source)

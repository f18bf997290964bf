"""Ground-truthing with retrieval: an embedded, file-based BM25 index over a document corpus, and
the eval models that answer with the top-k passages in their prompt.

**The index** (``distill index build CORPUS --out DIR``) is one SQLite file with an FTS5 table
(``DIR/index.sqlite``: Okapi BM25 ranking, the ``porter unicode61 remove_diacritics 2``
tokenizer, so "Bogota" finds "Bogotá" and "languages" finds "language") and ``DIR/manifest.json``
(the corpus files with their sha256, the chunking settings, counts), written last: a directory
without it is not an index. No embedding model is needed, or used: this machine can download
none, so BM25 is the one retriever (see the README for why there is no vector store).

**Chunks.** Markdown and text files are cut into paragraphs (runs of non-blank lines); paragraphs
are merged into chunks of at most ``max_words`` words, a Markdown heading always starts a new
chunk, and a paragraph longer than ``max_words`` is cut into windows of ``max_words`` words. A
JSONL file holds one document per line (``text``; optional ``id``, ``title``). A chunk's id is
``DOC#OFFSET``: the document (the file's path relative to the corpus root, or a JSONL row's
``id``, else ``FILE:LINE``) and the character offset where the chunk starts in the document's text,
so ids are stable for unchanged files and a test can assert them exactly.

**Grounded eval models** (``eval.models[].retrieval: {index, k}``, or ``eval.retrieval`` for
grounded copies of the default models): each factual question is looked up with its own text
(never the answers), and the model is asked ``prompts/eval/grounded.jinja``: the passages, then
the question exactly as the ungrounded models get it. The passages are part of the prompt, so
grounded requests have their own ids and cache keys. Each prediction row records the retrieved
chunk ids and scores and whether the passage that answers the question came back
(``retrieval_hit``), from which **recall@k** is reported per model and task: a bad index can't
pass for a bad model.

**The right passage.** A question names the documents that hold its answer in
``Question.sources`` (countries: the questioned country's fact sheet in the demo corpus,
``france.md``; for a shared capital, every country sharing it; your JSONL questions: an optional
``sources`` list of document names). A retrieved chunk is right when its document is one of them
(the same relative path, or a path ending in ``/`` + it). Questions without sources have no
recall (n/a), and when none of the named documents is in the index at all the index was built
from another corpus: recall is n/a with that reason, never 0%.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.runstore import MANIFEST, jsonl_lines, read_text, write_manifest
from distill.stats import bootstrap_interval, describe_change, excludes_zero, mean, paired_bootstrap, pct, points

INDEX_FILE = "index.sqlite"
SUFFIXES = {".md": "text", ".markdown": "text", ".txt": "text", ".jsonl": "jsonl"}
TOKENIZER = "porter unicode61 remove_diacritics 2"
GROUNDED_TEMPLATE = "eval/grounded.jinja"
DEFAULT_MAX_WORDS = 200


@dataclass(frozen=True)
class Chunk:
    """A piece of one document: ``text == document_text[start:end]``."""

    id: str
    doc: str
    start: int
    end: int
    text: str
    title: str = ""


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk with its BM25 score (higher is better)."""

    id: str
    doc: str
    title: str
    text: str
    score: float


# Chunking --------------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")  # a run of non-blank lines
_WORD = re.compile(r"\S+")


def paragraphs(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph, leading indentation left out."""
    spans = []
    for match in _PARAGRAPH.finditer(text):
        start = match.start() + len(match.group()) - len(match.group().lstrip())
        spans.append((start, match.end()))
    return spans


def chunk_spans(text: str, max_words: int = DEFAULT_MAX_WORDS) -> list[tuple[int, int]]:
    """Paragraphs merged up to ``max_words`` words; a Markdown heading starts a new chunk; a longer
    paragraph becomes windows of ``max_words`` words."""
    chunks: list[tuple[int, int]] = []
    current: list[int] = []  # [start, end, words] of the chunk being filled
    for start, end in paragraphs(text):
        words = [m.span() for m in _WORD.finditer(text, start, end)]
        heading = text.startswith("#", start)
        if current and (heading or current[2] + len(words) > max_words):
            chunks.append((current[0], current[1]))
            current = []
        if len(words) > max_words:
            for first in range(0, len(words), max_words):
                window = words[first : first + max_words]
                chunks.append((window[0][0], window[-1][1]))
            continue
        current = [current[0], end, current[2] + len(words)] if current else [start, end, len(words)]
    if current:
        chunks.append((current[0], current[1]))
    return chunks


def corpus_files(corpus: Path) -> list[Path]:
    """The indexable files of a corpus (a file, or a directory searched recursively; hidden files
    and folders skipped), in a stable order."""
    if corpus.is_file():
        if corpus.suffix.lower() not in SUFFIXES:
            raise ConfigError([f"{corpus}: not a corpus file; use {', '.join(sorted(SUFFIXES))} files or a folder"])
        return [corpus]
    if not corpus.is_dir():
        raise ConfigError([f"{corpus}: no such file or folder"])
    return sorted(
        (
            path
            for path in corpus.rglob("*")
            if path.is_file()
            and path.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(corpus).parts)
        ),
        key=lambda path: path.relative_to(corpus).as_posix(),
    )


def read_corpus(corpus: Path, max_words: int = DEFAULT_MAX_WORDS) -> tuple[list[Chunk], list[dict[str, Any]]]:
    """Every chunk of the corpus, and one record per file (path, sha256, bytes, documents, chunks).
    Every problem (bad JSON, a row without text, a repeated document id) is reported at once."""
    root = corpus if corpus.is_dir() else corpus.parent
    chunks: list[Chunk] = []
    files: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for path in corpus_files(corpus):
        relative = path.relative_to(root).as_posix()
        documents: list[tuple[str, str, str]] = []  # (doc, title, text)
        if SUFFIXES[path.suffix.lower()] == "jsonl":
            for number, row, problem in jsonl_lines(path):
                if problem is not None:
                    problems.append(problem)
                elif not isinstance(row.get("text"), str) or not row["text"].strip():
                    problems.append(f"{path} line {number}: needs a non-empty 'text' string")
                else:
                    doc = str(row["id"]) if row.get("id") not in (None, "") else f"{relative}:{number}"
                    documents.append((doc, str(row.get("title") or ""), row["text"]))
        else:
            documents.append((relative, "", read_text(path)))
        count = 0
        for doc, title, text in documents:
            if doc in seen:
                problems.append(f"{path}: document id {doc!r} is also used in {seen[doc]}")
                continue
            seen[doc] = relative
            for start, end in chunk_spans(text, max_words):
                chunks.append(
                    Chunk(id=f"{doc}#{start}", doc=doc, start=start, end=end, text=text[start:end], title=title)
                )
                count += 1
        data = path.read_bytes()
        files.append(
            {
                "path": relative,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "documents": len(documents),
                "chunks": count,
            }
        )
    if problems:
        raise ConfigError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    if not chunks:
        raise ConfigError([f"{corpus}: no text to index ({', '.join(sorted(SUFFIXES))} files)"])
    return chunks, files


# The index -------------------------------------------------------------------------------------


def build_index(corpus: Path, out: Path, max_words: int = DEFAULT_MAX_WORDS) -> dict[str, Any]:
    """Index ``corpus`` into ``out`` (index.sqlite + manifest.json); return the manifest's index
    record. The SQLite file is built beside its final name and moved into place, and the manifest
    is written last, so an interrupted build never looks like an index."""
    if max_words < 1:
        raise ConfigError([f"--max-words: must be >= 1, got {max_words}"])
    chunks, files = read_corpus(corpus, max_words)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    staging = out / (INDEX_FILE + ".partial")
    staging.unlink(missing_ok=True)
    db = sqlite3.connect(staging)
    try:
        db.execute(
            "CREATE VIRTUAL TABLE passages USING fts5(id UNINDEXED, doc UNINDEXED, title, text, "
            f"tokenize='{TOKENIZER}')"
        )
        db.executemany(
            "INSERT INTO passages (id, doc, title, text) VALUES (?, ?, ?, ?)",
            [(c.id, c.doc, c.title, c.text) for c in chunks],
        )
        db.execute("INSERT INTO passages (passages) VALUES ('optimize')")  # one b-tree segment: faster queries
        db.commit()
    finally:
        db.close()
    os.replace(staging, out / INDEX_FILE)
    record = {
        "kind": "bm25",
        "library": f"SQLite FTS5 (SQLite {sqlite3.sqlite_version})",
        "tokenizer": TOKENIZER,
        "corpus": str(corpus.resolve()),
        "chunking": {"by": "paragraph, merged up to max_words; headings start a chunk", "max_words": max_words},
        "files": files,
        "documents": sum(f["documents"] for f in files),
        "chunks": len(chunks),
        "built": datetime.now(timezone.utc).isoformat(),
    }
    write_manifest(out, "index", {"corpus": str(corpus), "max_words": max_words}, {"index": record})
    return record


def fts_query(text: str) -> str:
    """An FTS5 query matching any word of ``text`` (each quoted, so no word is read as an operator);
    BM25 ranks the documents that share the rarer words highest."""
    words = dict.fromkeys(word.lower() for word in re.findall(r"\w+", text))
    return " OR ".join(f'"{word}"' for word in words)


class Index:
    """A built index, opened read-only."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not (self.directory / INDEX_FILE).is_file() or not manifest.is_file():
            build = f"`distill index build CORPUS --out {self.directory}`"
            raise ConfigError(
                [f"{self.directory}: not a retrieval index (no {INDEX_FILE} or {MANIFEST}); build it: {build}"]
            )
        self.manifest = json.loads(manifest.read_text())["index"]
        self.db = sqlite3.connect(f"file:{(self.directory / INDEX_FILE).resolve()}?mode=ro", uri=True)
        self._docs: set[str] | None = None

    @property
    def identity(self) -> str:
        """A short hash of what the index holds (its files and chunking), for provenance."""
        files = [(f["path"], f["sha256"]) for f in self.manifest["files"]]
        blob = json.dumps({"files": files, "chunking": self.manifest["chunking"]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def docs(self) -> set[str]:
        if self._docs is None:
            self._docs = {row[0] for row in self.db.execute("SELECT DISTINCT doc FROM passages")}
        return self._docs

    def search(self, query: str, k: int) -> list[Passage]:
        """The ``k`` best chunks for ``query`` by BM25, best first (ties: index order)."""
        match = fts_query(query)
        if not match or k < 1:
            return []
        rows = self.db.execute(
            "SELECT id, doc, title, text, bm25(passages) AS rank FROM passages WHERE passages MATCH ? "
            "ORDER BY rank, rowid LIMIT ?",
            (match, k),
        ).fetchall()
        return [Passage(id=i, doc=d, title=t, text=x, score=round(-r, 6)) for i, d, t, x, r in rows]

    def close(self) -> None:
        self.db.close()


def source_matches(doc: str, source: str) -> bool:
    """A chunk's document is the named source: the same path, or a path ending in '/' + it (a corpus
    indexed from a folder above)."""
    return doc == source or doc.endswith("/" + source)


# Grounded eval models --------------------------------------------------------------------------


class Grounding:
    """The retrieval of one eval model; without a retrieval spec it changes nothing (prompts stay
    as they are, rows get no retrieval fields), so the eval loop treats every model alike."""

    def __init__(self, spec: Any = None):
        self.spec = spec
        self.index = Index(Path(spec.index)) if spec is not None else None

    @classmethod
    def of(cls, model: Any) -> Grounding:
        return cls(getattr(model, "retrieval", None))

    def search(self, questions: Sequence[Any]) -> list[list[Passage] | None]:
        if self.index is None:
            return [None] * len(questions)
        return [self.index.search(q.question, self.spec.k) for q in questions]

    def prompt(self, prompt: str, passages: list[Passage] | None) -> str:
        if passages is None:
            return prompt
        from distill_prompts import render

        return render(GROUNDED_TEMPLATE, passages=passages, prompt=prompt)

    def fields(self, question: Any, passages: list[Passage] | None) -> dict[str, Any]:
        """What a prediction row records about the retrieval: chunk ids and scores, whether the
        answering document came back (None: the question names none), whether it is indexed."""
        if passages is None or self.index is None:
            return {}
        sources = list(getattr(question, "sources", None) or [])
        docs = self.index.docs()
        return {
            "retrieved": [p.id for p in passages],
            "retrieved_scores": [p.score for p in passages],
            "retrieval_hit": any(source_matches(p.doc, s) for p in passages for s in sources) if sources else None,
            "source_indexed": any(source_matches(d, s) for d in docs for s in sources) if sources else None,
        }

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def grounded_copies(models: list[Any], spec: Any) -> list[Any]:
    """``eval.retrieval``: a grounded copy (``NAME+retrieval``) of every model whose role is in
    ``spec.roles`` and that has no retrieval of its own, after all the models."""
    if spec is None:
        return models
    from distill.config import RetrievalSpec

    own = RetrievalSpec(index=spec.index, k=spec.k)
    copies = [
        model.model_copy(update={"name": f"{model.name}+retrieval", "retrieval": own})
        for model in models
        if model.role in spec.roles and model.retrieval is None
    ]
    return models + copies


def recall_table(predictions: list[dict[str, Any]], resamples: int) -> dict[str, dict[str, Any]]:
    """task → grounded model → recall@k: the share of questions (that name their source) whose
    source came back among the k passages, with a bootstrap interval; n/a with the reason when no
    question names a source, or none of the named documents is in the index."""
    table: dict[str, dict[str, Any]] = {}
    for row in predictions:
        if "retrieved" in row:
            table.setdefault(row["task"], {}).setdefault(row["model"], []).append(row)
    out: dict[str, dict[str, Any]] = {}
    for task, by_model in table.items():
        out[task] = {}
        for model, rows in by_model.items():
            named = [r for r in rows if r["retrieval_hit"] is not None]
            hits = [float(r["retrieval_hit"]) for r in named]
            entry: dict[str, Any] = {
                "k": max(len(r["retrieved"]) for r in rows),
                "asked": len(rows),
                "questions": len(named),
                "source_missing": sum(1 for r in named if not r["source_indexed"]),
                "recall": None,
                "interval": None,
                "reason": None,
            }
            if not named:
                entry["reason"] = "no question names the document that answers it (Question.sources)"
            elif not any(r["source_indexed"] for r in named):
                entry["reason"] = "none of the documents the questions name is in the index (another corpus?)"
            else:
                entry["recall"] = mean(hits)
                entry["interval"] = list(bootstrap_interval(hits, resamples))
            out[task][model] = entry
    return out


# The report ------------------------------------------------------------------------------------


def gap_end(models: list[dict[str, Any]], role: str) -> str:
    """The model at one end of the gap: the first of ``role`` without retrieval (older summaries
    have no retrieval field), else the first of ``role``."""
    plain = [m["name"] for m in models if m["role"] == role and not m.get("retrieval")]
    return plain[0] if plain else next(m["name"] for m in models if m["role"] == role)


def students(models: list[dict[str, Any]]) -> list[str]:
    """The students compared with base and teacher: every tuned model, and the base student with
    retrieval (how much of the gap grounding alone closes)."""
    return [m["name"] for m in models if m["role"] == "tuned" or (m["role"] == "base" and m.get("retrieval"))]


def _counterpart(models: list[dict[str, Any]], grounded: dict[str, Any]) -> str | None:
    """The same model without retrieval (same role, backend, model and adapter)."""
    key = ("role", "backend", "model", "adapter")
    return next(
        (m["name"] for m in models if not m.get("retrieval") and all(m.get(f) == grounded.get(f) for f in key)), None
    )


def grounding_report(
    models: list[dict[str, Any]],
    correct: dict[str, dict[str, dict[str, float]]],
    recall: dict[str, dict[str, Any]],
    resamples: int,
) -> dict[str, Any]:
    """Does grounding close more of the gap than imitation? Per task: each grounded base student vs
    each tuned student without retrieval, on the questions base, both students and the teacher
    answered (gap closed by each, and the paired 95% interval of the difference); and each grounded
    model vs itself without retrieval (the change in accuracy). Sentences follow the intervals."""
    base, teacher = gap_end(models, "base"), gap_end(models, "teacher")
    grounded = [m for m in models if m.get("retrieval")]
    imitators = [m["name"] for m in models if m["role"] == "tuned" and not m.get("retrieval")]
    found: dict[str, Any] = {"comparisons": [], "changes": [], "sentences": []}
    if not grounded:
        return found
    for task, by_model in correct.items():
        for model in grounded:
            name = model["name"]
            recalled = recall.get(task, {}).get(name) or {}
            retrieval = (
                f"recall@{recalled['k']} {pct(recalled['recall'])}" if recalled.get("recall") is not None else None
            )
            plain = _counterpart(models, model)
            if plain is not None and plain in by_model and name in by_model:
                shared = sorted(set(by_model[plain]) & set(by_model[name]))
                if shared:
                    before, after = [by_model[plain][q] for q in shared], [by_model[name][q] for q in shared]
                    interval = paired_bootstrap([before, after], lambda b, a: a - b, resamples)[0]
                    change = describe_change(mean(before), mean(after), interval)
                    entry = {"task": task, "model": name, "without": plain, "questions": len(shared)}
                    entry.update(before=mean(before), after=mean(after), difference_interval=list(interval or []))
                    found["changes"].append(entry)
                    found["sentences"].append(
                        f"{name} vs {plain} on the {len(shared)} {task} questions both answered: accuracy {change}"
                        + (f" ({retrieval})" if retrieval else "")
                    )
            if model["role"] != "base":
                continue
            for imitator in imitators:
                entry = _grounding_vs_imitation(by_model, base, name, imitator, teacher, resamples)
                if entry is None:
                    continue
                entry["task"] = task
                found["comparisons"].append(entry)
                found["sentences"].append(_grounding_sentence(entry, task, retrieval))
    return found


def _grounding_vs_imitation(
    by_model: dict[str, dict[str, float]], base: str, grounded: str, imitator: str, teacher: str, resamples: int
) -> dict[str, Any] | None:
    columns = [by_model.get(name) for name in (base, grounded, imitator, teacher)]
    if any(column is None for column in columns):
        return None
    shared = sorted(set.intersection(*(set(column) for column in columns)))  # type: ignore[arg-type]
    if not shared:
        return None
    b, g, t, te = ([column[q] for q in shared] for column in columns)  # type: ignore[index]
    accuracy = {"base": mean(b), "grounded": mean(g), "imitation": mean(t), "teacher": mean(te)}
    gap = accuracy["teacher"] - accuracy["base"]  # type: ignore[operator]
    entry: dict[str, Any] = {
        "grounded": grounded,
        "imitation": imitator,
        "questions": len(shared),
        "accuracy": accuracy,
        "closed": None,
        "difference": None,
        "interval": None,
        "reason": None,
    }
    if gap <= 0:
        entry["reason"] = (
            f"the teacher ({pct(accuracy['teacher'])}) is not more accurate than the base student "
            f"({pct(accuracy['base'])}): there is no factual gap to close"
        )
        return entry

    def closed_difference(base_: float, grounded_: float, imitation_: float, teacher_: float) -> float | None:
        return (grounded_ - imitation_) / (teacher_ - base_) if teacher_ > base_ else None

    entry["closed"] = {
        "grounded": (accuracy["grounded"] - accuracy["base"]) / gap,  # type: ignore[operator]
        "imitation": (accuracy["imitation"] - accuracy["base"]) / gap,  # type: ignore[operator]
    }
    entry["difference"] = entry["closed"]["grounded"] - entry["closed"]["imitation"]
    interval, undefined = paired_bootstrap([b, g, t, te], closed_difference, resamples)
    entry["interval"] = list(interval) if interval else None
    entry["resamples_without_gap"] = undefined
    if interval is None:
        entry["reason"] = "in most resamples the teacher was not more accurate than the base student"
    return entry


def _grounding_sentence(entry: dict[str, Any], task: str, retrieval: str | None) -> str:
    who = f"grounding ({entry['grounded']}) vs imitation ({entry['imitation']})"
    where = f"on the {entry['questions']} {task} questions base, both students and the teacher answered"
    if entry["closed"] is None or entry["interval"] is None:
        return f"{who}, {where}: n/a ({entry['reason']})"
    closed, interval = entry["closed"], entry["interval"]
    numbers = (
        f"gap closed {pct(closed['grounded'])} vs {pct(closed['imitation'])}; difference "
        f"{points(entry['difference'])} of the gap, 95% CI {points(interval[0])} to {points(interval[1])}"
    )
    if not excludes_zero(interval):
        claim = "no measurable difference between what grounding and imitation closed"
    elif interval[0] > 0:
        claim = "grounding closed more of the gap than imitation did"
    else:
        claim = "grounding closed less of the gap than imitation did"
    tail = f"; {retrieval}" if retrieval else ""
    return f"{who}, {where}: {claim} ({numbers}{tail})"


def iter_recall_rows(recall: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(task, model, entry) of a recall table, for templates."""
    for task, by_model in recall.items():
        for model, entry in by_model.items():
            yield task, model, entry

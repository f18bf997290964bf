"""Near-duplicate filtering: distill's exact candidate index vs Alpaca's quadratic ROUGE-L procedure.

Both make the keep/reject decision "ROUGE-L F >= 0.7 against any kept instruction" on the same
instruction stream. Alpaca's procedure is run as Alpaca wrote it (the ``rouge-score`` package,
every candidate against every kept instruction) at N where that is affordable, and its time is
extrapolated to larger N by its quadratic cost; distill's index is run at every N, 52k included.
``agreement`` is the share of identical decisions: 1.0, since distill computes rouge-score's F to
the bit and compares it the same way.

    python -m bench.dedup [--sizes 2000 5000 10000] [--alpaca-max 5000]

The stream is synthetic but instruction-like (templates × topics × wording variants), with the
near-duplicates a real self-instruct run produces.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from distill.dedup import NearDuplicateIndex

VERBS = [
    "Explain",
    "Describe",
    "Summarize",
    "List",
    "Give",
    "Write",
    "Compare",
    "Suggest",
    "Outline",
    "Identify",
    "Classify",
    "Rewrite",
    "Translate",
    "Define",
    "Analyze",
    "Create",
    "Name",
    "Evaluate",
    "Discuss",
    "Propose",
]
OBJECTS = [
    "three facts about",
    "the main causes of",
    "a short poem about",
    "the history of",
    "two examples of",
    "the pros and cons of",
    "a beginner's guide to",
    "common myths about",
    "the future of",
    "five questions about",
    "a one-sentence definition of",
    "the key steps of",
    "a story involving",
    "the difference between cats and",
    "practical tips for",
    "the economic impact of",
]
TOPICS = [
    "photosynthesis",
    "volcanoes",
    "democracy",
    "inflation",
    "recursion",
    "friendship",
    "gardening",
    "chess",
    "jazz",
    "vaccines",
    "blockchain",
    "glaciers",
    "bees",
    "marathons",
    "taxes",
    "poetry",
    "robots",
    "coffee",
    "deserts",
    "satellites",
    "memory",
    "sleep",
    "bridges",
    "languages",
    "oceans",
    "habits",
    "museums",
    "rainforests",
    "electricity",
    "pizza",
    "algebra",
    "tides",
    "comets",
    "elections",
    "bicycles",
    "honey",
    "castles",
    "forests",
    "cities",
    "rivers",
    "planets",
    "music",
    "weddings",
    "startups",
]
TAILS = [
    "",
    "",
    " for a ten-year-old",
    " in simple terms",
    " in two sentences",
    " with an example",
    " for a blog post",
    " using bullet points",
    " in a formal tone",
    " for a job interview",
    " in under 50 words",
    " for a science class",
]
FILLERS = ["", "", "", "Please ", "Can you ", "I need you to "]


def synthetic_instructions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        verb, obj, topic, tail = rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TOPICS), rng.choice(TAILS)
        second = rng.choice(TOPICS) if rng.random() < 0.6 else ""
        phrase = f"{rng.choice(FILLERS)}{verb.lower() if rng.random() < 0.2 else verb} {obj} {topic}"
        if second:
            phrase += f" and {second}"
        texts.append(phrase + tail + rng.choice([".", "?", ""]))
    return texts


def diverse_instructions(count: int, seed: int = 0) -> list[str]:
    """A stream where most instructions are kept (as in a real 52k run): a 4,000-word vocabulary,
    5-20 words each, 5% near-copies of earlier ones."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "ber", "nal", "sto", "pra", "dun", "el", "fi"]
    vocabulary = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 3))) for _ in range(6000)})[:4000]
    texts: list[str] = []
    for _ in range(count):
        if texts and rng.random() < 0.05:
            words = [w for w in rng.choice(texts).split() if rng.random() > 0.1]
        else:
            words = [rng.choice(VERBS), *rng.choices(vocabulary, k=rng.randint(5, 20))]
        texts.append(" ".join(words))
    return texts


def alpaca_quadratic(texts: list[str], threshold: float) -> tuple[list[bool], float]:
    """Alpaca's generate_instruction.py procedure: rouge-score LCS of each candidate vs all kept."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    started = time.perf_counter()
    kept_tokens: list[list[str]] = []
    decisions = []
    for text in texts:
        tokens = scorer._tokenizer.tokenize(text)
        keep = all(rouge_scorer._score_lcs(tokens, other).fmeasure < threshold for other in kept_tokens)
        if keep:
            kept_tokens.append(tokens)
        decisions.append(keep)
    return decisions, time.perf_counter() - started


def ours(texts: list[str], threshold: float) -> tuple[list[bool], float]:
    started = time.perf_counter()
    index = NearDuplicateIndex(threshold)
    decisions = [index.check_and_add(text)[0] for text in texts]
    return decisions, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--alpaca-max", type=int, default=5000, help="Largest N to run Alpaca's procedure at.")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument(
        "--stream",
        choices=["templates", "diverse"],
        default="templates",
        help="templates: many near-duplicates; diverse: most instructions kept.",
    )
    args = parser.parse_args()
    full = (synthetic_instructions if args.stream == "templates" else diverse_instructions)(52_000)
    rows = []
    alpaca_rate = None  # seconds per (candidate x kept) comparison, for extrapolation
    for size in [*args.sizes, 52_000]:
        texts = full[:size]
        our_decisions, our_seconds = ours(texts, args.threshold)
        row = {"n": size, "kept": sum(our_decisions), "ours_s": round(our_seconds, 2)}
        if size <= args.alpaca_max:
            alpaca_decisions, alpaca_seconds = alpaca_quadratic(texts, args.threshold)
            agree = sum(a == b for a, b in zip(alpaca_decisions, our_decisions)) / size
            comparisons = sum(k for k in _kept_prefix_counts(alpaca_decisions))
            alpaca_rate = alpaca_seconds / max(comparisons, 1)
            row.update(alpaca_s=round(alpaca_seconds, 2), agreement=round(agree, 5))
        elif alpaca_rate is not None:
            comparisons = sum(_kept_prefix_counts(our_decisions))  # same decisions → same comparisons
            row.update(alpaca_s_extrapolated=round(alpaca_rate * comparisons, 1))
        alpaca_time = row.get("alpaca_s", row.get("alpaca_s_extrapolated"))
        if alpaca_time:
            row["speedup"] = round(alpaca_time / max(our_seconds, 1e-9), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"dedup-{args.stream}.json").write_text(json.dumps(rows, indent=2))


def _kept_prefix_counts(decisions: list[bool]) -> list[int]:
    """For each candidate, how many kept instructions the quadratic procedure compares it with."""
    counts, kept = [], 0
    for keep in decisions:
        counts.append(kept)
        kept += keep
    return counts


if __name__ == "__main__":
    main()

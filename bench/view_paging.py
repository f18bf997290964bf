"""`distill view` at 100k rows: how long the index takes to build and a page takes to serve.

A synthetic run directory in the shape generate and judge write (kept rows with provenance and
dedup neighbours, rejected rows with every reason, failed replies, one judgement per kept row) is
indexed, then pages are fetched over HTTP in-process: the first, middle and last page of all rows,
a page filtered by rejection reason, by judge class and reward, by ROUGE-L, and a full-text search.

    python -m bench.view_paging [--rows 100000] [--repeats 3]

tests/test_view.py pages the same synthetic run in a real browser.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

TOPICS = ["water", "planets", "tax forms", "bread", "poetry", "sorting", "friendship", "volcanoes", "chess", "rain"]
VERBS = ["Explain", "Describe", "Summarize", "List", "Compare", "Suggest", "Rewrite", "Classify", "Outline", "Define"]
REASONS = ["near_duplicate", "too_short", "blocklist:image", "starts_with_punctuation", "low_reward", "truncated"]


def write_synthetic_run(run_dir: Path, rows: int = 100_000, seed: int = 0) -> dict[str, int]:
    """Write ``rows`` generated rows (60% kept, 35% rejected, 5% failed) and a judgement per kept
    row into ``run_dir``; return how many of each were written."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "judge").mkdir(exist_ok=True)
    counts = {"kept": 0, "rejected": 0, "failed": 0}
    with (
        (run_dir / "instructions.jsonl").open("w") as kept,
        (run_dir / "rejected.jsonl").open("w") as rejected,
        (run_dir / "failures.jsonl").open("w") as failed,
        (run_dir / "judge" / "judgements.jsonl").open("w") as judged,
    ):
        for number in range(rows):
            request = f"req{number // 5:07d}"
            row_id = f"{request}-{number % 5}"
            instruction = f"{rng.choice(VERBS)} {rng.choice(TOPICS)} for case {number} in {rng.randint(2, 9)} steps."
            neighbour = f"{VERBS[0]} {TOPICS[0]} for case {number - 1}."
            near = [{"instruction": neighbour, "rouge_l": round(rng.random(), 4)}]
            draw = rng.random()
            if draw < 0.05:
                failure = {"request_id": request, "reason": "unparseable_reply", "raw": f"Sorry, no JSON {number}"}
                failed.write(json.dumps(failure) + "\n")
                counts["failed"] += 1
            elif draw < 0.40:
                reason = REASONS[number % len(REASONS)]
                record = {"id": row_id, "request_id": request, "reason": reason, "instruction": instruction}
                record.update(input="", output=f"Answer {number}.", most_similar_instructions=near)
                rejected.write(json.dumps(record) + "\n")
                counts["rejected"] += 1
            else:
                kept.write(json.dumps(kept_row(row_id, request, instruction, near, number, rng)) + "\n")
                verdict = rng.choice(["A", "A", "B", "C"])
                judgement = {"item_id": row_id, "judge": "rubric:helpfulness", "judge_type": "rubric"}
                judgement.update(rubric="helpfulness", verdict=verdict, reward={"A": 1.0, "B": 0.5, "C": 0.0}[verdict])
                judgement.update(invalid_reason=None, raw=[json.dumps({"class": verdict})], samples=[verdict])
                judged.write(json.dumps(judgement) + "\n")
                counts["kept"] += 1
    return counts


def kept_row(
    row_id: str, request: str, instruction: str, near: list[dict[str, object]], number: int, rng: random.Random
) -> dict[str, object]:
    output = f"Here is the answer to case {number}: " + " ".join(rng.choice(TOPICS) for _ in range(30))
    return {
        "id": row_id,
        "instruction": instruction,
        "input": "",
        "output": output,
        "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}],
        "most_similar_instructions": near,
        "max_rouge_l": near[0]["rouge_l"],
        "provenance": {
            "backend": "synthetic",
            "model": "none",
            "seed_ids": [f"seed_{rng.randint(1, 40):03d}" for _ in range(3)],
            "request_id": request,
            "item_index": number % 5,
        },
    }


PAGES = {  # what a user clicks: pages of all rows, then filtered pages (`{last}`: the last page number)
    "first page": "/data",
    "middle page": "/data?page={middle}",
    "last page": "/data?page={last}",
    "rejected: near_duplicate, page 100": "/data?status=rejected&reason=near_duplicate&page=100",
    "judge class C, reward <= 0.2": "/data?judge=rubric:helpfulness&verdict=C&max_reward=0.2",
    "max ROUGE-L >= 0.9": "/data?min_rouge=0.9",
    "search 'volcanoes steps'": "/data?q=volcanoes+steps",
}


def page_urls(rows: int, per_page: int = 50) -> dict[str, str]:
    last = max(1, -(-rows // per_page))
    return {name: url.format(middle=last // 2, last=last) for name, url in PAGES.items()}


def main() -> None:
    from starlette.testclient import TestClient

    from distill.view import create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-view-") as folder:
        run_dir = Path(folder) / "run"
        started = time.perf_counter()
        counts = write_synthetic_run(run_dir, args.rows)
        print(f"wrote {counts} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        app = create_app(run_dir)
        print(f"index built in {time.perf_counter() - started:.2f} s ({app.state.index.stats})")
        with TestClient(app) as client:
            for name, url in page_urls(args.rows).items():
                seconds = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    response = client.get(url)
                    seconds.append(time.perf_counter() - started)
                    assert response.status_code == 200, (url, response.status_code)
                print(f"{name:<40} median {statistics.median(seconds) * 1000:7.1f} ms  {url}")
        app.state.index.close()


if __name__ == "__main__":
    main()

"""`distill generate` tokens/s vs the raw client sending the same requests, side by side in one run.

Ours: the whole generate stage (request building, the openai teacher, saving, parsing, filters,
dedup, dataset files) against a vLLM server, greedy so the work is fixed, cache off. Raw: the
requests that run sent, replayed with a plain ``AsyncOpenAI`` gather, in the same batches.
Runs alternate (raw, ours, raw, ours); ratio of medians (goal >= 0.95).

    python bench/generate_throughput.py [--requests 16] [--batch 8] [--max-tokens 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.teacher_throughput import start_server


def run_ours(base_url: str, args: argparse.Namespace) -> tuple[float, list[dict]]:
    from distill.config import load_config
    from distill.generate import run_generate

    run_dir = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    config = load_config(
        overrides=[
            f"run_dir={run_dir}",
            "teacher.backend=openai",
            "teacher.model=smollm2",
            f"teacher.options.base_url={base_url}",
            "teacher.options.api_key_env=null",
            f"teacher.options.max_concurrency={args.batch}",
            f"generate.target={args.requests * 5}",
            "generate.tasks_per_request=5",
            f"generate.max_requests={args.requests}",
            f"generate.batch_size={args.batch}",
            f"generate.max_tokens={args.max_tokens}",
            "generate.temperature=0",
            "generate.cache=false",
        ]
    )
    started = time.perf_counter()
    summary = run_generate(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "responses.jsonl").read_text().splitlines()]
    return summary["usage"]["completion_tokens"] / seconds, rows


def run_raw(base_url: str, rows: list[dict], batch: int) -> float:
    import openai

    async def replay() -> int:
        tokens = 0
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none") as client:
            for start in range(0, len(rows), batch):
                requests = [row["request"] for row in rows[start : start + batch]]
                responses = await asyncio.gather(
                    *(
                        client.chat.completions.create(
                            model="smollm2",
                            messages=r["messages"],
                            temperature=r["temperature"],
                            top_p=r["top_p"],
                            max_tokens=r["max_tokens"],
                            response_format={
                                "type": "json_schema",
                                "json_schema": {"name": "response", "schema": r["response_format"], "strict": True},
                            },
                        )
                        for r in requests
                    )
                )
                tokens += sum(resp.usage.completion_tokens for resp in responses)
        return tokens

    started = time.perf_counter()
    tokens = asyncio.run(replay())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    server = start_server(args.port)
    base_url = f"http://127.0.0.1:{args.port}/v1"
    try:
        _, rows = run_ours(base_url, args)  # warm-up, and the requests the raw side replays
        rates: dict[str, list[float]] = {"raw": [], "ours": []}
        for _ in range(args.repeats):
            rates["raw"].append(run_raw(base_url, rows, args.batch))
            rates["ours"].append(run_ours(base_url, args)[0])
    finally:
        server.terminate()
        server.wait(30)
    raw, ours = statistics.median(rates["raw"]), statistics.median(rates["ours"])
    result = {
        "requests": args.requests,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "raw_tok_s": round(raw, 1),
        "ours_tok_s": round(ours, 1),
        "ratio": round(ours / raw, 3),
    }
    print(json.dumps(result))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "generate_throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

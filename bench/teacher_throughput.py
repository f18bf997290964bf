"""Teacher throughput, measured side by side in one run: ours vs the raw library doing the same work.

1. the ``vllm`` teacher vs raw ``vllm.LLM.chat`` (the same engine instance, same 64 prompts);
2. the ``openai`` teacher vs a raw ``AsyncOpenAI`` gather loop, against the same vLLM server.

Greedy decoding, so both sides generate the same tokens. Runs alternate (raw, ours, raw, ours, ...)
so drift on a shared machine hits both; the ratio of medians is printed (>1: ours is faster).

    python bench/teacher_throughput.py [--prompts 64] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

TOPICS = [
    "the water cycle",
    "photosynthesis",
    "binary search",
    "the French revolution",
    "compound interest",
    "black holes",
    "the immune system",
    "recursion",
    "supply and demand",
    "plate tectonics",
    "how vaccines work",
    "hash tables",
    "the Roman empire",
    "climate change",
    "neural networks",
    "the printing press",
]
TASKS = [
    "Explain {} in two sentences.",
    "Give three facts about {}.",
    "Write a short quiz question about {}.",
    "Summarize {} for a child.",
]


def prompts(count: int) -> list[str]:
    return [TASKS[i % len(TASKS)].format(TOPICS[(i // len(TASKS)) % len(TOPICS)]) for i in range(count)]


def alternate(raw: Callable[[], int], ours: Callable[[], int], repeats: int) -> dict[str, float]:
    """Run raw/ours alternately; each returns completion tokens. Returns median tokens/s of each."""
    raw(), ours()  # warm-up: caches, connection pools
    rates: dict[str, list[float]] = {"raw": [], "ours": []}
    for _ in range(repeats):
        for name, function in (("raw", raw), ("ours", ours)):
            started = time.perf_counter()
            tokens = function()
            rates[name].append(tokens / (time.perf_counter() - started))
    raw_rate, our_rate = statistics.median(rates["raw"]), statistics.median(rates["ours"])
    return {"raw_tok_s": round(raw_rate, 1), "ours_tok_s": round(our_rate, 1), "ratio": round(our_rate / raw_rate, 3)}


def bench_vllm(texts: list[str], max_tokens: int, repeats: int) -> dict[str, float]:
    from vllm import SamplingParams

    from distill.config import TeacherConfig
    from distill.teacher import load_teacher

    teacher = load_teacher(
        TeacherConfig(
            backend="vllm",
            model="smollm2-135m-instruct",
            options={"enforce_eager": True, "max_model_len": 2048, "cpu_kv_cache_gib": 1},
        )
    )
    requests = [TeacherConfig().request(text, temperature=0.0, max_tokens=max_tokens) for text in texts]
    conversations = [[{"role": "user", "content": text}] for text in texts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def raw() -> int:
        outputs = teacher.llm.chat(conversations, sampling_params=params, use_tqdm=False)  # type: ignore[attr-defined]
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def ours() -> int:
        return sum(r.usage.completion_tokens for r in teacher.generate(requests))

    try:
        return alternate(raw, ours, repeats)
    finally:
        teacher.close()


def start_server(port: int) -> subprocess.Popen[bytes]:
    from distill.models import prepare
    from tests.vllm_server import start_vllm_server

    return start_vllm_server(prepare("smollm2-135m-instruct"), "smollm2", port)


def bench_openai(base_url: str, texts: list[str], max_tokens: int, repeats: int) -> dict[str, float]:
    import openai

    from distill.config import TeacherConfig
    from distill.teacher import load_teacher

    teacher = load_teacher(
        TeacherConfig(
            backend="openai",
            model="smollm2",
            options={"base_url": base_url, "api_key_env": None, "max_concurrency": len(texts)},
        )
    )
    requests = [TeacherConfig().request(text, temperature=0.0, max_tokens=max_tokens) for text in texts]

    async def raw_loop() -> int:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none") as client:
            responses = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="smollm2",
                        messages=[{"role": "user", "content": text}],
                        temperature=0.0,
                        top_p=1.0,
                        max_tokens=max_tokens,
                    )
                    for text in texts
                )
            )
        return sum(r.usage.completion_tokens for r in responses)

    def ours() -> int:
        return sum(r.usage.completion_tokens for r in teacher.generate(requests))

    return alternate(lambda: asyncio.run(raw_loop()), ours, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--base-url", help="Use this running server instead of starting one.")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    texts = prompts(args.prompts)

    results = {"vllm teacher vs vllm.LLM.chat": bench_vllm(texts, args.max_tokens, args.repeats)}
    server = None if args.base_url else start_server(args.port)
    try:
        base_url = args.base_url or f"http://127.0.0.1:{args.port}/v1"
        results["openai teacher vs AsyncOpenAI gather"] = bench_openai(base_url, texts, args.max_tokens, args.repeats)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    print(f"\n{args.prompts} prompts, {args.max_tokens} new tokens each, greedy, median of {args.repeats}")
    for name, row in results.items():
        print(
            f"{name:<40} raw {row['raw_tok_s']:>8.1f} tok/s   ours {row['ours_tok_s']:>8.1f} tok/s   "
            f"ratio {row['ratio']:.3f}"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "teacher_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

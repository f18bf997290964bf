"""Scale-out on Ray: requests/s with 1, 2 and 4 replicas against a latency-bound endpoint, measured
side by side in one run, as ratios to linear; and the driver's own cost per request at 100k.

Part 1. Each replica is a Ray actor holding an ``openai`` teacher with ``max_concurrency`` C. The
endpoint is a model-free OpenAI-format server (``tests/openai_stub.py``) that answers every request
after a fixed ``--delay`` D: one replica's ideal rate is C / D, so what is measured is distill's
fan-out (chunking, actor calls, result gathering), not 2 CPU cores running a model. The same
total work per replica at every size: ``--per-replica`` requests each. Goal: >= 0.9x linear.
A local teacher (``executor: local``, the same C) is measured too: the cost of going through Ray.

Part 2. The driver stays the single writer: every request passes through its answer log and the
request cache, and every kept instruction through the dedup index. At ``--driver-requests``
(100k) synthetic requests: building requests (the self-instruct template), ``AnswerSource``
(cache lookup, log append with fsync, cache insert; a teacher that answers instantly), replaying
the log on a rerun, and the dedup check. Printed as microseconds per request and as the request
rate the driver alone could sustain.

    python -m bench.scale_out [--delay 0.25] [--concurrency 8] [--per-replica 96] [--driver-requests 100000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.openai_stub import StubServer, echo


def teacher_settings(url: str, concurrency: int) -> dict[str, Any]:
    options = {"base_url": url, "api_key_env": None, "max_concurrency": concurrency}
    return {"backend": "openai", "model": "m", "max_tokens": 16, "options": options}


def throughput(teacher: Any, config: Any, count: int, tag: str) -> float:
    """Requests/s of one ``generate`` call of ``count`` fresh requests (after a warm-up call)."""
    teacher.generate([config.teacher.request(f"warm-up {tag} {i}") for i in range(4)])
    requests = [config.teacher.request(f"{tag} request {i}") for i in range(count)]
    started = time.perf_counter()
    results = teacher.generate(requests)
    seconds = time.perf_counter() - started
    assert all(result.ok for result in results), [r.error for r in results if not r.ok][:3]
    return count / seconds


def scale_out(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from distill.config import load_config
    from distill.executor import load_teacher

    server = StubServer(echo, delay_s=args.delay).start()
    teacher = json.dumps(teacher_settings(server.url, args.concurrency))
    # One local Ray for every size (replicas start anew per size); 0.5 CPU a replica fits 4 on 2 cores.
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level=logging.WARNING)  # fmt: skip
    rates: dict[str, float] = {}
    try:
        local = load_config(None, [f"teacher={teacher}"])
        with load_teacher(local.teacher, local) as one:
            rates["local"] = throughput(one, local, args.per_replica, "local")
        for replicas in args.replicas:
            config = load_config(
                None,
                [
                    f"teacher={teacher}",
                    "executor=ray",
                    f"ray.num_replicas={replicas}",
                    "ray.resources_per_replica={CPU: 0.5}",
                ],
            )
            with load_teacher(config.teacher, config) as fleet:
                rates[str(replicas)] = throughput(fleet, config, args.per_replica * replicas, f"r{replicas}")
    finally:
        ray.shutdown()
        server.stop()
    ideal = args.concurrency / args.delay
    base = rates[str(args.replicas[0])] / args.replicas[0]
    return {
        "ideal_per_replica": ideal,
        "local": rates["local"],
        "replicas": {
            n: {"requests_per_s": rates[str(n)], "vs_linear": rates[str(n)] / (n * base)} for n in args.replicas
        },
    }


class InstantTeacher:
    """Answers at once (so only the driver's own work is timed)."""

    name = "instant"
    supports_response_format = True
    supports_logprobs = False

    def __init__(self) -> None:
        self.model = "instant"

    def generate(self, requests: list[Any]) -> list[Any]:
        from distill.records import ChatResult, Usage

        reply = json.dumps({"tasks": [{"instruction": "Describe a thing.", "input": "", "output": "It is."}] * 3})
        return [
            ChatResult(
                request_id=r.id,
                backend="instant",
                model="instant",
                texts=[reply],
                finish_reasons=["stop"],
                usage=Usage(prompt_tokens=300, completion_tokens=60),
            )
            for r in requests
        ]

    def close(self) -> None:
        pass


def driver_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Microseconds per request of the driver's own work at ``args.driver_requests`` requests."""
    from bench.dedup import diverse_instructions
    from distill.answers import AnswerSource, RequestCache
    from distill.config import load_config
    from distill.dedup import NearDuplicateIndex
    from distill.generate import Generator
    from distill.runstore import JsonlLog

    count, batch = args.driver_requests, args.batch
    work = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    os.environ["DISTILL_HOME"] = str(work / "home")  # an empty cache of our own
    config = load_config(None, [f"run_dir={work / 'run'}", "teacher.backend=openai", "teacher.model=m"])
    generator = Generator(config)  # builds requests exactly as `distill generate` does; sends nothing
    started = time.perf_counter()
    requests = [generator.build_request(i)[0] for i in range(count)]
    build = time.perf_counter() - started

    teacher = InstantTeacher()
    answers = AnswerSource(
        load_teacher=lambda: teacher,  # type: ignore[arg-type,return-value]
        identity={"backend": "instant"},
        teacher_class=type(teacher),  # type: ignore[arg-type]
        model="instant",
        log=JsonlLog(work / "run" / "responses.jsonl"),
        cache=RequestCache(work / "home" / "requests.sqlite"),
    )
    teacher_seconds = 0.0
    original = teacher.generate

    def timed(batch_requests: list[Any]) -> list[Any]:
        nonlocal teacher_seconds
        started = time.perf_counter()
        try:
            return original(batch_requests)
        finally:
            teacher_seconds += time.perf_counter() - started

    teacher.generate = timed  # type: ignore[method-assign]
    started = time.perf_counter()
    for start in range(0, count, batch):
        answers.generate(requests[start : start + batch])
    source = time.perf_counter() - started - teacher_seconds
    answers.close()

    rerun = AnswerSource(
        load_teacher=lambda: teacher,  # type: ignore[arg-type,return-value]
        identity={"backend": "instant"},
        teacher_class=type(teacher),  # type: ignore[arg-type]
        model="instant",
        log=JsonlLog(work / "run" / "responses.jsonl"),
        cache=None,
    )
    started = time.perf_counter()
    for start in range(0, count, batch):
        rerun.generate(requests[start : start + batch])
    replay = time.perf_counter() - started
    assert rerun.counts.sent == 0 and rerun.counts.replayed == count

    # The pessimistic stream of bench/dedup.py: most instructions kept, words drawn evenly from a
    # 4,000-word vocabulary (no rare words for the index's prefix filter to lean on).
    size = args.dedup_instructions
    texts = diverse_instructions(size)
    index = NearDuplicateIndex(0.7)
    started = time.perf_counter()
    for text in texts[: size - size // 10]:
        index.check_and_add(text)
    middle = time.perf_counter()
    for text in texts[size - size // 10 :]:
        index.check_and_add(text)
    ended = time.perf_counter()
    micro = 1e6 / count
    return {
        "build_request_us": build * micro,
        "answer_source_us": source * micro,
        "replay_us": replay * micro,
        "dedup_us": (ended - started) * 1e6 / size,
        "dedup_last_10pct_us": (ended - middle) * 1e6 / (size // 10),
        "kept": float(len(index)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=1.0, help="Seconds the endpoint takes per request.")
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency of each replica's client.")
    parser.add_argument("--per-replica", type=int, default=48, help="Requests per replica in the timed call.")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--driver-requests", type=int, default=100_000)
    parser.add_argument(
        "--dedup-instructions", type=int, default=52_000, help="Instructions through the dedup index (Alpaca: 52k)."
    )
    parser.add_argument("--batch", type=int, default=256, help="Requests per AnswerSource call (generate.batch_size).")
    parser.add_argument("--part", choices=["all", "scale", "driver"], default="all")
    args = parser.parse_args()
    if args.part in ("all", "scale"):
        print_scale_out(args)
    if args.part in ("all", "driver"):
        print_driver(args)


def print_scale_out(args: argparse.Namespace) -> None:
    import psutil

    psutil.cpu_percent()  # from now on
    scaled = scale_out(args)
    busy = psutil.cpu_percent()
    print(
        f"endpoint: {args.delay:.2f} s a request; {args.concurrency} in flight per replica: "
        f"ideal {scaled['ideal_per_replica']:.1f} requests/s per replica"
    )
    print(f"{'replicas':>8} {'requests/s':>11} {'per replica':>12} {'vs linear':>10}")
    print(f"{'local':>8} {scaled['local']:>11.1f} {scaled['local']:>12.1f} {'':>10}")
    for n, row in scaled["replicas"].items():
        print(f"{n:>8} {row['requests_per_s']:>11.1f} {row['requests_per_s'] / n:>12.1f} {row['vs_linear']:>9.2f}x")
    one = scaled["replicas"][args.replicas[0]]["requests_per_s"] / args.replicas[0]
    print(f"1 replica on Ray vs a local teacher: {one / scaled['local']:.2f}x")
    print(f"(the machine's {os.cpu_count()} cores were {busy:.0f}% busy meanwhile, every process counted)")


def print_driver(args: argparse.Namespace) -> None:
    driver = driver_overhead(args)
    per_request = driver["build_request_us"] + driver["answer_source_us"]
    print(f"driver, per request at {args.driver_requests:,} requests (batches of {args.batch}):")
    print(f"  build the request (template, sampling)      {driver['build_request_us']:8.1f} us")
    print(f"  answer log + cache (lookup, append, insert) {driver['answer_source_us']:8.1f} us")
    print(f"  together                                    {per_request:8.1f} us -> {1e6 / per_request:,.0f} requests/s")
    print(f"  replaying the log on a rerun                {driver['replay_us']:8.1f} us")
    print(f"driver, per instruction through the dedup index ({args.dedup_instructions:,} instructions):")
    print(f"  on average                                  {driver['dedup_us']:8.1f} us")
    print(
        f"  the last 10% ({int(driver['kept']):,} kept by then)        {driver['dedup_last_10pct_us']:8.1f} us -> "
        f"{1e6 / driver['dedup_last_10pct_us']:,.0f} instructions/s"
    )


if __name__ == "__main__":
    main()

"""The openai teacher against a tiny local HTTP server that answers in the OpenAI format (no model
needed), measured at the server: requests/min and tokens/min limits hold at the wire (and the
pacing check fails a client that bursts), only transport and API errors are retried (a bug in
reading a good answer surfaces at once and never re-sends a paid request), and the cost of a run
is priced from the openai plugin's price table."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from distill.config import TeacherConfig, load_config
from distill.generate import run_generate
from distill.teacher import load_teacher
from tests.fault_proxy import pacing_violations


def completion(content: str, prompt_tokens: int = 5, completion_tokens: int = 1) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


@pytest.fixture()
def server() -> Iterator[dict[str, Any]]:
    """Answers every chat completion with ``state["reply"](request body, number)``; records the
    arrival time of each request in ``state["times"]``."""
    state: dict[str, Any] = {"times": [], "reply": lambda body, number: completion("4")}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            arrived = time.monotonic()
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                state["times"].append(arrived)
                number = len(state["times"])
            payload = json.dumps(state["reply"](body, number)).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()


def teacher_config(server: dict[str, Any], **options: Any) -> TeacherConfig:
    return TeacherConfig(
        backend="openai",
        model="gpt-4o-mini",
        max_tokens=100,
        options={"base_url": server["url"], "api_key_env": None, "max_concurrency": 16, **options},
    )


def test_the_pacing_check_fails_a_bursting_client(server: dict[str, Any]) -> None:
    assert pacing_violations([0.0, 0.5, 1.0, 1.5], per_minute=120) == []
    assert pacing_violations([0.0, 0.01, 1.0, 1.01, 2.0, 2.01], per_minute=90)  # back-to-back pairs
    assert pacing_violations([0.0, 0.6, 1.2, 1.8, 2.4], per_minute=60)  # evenly, but too fast

    async def burst() -> None:  # the raw client, no limiter: 8 requests at once
        async with httpx.AsyncClient() as client:
            request = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
            await asyncio.gather(*(client.post(server["url"] + "/chat/completions", json=request) for _ in range(8)))

    asyncio.run(burst())
    assert pacing_violations(server["times"], per_minute=120) != []


@pytest.mark.parametrize("limit", ["requests_per_minute", "tokens_per_minute"])
def test_rate_limits_hold_at_the_wire(limit: str, server: dict[str, Any]) -> None:
    # 10 concurrent requests. A request is estimated at prompt chars / 4 + max_tokens × n tokens:
    # "q" and 100 → 100.25 tokens; 12,030 tokens a minute is then 120 requests a minute.
    per_minute = {"requests_per_minute": 120, "tokens_per_minute": 12_030}[limit]
    config = teacher_config(server, **{limit: per_minute})
    teacher = load_teacher(config)
    results = teacher.generate([config.request("q", seed=i) for i in range(10)])
    assert all(result.ok for result in results) and len(server["times"]) == 10
    assert pacing_violations(server["times"], per_minute=120) == [], server["times"]
    span = max(server["times"]) - min(server["times"])
    assert span >= 9 * 0.5 - 0.35  # 10 requests at 120/min span 4.5 s


def test_a_bug_reading_the_answer_is_not_retried(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    config = teacher_config(server, max_retries=5, backoff_initial_s=0.01)
    teacher = load_teacher(config)
    [good] = teacher.generate([config.request("2 + 2?")])
    assert good.text == "4" and len(server["times"]) == 1

    def broken_reader(*args: Any) -> Any:
        raise KeyError("a bug in reading the answer")

    monkeypatch.setattr(type(teacher), "_result", broken_reader)
    with pytest.raises(KeyError, match="a bug in reading the answer"):
        teacher.generate([config.request("3 + 3?")])
    assert len(server["times"]) == 2  # sent once, not once per retry


def task_reply(body: dict[str, Any], number: int) -> dict[str, Any]:
    """A self-instruct reply with new tasks, and a large usage so the cost is visible."""
    words = [f"{number}x{i}{part}" for i in range(3) for part in "abc"]  # no two instructions alike
    tasks = [
        {"instruction": f"Describe {' and '.join(words[3 * i : 3 * i + 3])}.", "input": "", "output": "..."}
        for i in range(3)
    ]
    return completion(json.dumps({"tasks": tasks}), prompt_tokens=100_000, completion_tokens=50_000)


@pytest.mark.parametrize(
    ("model", "prices", "expected_per_request"),
    [
        ("gpt-4o-mini", {}, "bundled"),
        ("gpt-4o-mini", {"gpt-4o-mini": {"input_per_million": 1.0, "output_per_million": 2.0}}, 0.1 + 0.1),
        ("my-local-model", {}, None),  # no price known: None, never $0
    ],
)
def test_generate_cost_is_priced_from_the_plugins_table(
    model: str, prices: dict[str, Any], expected_per_request: Any, server: dict[str, Any], tmp_path: Path
) -> None:
    from distill_plugins.openai_teacher import PRICES_FILE

    server["reply"] = task_reply
    if expected_per_request == "bundled":  # read the table here, not from the code under test
        price = yaml.safe_load(PRICES_FILE.read_text())["prices"][model]
        expected_per_request = 0.1 * price["input_per_million"] + 0.05 * price["output_per_million"]
    teacher = teacher_config(server, prices=prices).model_dump()
    teacher["model"] = model
    config = load_config(
        None,
        [f"run_dir={tmp_path / 'run'}", f"teacher={json.dumps(teacher)}", "generate.target=6", "generate.batch_size=2"],
    )
    summary = run_generate(config)
    requests = len(server["times"])
    assert summary["kept"] == 6 and requests == 2
    if expected_per_request is None:
        assert summary["cost_usd"] is None
    else:
        assert summary["cost_usd"] == round(requests * expected_per_request, 4)

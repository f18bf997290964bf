"""A tiny OpenAI-format chat server for tests and benchmarks that need no model: it answers every
chat completion with ``reply(body, number)`` after an optional fixed ``delay_s`` (a latency-bound
endpoint: waiting threads cost no CPU, so 2 cores are not what limits a benchmark), and records
each request's arrival time and first user message. Requests are served concurrently (one thread
each)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[dict[str, Any], int], dict[str, Any]]


def completion(content: str, prompt_tokens: int = 5, completion_tokens: int = 1) -> dict[str, Any]:
    """A chat completion in the OpenAI format with one choice."""
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


def echo(body: dict[str, Any], number: int) -> dict[str, Any]:
    """Answers the first user message back, prefixed (deterministic: the same request, the same reply)."""
    return completion("echo: " + body["messages"][0]["content"])


def self_instruct(body: dict[str, Any], number: int) -> dict[str, Any]:
    """A self-instruct reply: three new tasks made from the request's own hash (the same request,
    the same reply; no two requests' tasks alike)."""
    import hashlib

    tag = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:12]
    words = [f"w{tag}x{i}{part}" for i in range(3) for part in "abc"]
    tasks = [
        {"instruction": f"Describe {' and '.join(words[3 * i : 3 * i + 3])}.", "input": "", "output": "It is."}
        for i in range(3)
    ]
    return completion(json.dumps({"tasks": tasks}), prompt_tokens=10, completion_tokens=10)


class StubServer:
    """``StubServer(reply, delay_s).start()``; ``url`` ends in /v1; ``times``, ``prompts`` and
    ``client_ports`` list every request in arrival order; ``stop()`` shuts it down."""

    def __init__(self, reply: Reply = echo, delay_s: float = 0.0):
        self.reply = reply
        self.delay_s = delay_s
        self.times: list[float] = []  # time.monotonic() of each arrival
        self.prompts: list[str] = []  # first user message of each request
        self.client_ports: list[int] = []  # the sender's TCP port of each request (which process sent it)
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with stub.lock:
                    stub.times.append(arrived)
                    stub.prompts.append(body["messages"][0]["content"])
                    stub.client_ports.append(self.client_address[1])
                    number = len(stub.times)
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                payload = json.dumps(stub.reply(body, number)).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client is gone (a killed replica or driver): nothing to answer

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # many clients connecting at once (benchmarks)

        self.httpd = Server(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> StubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def reset(self) -> None:
        with self.lock:
            self.times.clear()
            self.prompts.clear()
            self.client_ports.clear()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""The openai teacher against a tiny local HTTP server that answers in the OpenAI format (no
model needed): only transport and API errors are retried; a bug in reading a good answer is a bug,
surfaces at once, and never sends the (paid) request again."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from distill.config import TeacherConfig
from distill.teacher import load_teacher

COMPLETION = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


@pytest.fixture()
def server() -> Iterator[dict[str, Any]]:
    """A server that answers every chat completion with COMPLETION; counts the requests."""
    state: dict[str, Any] = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["content-length"]))
            state["requests"] += 1
            body = json.dumps(COMPLETION).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()


def test_a_bug_reading_the_answer_is_not_retried(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"base_url": server["url"], "api_key_env": None, "max_retries": 5, "backoff_initial_s": 0.01}
    config = TeacherConfig(backend="openai", model="m", options=options)
    teacher = load_teacher(config)
    [good] = teacher.generate([config.request("2 + 2?")])
    assert good.text == "4" and server["requests"] == 1

    def broken_reader(*args: Any) -> Any:
        raise KeyError("a bug in reading the answer")

    monkeypatch.setattr(type(teacher), "_result", broken_reader)
    with pytest.raises(KeyError, match="a bug in reading the answer"):
        teacher.generate([config.request("3 + 3?")])
    assert server["requests"] == 2  # sent once, not once per retry

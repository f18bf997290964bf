"""An example third-party distill plugin.

It adds a teacher, ``logging``, that wraps any other teacher and appends one JSON line per
request to a log file (id, latency, tokens, error), and a command, ``distill teacher-log FILE``,
that summarizes such a log. Install it with ``pip install -e examples/distill-logging-teacher``;
the entry point in its pyproject.toml (group ``distill``) is all distill needs to find it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.config import TeacherConfig
from distill.records import ChatRequest, ChatResult
from distill.teacher import Teacher, load_teacher


class LoggingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inner_backend: str = Field("transformers", description="The teacher backend that really answers.")
    inner_options: dict[str, Any] = Field(default_factory=dict, description="Options of the inner backend.")
    log_file: Path = Field(Path("teacher-log.jsonl"), description="JSONL file that gets one line per request.")


class LoggingTeacher(Teacher):
    """Wraps another teacher and logs every request (example plugin)."""

    name = "logging"
    options_model = LoggingOptions
    # Where the log goes changes no answer: keep it out of the request-cache key. Every other
    # option (the inner backend and its options) is part of the key, as distill does by default.
    speed_only_options = frozenset({"log_file"})

    options: LoggingOptions

    def __init__(self, model: str, options: BaseModel):
        super().__init__(model, options)
        inner = TeacherConfig(backend=self.options.inner_backend, model=model, options=self.options.inner_options)
        self.inner = load_teacher(inner)
        # The wrapper can do what the wrapped teacher can.
        self.supports_response_format = self.inner.supports_response_format  # type: ignore[misc]
        self.supports_logprobs = self.inner.supports_logprobs  # type: ignore[misc]

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        started = time.time()
        results = self.inner.generate(requests)
        self.options.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.options.log_file.open("a", encoding="utf-8") as log:
            for result in results:
                log.write(
                    json.dumps(
                        {
                            "time": started,
                            "request_id": result.request_id,
                            "backend": result.backend,
                            "latency_s": round(result.latency_s, 4),
                            "completion_tokens": result.usage.completion_tokens,
                            "error": result.error.kind if result.error else None,
                        }
                    )
                    + "\n"
                )
        return results

    def close(self) -> None:
        self.inner.close()


@distill.hookimpl
def register_teachers(register: Any) -> None:
    register(LoggingTeacher)


@distill.hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="teacher-log")
    @click.argument("log_file", type=click.Path(exists=True, path_type=Path))
    def teacher_log(log_file: Path) -> None:
        """Summarize a log written by the logging teacher."""
        rows = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        failed = sum(1 for row in rows if row["error"])
        tokens = sum(row["completion_tokens"] for row in rows)
        click.echo(f"{len(rows)} requests, {failed} failed, {tokens} completion tokens")

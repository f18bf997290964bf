"""A scripted teacher, registered through distill's own ``register_teachers`` hook the way an
installed plugin would be (simonw/llm's tests register a mock model the same way). It needs no
model: each reply comes from a named script, a Python function of the request. The fast test lane
runs whole stages (generate, judge, eval, report) on it.

    config = TeacherConfig(backend="scripted", model="echo", options={"script": "echo"})

The script name is an option, so it is part of the request-cache key like any plugin option.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.records import ChatRequest, ChatResult, Usage
from distill.teacher import Teacher

Script = Callable[[ChatRequest, int], str]
"""(request, sample index) -> reply text."""

SCRIPTS: dict[str, Script] = {
    "echo": lambda request, k: request.messages[-1].content,
    "constant": lambda request, k: "OK",
}


class ScriptedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    script: str = Field("echo", description="Name of the reply function in tests.scripted.SCRIPTS.")
    structured: bool = Field(True, description="Claim to enforce JSON schemas (the script must then obey).")


class ScriptedTeacher(Teacher):
    """Replies with a named Python function of the request: no model, no network."""

    name = "scripted"
    options_model = ScriptedOptions
    supports_response_format = True  # what callers that don't load the teacher see (AnswerSource)
    supports_logprobs = False

    options: ScriptedOptions

    def __init__(self, model: str, options: BaseModel):
        super().__init__(model, options)
        self.supports_response_format = self.options.structured  # type: ignore[misc]

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        script = SCRIPTS[self.options.script]
        SENT.extend(requests)
        return [
            ChatResult(
                request_id=r.id,
                backend=self.name,
                model=self.model,
                texts=[script(r, k) for k in range(r.n)],
                finish_reasons=["stop"] * r.n,
                usage=Usage(prompt_tokens=sum(len(m.content.split()) for m in r.messages), completion_tokens=1),
            )
            for r in requests
        ]


SENT: list[ChatRequest] = []
"""Every request any scripted teacher was sent in this test run."""


def plugin_module() -> types.ModuleType:
    module = types.ModuleType("scripted_teacher_plugin")

    @distill.hookimpl
    def register_teachers(register: Any) -> None:
        register(ScriptedTeacher)

    module.register_teachers = register_teachers  # type: ignore[attr-defined]
    return module


@pytest.fixture()
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Script]]:
    """Register the scripted teacher for one test; yields SCRIPTS to add replies to (removed
    again afterwards). The request cache goes to a fresh $DISTILL_HOME, so scripted answers never
    reach the real one. ``SENT`` holds every request the test's scripted teachers were sent."""
    from distill.plugins import get_teachers, load_plugins

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path_factory.mktemp("distill-home")))
    manager = load_plugins()
    manager.register(plugin_module(), name="scripted_teacher_plugin")
    get_teachers.cache_clear()
    before = dict(SCRIPTS)
    SENT.clear()
    try:
        yield SCRIPTS
    finally:
        manager.unregister(name="scripted_teacher_plugin")
        get_teachers.cache_clear()
        SCRIPTS.clear()
        SCRIPTS.update(before)

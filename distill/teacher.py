"""The Teacher interface: a batch of ChatRequests in, one ChatResult per request out.

A backend never raises for a problem with one request: the result carries a ``TeacherFailure``
instead, so the rest of the batch is kept. A failure with ``fatal=True`` (bad key, unknown
model, bad request) means continuing is pointless; ``raise_on_fatal`` turns it into a
``TeacherError`` for callers that stop the run.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from distill.errors import TeacherError
from distill.records import ChatRequest, ChatResult, TeacherFailure, Usage


class NoOptions(BaseModel):
    """A backend without options."""

    model_config = ConfigDict(extra="forbid")


class Teacher(ABC):
    """Base class for teacher backends registered through ``register_teachers``."""

    name: ClassVar[str]
    """What users write in ``teacher.backend``."""
    options_model: ClassVar[type[BaseModel]] = NoOptions
    """Pydantic model validating ``teacher.options`` (use ``extra="forbid"``)."""
    supports_response_format: ClassVar[bool] = False
    """Whether ``ChatRequest.response_format`` (JSON schema) is enforced by this backend."""
    supports_logprobs: ClassVar[bool] = False
    supports_prompt_logprobs: ClassVar[bool] = False
    """Whether ``ChatRequest.prompt_logprobs`` (scoring given text, teacher forcing) is served."""

    def __init__(self, model: str, options: BaseModel):
        """``model`` is what the user wrote; backends with local weights resolve it themselves
        with ``distill.models.resolve_model``."""
        self.model = model
        self.options = options

    @abstractmethod
    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer every request, in order. Never raise for a per-request problem."""

    branch_option: ClassVar[str | None] = None
    """The option that names one LoRA adapter directory (e.g. ``adapter``), for backends that serve
    several adapters on one loaded model: eval models whose configs differ only in it share one
    loaded trunk (distill/branches.py), which answers each one with ``generate_branch``."""

    def generate_branch(self, requests: list[ChatRequest], adapter: str | None) -> list[ChatResult]:
        """``generate`` with the LoRA adapter in directory ``adapter`` (loaded on first use; None:
        the base model alone). Backends with a ``branch_option`` implement it."""
        raise NotImplementedError(f"teacher '{self.name}' serves no LoRA branches")

    @classmethod
    def trunk_options(cls, options: BaseModel, adapters: list[str]) -> BaseModel:
        """The options of one loaded trunk that will serve every adapter in ``adapters`` (the
        first is loaded with it). Override to size what the engine must reserve for them."""
        assert cls.branch_option is not None
        return options.model_copy(update={cls.branch_option: adapters[0] if adapters else None})

    speed_only_options: ClassVar[frozenset[str]] = frozenset()
    """Options that change only speed, resources or credentials, never an answer (concurrency,
    timeouts, batch size): left out of the request-cache key. Every other option is part of it."""

    @classmethod
    def cache_identity(cls, model: str, options: BaseModel) -> dict[str, Any]:
        """What, besides the request, decides the answer: part of every request-cache key. A
        classmethod, so a rerun can look answers up without loading the model. Every validated
        option is in it unless the backend lists it in ``speed_only_options`` (opt-out, so a
        plugin's new option can never serve stale answers)."""
        from distill.models import weights_fingerprint

        identity: dict[str, Any] = {"backend": cls.name, "model": model}
        fingerprint = weights_fingerprint(model)
        if fingerprint is not None:  # a local directory: its current weights, not just its path
            identity["weights"] = fingerprint
        answer_options = options.model_dump(mode="json", exclude=set(cls.speed_only_options))
        if answer_options:
            identity["options"] = answer_options
        return identity

    @classmethod
    def cost_usd(cls, model: str, options: BaseModel, usage: Usage) -> float | None:
        """What ``usage`` cost in US dollars, or None when unknown (local models: nothing to pay,
        or a model without a known price). Paid-API backends override this with their prices."""
        return None

    @classmethod
    def bulk_submission(cls, options: BaseModel) -> bool:
        """True when these options send requests as a provider's batch job (hours of latency, a
        lower price): stages that can then hand the teacher all their requests in one call
        (judge, eval) do so, instead of one small batch at a time."""
        return False

    def generate_resumable(self, requests: list[ChatRequest], jobs: Path | None) -> list[ChatResult]:
        """``generate``, for a backend whose work outlives the process (a provider's batch job).
        ``jobs`` is a JSONL file beside the run's answer log (None without one): the backend
        appends each job it submits there (fsynced) *before* waiting for it, and reads it first,
        so a rerun after a kill picks up the running jobs instead of submitting their requests
        again. ``AnswerSource`` calls this; the default is plain ``generate``."""
        return self.generate(requests)

    @classmethod
    def replica_options(cls, options: BaseModel, replicas: int) -> BaseModel:
        """The options each of ``replicas`` copies of this teacher gets when they share the work
        (``executor: ray``). A backend whose options hold a budget shared by every copy (one API
        key's requests per minute) splits it here; the default shares nothing."""
        return options

    def close(self) -> None:  # noqa: B027 - optional hook, most backends have nothing to free
        """Free the model, the engine or the connection pool."""

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Helpers shared by backends.

    def unsupported(self, request: ChatRequest) -> TeacherFailure | None:
        """A failure for a request that asks for something this backend can't do, else None."""
        if request.response_format is not None and not self.supports_response_format:
            return TeacherFailure(
                kind="unsupported",
                fatal=True,
                message=f"teacher '{self.name}' cannot enforce a JSON-schema response_format; "
                "use the openai or vllm teacher, or drop response_format",
            )
        if request.prompt_logprobs and not self.supports_prompt_logprobs:
            return TeacherFailure(
                kind="unsupported",
                fatal=True,
                message=f"teacher '{self.name}' cannot score given text (prompt_logprobs)",
            )
        if request.logprobs and not self.supports_logprobs:
            return TeacherFailure(
                kind="unsupported", fatal=True, message=f"teacher '{self.name}' cannot return logprobs"
            )
        return None

    def failed(self, request: ChatRequest, failure: TeacherFailure, started: float) -> ChatResult:
        return ChatResult(
            request_id=request.id,
            backend=self.name,
            model=self.model,
            error=failure,
            latency_s=time.perf_counter() - started,
        )


def raise_on_fatal(results: list[ChatResult]) -> list[ChatResult]:
    """Raise ``TeacherError`` with the first fatal failure's message; else return the results."""
    for result in results:
        if result.error is not None and result.error.fatal:
            raise TeacherError(result.error.message)
    return results


def teacher_identity(config: Any, teacher: Teacher | None = None) -> dict[str, Any]:
    """The teacher part of request-cache keys, the same whether or not the teacher is loaded."""
    if teacher is not None:
        return teacher.cache_identity(teacher.model, teacher.options)
    from distill.plugins import get_teachers

    teachers = get_teachers()
    return teachers[config.backend].cache_identity(config.model, teachers.options(config.backend, config.options))


def load_teacher(config: Any) -> Teacher:
    """Build the teacher a validated ``TeacherConfig`` names (its options already validated)."""
    from distill.plugins import get_teachers

    teachers = get_teachers()
    return teachers[config.backend](model=config.model, options=teachers.options(config.backend, config.options))

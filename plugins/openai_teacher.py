"""The ``openai`` teacher: the official async client against OpenAI or any OpenAI-compatible
server (vLLM, llama.cpp, ...). Bounded concurrency, requests/min and tokens/min limits, retries
with exponential backoff that honour ``retry-after``, a timeout that can't be turned off, and
fail-fast on errors that retrying can't fix (400/401/403/404/422).

The API key is read from the environment variable named in ``api_key_env`` when the client is
built; it is never stored on the teacher, in options, results, logs or error texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import openai
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

import distill
from distill.errors import TeacherError
from distill.records import ChatRequest, ChatResult, TeacherFailure, TokenLogprob, Usage
from distill.teacher import Teacher

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
PRICES_FILE = Path(__file__).with_name("openai_prices.yaml")


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_per_million: float = Field(ge=0, description="USD per million prompt tokens.")
    output_per_million: float = Field(ge=0, description="USD per million completion tokens.")
    cached_input_per_million: float | None = Field(
        None, ge=0, description="USD per million prompt tokens served from the prompt cache; empty: the input price."
    )


@cache
def bundled_prices() -> dict[str, Price]:
    """The price table in openai_prices.yaml (see its header for the source and date)."""
    data = yaml.safe_load(PRICES_FILE.read_text(encoding="utf-8"))
    return {model: Price.model_validate(price) for model, price in data["prices"].items()}


@cache
def batch_discount() -> float:
    """The share the Batch API takes off every price (openai_prices.yaml: ``batch_discount``)."""
    return float(yaml.safe_load(PRICES_FILE.read_text(encoding="utf-8"))["batch_discount"])


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        None, description="Server URL ending in /v1, e.g. http://127.0.0.1:8000/v1; empty for OpenAI."
    )
    base_urls: list[str] | None = Field(
        None,
        min_length=1,
        description="Several servers serving the SAME model (replicas): each request goes to the one with the "
        "fewest requests in flight, each server has its own max_concurrency and rate limits, a retry may move "
        "to another. The first URL names them in the request-cache key. Instead of base_url.",
    )

    @model_validator(mode="after")
    def _one_way_to_name_servers(self) -> OpenAIOptions:
        if self.base_url is not None and self.base_urls is not None:
            raise ValueError("base_url and base_urls: set one (base_urls: [URL] for one server)")
        return self

    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (never the key itself); "
        "null for a local server that needs no key.",
    )
    max_concurrency: int = Field(
        16, ge=1, le=1024, description="Requests in flight at once (per server, with base_urls)."
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="Most requests a minute, paced evenly, retries included; null: no limit."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Most tokens a minute (prompt chars/4 + max_tokens × n), paced evenly; null: no limit."
    )
    max_retries: int = Field(5, ge=0, le=50, description="Retries of a failed request (429, 5xx, timeouts, resets).")
    timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Deadline for one attempt, first byte to last; cannot be disabled."
    )
    backoff_initial_s: float = Field(1.0, gt=0, description="First retry delay; doubles each retry, with jitter.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest retry delay (a longer retry-after is honoured).")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields sent with each request (server-specific)."
    )
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="USD per million tokens by model, added to (and overriding) the bundled table "
        "plugins/openai_prices.yaml; a model in neither has an unknown price.",
    )
    # Batch mode (plugins/openai_batch.py).
    mode: Literal["online", "batch"] = Field(
        "online",
        description="online: one HTTP request per request; batch: the Batch API (half price, answers within "
        "completion_window), or vLLM's offline runner with batch_runner: vllm.",
    )
    completion_window: str = Field("24h", description="Batch mode: how long the provider may take (OpenAI: 24h).")
    poll_interval_s: float = Field(30.0, gt=0, le=3600, description="Batch mode: seconds between status checks.")
    batch_resubmits: int = Field(
        1, ge=0, le=10, description="Batch mode: how often failed, expired or cancelled items are submitted again."
    )
    batch_max_requests: int = Field(
        50_000, ge=1, le=50_000, description="Batch mode: most requests in one batch (OpenAI's limit: 50,000)."
    )
    batch_runner: Literal["api", "vllm"] = Field(
        "api",
        description="Batch mode: api: the server's Files and Batches endpoints; vllm: run the batch file with "
        "vLLM's offline runner on this machine (teacher.model: a bundled alias or local model directory).",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="batch_runner: vllm: extra arguments for vLLM's runner, e.g. [--max-model-len, '2048'].",
    )

    @model_validator(mode="after")
    def _batch_options(self) -> OpenAIOptions:
        if self.mode == "online" and (self.batch_runner != "api" or self.vllm_args):
            raise ValueError("batch_runner and vllm_args apply to mode: batch")
        return self


class PacedLimiter:
    """At most ``per_minute`` units a minute, paced evenly: a request of ``u`` units holds the
    next one back by ``u * 60 / per_minute`` seconds. No bursts, so no 60 s window (nor any
    shorter one) ever exceeds the limit, retries included."""

    def __init__(self, per_minute: float):
        self.seconds_per_unit = 60.0 / per_minute
        self.next_free = 0.0
        # A thread lock, not an asyncio one: the limiter outlives each call's event loop, so the
        # pace holds across batches too. The slot is reserved without awaiting, then waited for.
        self.lock = threading.Lock()

    async def acquire(self, units: float = 1.0) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + units * self.seconds_per_unit
        if start > now:
            await asyncio.sleep(start - now)


@dataclass(eq=False)
class Server:
    """One OpenAI-compatible server of ``base_url`` / ``base_urls``, with its own pace."""

    url: str | None  # None: OpenAI
    rpm: PacedLimiter | None
    tpm: PacedLimiter | None
    outstanding: int = 0  # attempts in flight (waiting for the rate limit included)
    sent: int = 0  # attempts routed here so far (ties go to the one sent fewer)


_SERVER: contextvars.ContextVar[Server | None] = contextvars.ContextVar("openai_server", default=None)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when an event loop already runs (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def retry_after_seconds(headers: Any) -> float | None:
    """The server's requested wait from ``retry-after-ms`` or ``retry-after`` (seconds or a date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None


# What can go wrong on the wire: the client's own errors (timeouts, connections, HTTP statuses,
# unreadable bodies it rejects), the whole-attempt deadline, and transport or decoding errors that
# escape the client from a truncated or non-JSON body.
WIRE_ERRORS = (openai.OpenAIError, TimeoutError, httpx.HTTPError, ValueError)


class OpenAITeacher(Teacher):
    """OpenAI API or any OpenAI-compatible server (vLLM, llama.cpp) via the official async client."""

    name = "openai"
    options_model = OpenAIOptions
    supports_response_format = True
    supports_logprobs = True
    supports_prompt_logprobs = True  # vLLM's server: prompt_logprobs (OpenAI's API has no way to score text)
    # Pace, patience and whose key pays never change an answer: not part of the cache key.
    speed_only_options = frozenset(
        {
            "api_key_env",
            "max_concurrency",
            "requests_per_minute",
            "tokens_per_minute",
            "max_retries",
            "timeout_s",
            "backoff_initial_s",
            "backoff_max_s",
            "prices",
            "base_urls",  # replicas of one model: the first URL stands for them in cache_identity
            # Batch mode changes when and at what price answers come, not what they say (a local
            # runner, which does change the server, is added back in cache_identity).
            "mode",
            "completion_window",
            "poll_interval_s",
            "batch_resubmits",
            "batch_max_requests",
            "batch_runner",
            "vllm_args",
        }
    )

    options: OpenAIOptions

    def __init__(self, model: str, options: BaseModel):
        super().__init__(model, options)
        self._check_key()
        # One pace for the teacher's whole life, not per batch; one per server.
        opts = self.options
        self.servers = [
            Server(
                url,
                PacedLimiter(opts.requests_per_minute) if opts.requests_per_minute else None,
                PacedLimiter(opts.tokens_per_minute) if opts.tokens_per_minute else None,
            )
            for url in (opts.base_urls or [opts.base_url])
        ]
        self.rpm, self.tpm = self.servers[0].rpm, self.servers[0].tpm

    def _check_key(self) -> None:
        env = self.options.api_key_env
        if env and not os.environ.get(env):
            raise TeacherError(
                f"teacher.options.api_key_env: environment variable {env} is not set; export it with "
                "your API key, or set api_key_env: null for a local server that needs no key"
            )

    def _client(self, server: Server | None = None) -> openai.AsyncOpenAI:
        """A client for ``server`` (default: the first)."""
        env = self.options.api_key_env
        key = os.environ.get(env, "") if env else "not-needed"
        return openai.AsyncOpenAI(
            api_key=key,
            base_url=(server or self.servers[0]).url,
            timeout=self.options.timeout_s,
            max_retries=0,  # retries are ours: we honour retry-after and count attempts
        )

    @classmethod
    def cost_usd(cls, model: str, options: BaseModel, usage: Usage) -> float | None:
        """Prompt tokens at the input price (those from the prompt cache at the cached-input
        price), completion tokens at the output price; the batch discount in batch mode; 0 for
        vLLM's offline runner (this machine's own compute)."""
        opts: Any = options
        if opts.mode == "batch" and opts.batch_runner == "vllm":
            return 0.0
        price = {**bundled_prices(), **opts.prices}.get(model)
        if price is None:
            return None
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = (
            price.input_per_million if price.cached_input_per_million is None else price.cached_input_per_million
        )
        cost = (
            (usage.prompt_tokens - cached) / 1e6 * price.input_per_million
            + cached / 1e6 * cached_price
            + usage.completion_tokens / 1e6 * price.output_per_million
        )
        return cost * (1 - batch_discount()) if opts.mode == "batch" else cost

    @classmethod
    def bulk_submission(cls, options: BaseModel) -> bool:
        return getattr(options, "mode", "online") == "batch"

    @classmethod
    def cache_identity(cls, model: str, options: BaseModel) -> dict[str, Any]:
        identity = super().cache_identity(model, options)
        opts: Any = options
        if opts.mode == "batch" and opts.batch_runner == "vllm":  # a local engine answers, not base_url's server
            identity["runner"] = {"batch_runner": "vllm", "vllm_args": opts.vllm_args}
        if opts.base_urls:  # the same key as base_url: FIRST (adding or removing replicas keeps the cache)
            identity.setdefault("options", {})["base_url"] = opts.base_urls[0]
        return identity

    @classmethod
    def replica_options(cls, options: BaseModel, replicas: int) -> BaseModel:
        """Rate limits are one key's (or one server's) budget: each of ``replicas`` copies of this
        teacher (``executor: ray``) paces at its share, so together they keep the limit."""
        opts: Any = options
        update = {
            name: getattr(opts, name) / replicas
            for name in ("requests_per_minute", "tokens_per_minute")
            if getattr(opts, name) is not None
        }
        return opts.model_copy(update=update)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return self.generate_resumable(requests, None)

    def generate_resumable(self, requests: list[ChatRequest], jobs: Path | None) -> list[ChatResult]:
        """Online: ``agenerate``. Batch mode: batch jobs recorded in ``jobs`` (plugins/openai_batch.py)."""
        if self.options.mode == "batch":
            from distill_plugins.openai_batch import BatchRunner

            return run_sync(BatchRunner(self, jobs).run(requests))
        return run_sync(self.agenerate(requests))

    async def agenerate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer all requests concurrently; results in request order."""
        options = self.options
        # max_concurrency per server; routing to the least busy one keeps each at most that busy.
        semaphore = asyncio.Semaphore(options.max_concurrency * len(self.servers))
        abort: list[TeacherFailure] = []  # the first fatal failure stops new sends
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(self._client(server)) for server in self.servers]

            async def one(request: ChatRequest) -> ChatResult:
                async with semaphore:
                    return await self._answer(clients, request, abort)

            return list(await asyncio.gather(*(one(request) for request in requests)))

    def _route(self, avoid: Server | None) -> Server:
        """The server with the fewest requests in flight (waiting for its rate limit included), not
        ``avoid`` (the one a retry just failed on) while another exists; ties: the one sent fewer."""
        candidates = [server for server in self.servers if server is not avoid] or self.servers
        return min(candidates, key=lambda server: (server.outstanding, server.sent))

    async def _answer(
        self, clients: list[openai.AsyncOpenAI], request: ChatRequest, abort: list[TeacherFailure]
    ) -> ChatResult:
        started = time.perf_counter()
        if (failure := self.unsupported(request)) is not None:
            return self.failed(request, failure, started)
        estimated_tokens = sum(len(m.content) for m in request.messages) / 4 + request.max_tokens * request.n
        attempt = 0
        server: Server | None = None
        while True:
            if abort:
                cancelled = abort[0].model_copy(update={"kind": "cancelled", "attempts": attempt})
                return self.failed(request, cancelled, started)
            attempt += 1
            failure = None
            server = self._route(avoid=server)
            client = clients[self.servers.index(server)]
            _SERVER.set(server)  # error messages name this server (a context variable: per request)
            server.outstanding += 1
            server.sent += 1
            try:
                if server.rpm is not None:
                    await server.rpm.acquire(1)
                if server.tpm is not None:
                    await server.tpm.acquire(estimated_tokens)
                if abort:
                    continue
                payload = self._payload(request)
                try:
                    # A whole-attempt deadline: httpx's timeout is per read, so a server that trickles
                    # a byte at a time would otherwise hold the request forever.
                    response = await asyncio.wait_for(client.chat.completions.create(**payload), self.options.timeout_s)
                except WIRE_ERRORS as exc:  # transport and API errors only: a bug here must not re-send
                    failure, wait = self._classify(exc, attempt)
            finally:
                server.outstanding -= 1
            if failure is None:
                # Outside the try: reading a good answer never counts as a server error, so a
                # parsing bug can't make a paid request go out again.
                return self._result(request, response, started)
            if failure.fatal:
                if failure.kind == "not_found":
                    failure = failure.model_copy(update={"message": await self._not_found_hint(client)})
                abort.append(failure)
                return self.failed(request, failure, started)
            if attempt > self.options.max_retries:
                failure = failure.model_copy(
                    update={"message": f"{failure.message} (gave up after {attempt} attempts)"}
                )
                return self.failed(request, failure, started)
            log.info("request %s: %s; retry %d in %.1fs", request.id, failure.kind, attempt, wait)
            await asyncio.sleep(wait)

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [m.model_dump() for m in request.messages],
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
            "n": request.n,
        }
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.stop:
            payload["stop"] = request.stop
        if request.response_format is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": request.response_format, "strict": True},
            }
        if request.logprobs:
            payload["logprobs"] = True
            if request.top_logprobs:
                payload["top_logprobs"] = request.top_logprobs
        if self.options.extra_body:
            payload["extra_body"] = self.options.extra_body
        if request.prompt_logprobs:  # scoring: vLLM's extensions of the chat API
            scoring = {
                "prompt_logprobs": request.prompt_logprobs,
                "add_generation_prompt": False,
                "return_token_ids": True,
            }
            payload["extra_body"] = {**payload.get("extra_body", {}), **scoring}
        return payload

    def _result(self, request: ChatRequest, response: Any, started: float) -> ChatResult:
        choices = sorted(response.choices, key=lambda choice: choice.index)
        logprobs = None
        if request.logprobs:
            logprobs = [
                [
                    TokenLogprob(
                        token=item.token,
                        logprob=item.logprob,
                        top={alt.token: alt.logprob for alt in (item.top_logprobs or [])},
                    )
                    for item in ((choice.logprobs.content if choice.logprobs else None) or [])
                ]
                for choice in choices
            ]
        prompt_ids, scored = None, None
        if request.prompt_logprobs:
            prompt_ids = getattr(response, "prompt_token_ids", None)
            raw = getattr(response, "prompt_logprobs", None)
            if not isinstance(raw, list) or not isinstance(prompt_ids, list) or len(raw) != len(prompt_ids):
                failure = TeacherFailure(
                    kind="unsupported",
                    fatal=True,
                    message=f"{self._where()} returned no prompt_logprobs / prompt_token_ids: scoring given text "
                    "needs a vLLM OpenAI-compatible server (OpenAI's own API cannot score text)",
                )
                return self.failed(request, failure, started)
            scored = [_scored_token(i, p, request.prompt_logprobs) for i, p in zip(prompt_ids, raw)]
        usage = response.usage
        return ChatResult(
            request_id=request.id,
            backend=self.name,
            model=self.model,
            texts=[choice.message.content or "" for choice in choices],
            finish_reasons=[choice.finish_reason or "stop" for choice in choices],
            logprobs=logprobs,
            prompt_token_ids=prompt_ids,
            prompt_logprobs=scored,
            usage=Usage(
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                cached_tokens=(getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0) or 0),
            ),
            latency_s=time.perf_counter() - started,
        )

    def _classify(self, exc: Exception, attempt: int) -> tuple[TeacherFailure, float]:
        """A failure record for an exception, and how long to wait before retrying it."""
        backoff = min(self.options.backoff_initial_s * 2 ** (attempt - 1), self.options.backoff_max_s)
        backoff *= random.uniform(0.75, 1.25)
        if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
            return TeacherFailure(
                kind="timeout", message=f"no answer within {self.options.timeout_s}s", attempts=attempt
            ), backoff
        if isinstance(exc, openai.APIConnectionError):
            return TeacherFailure(
                kind="connection",
                message=f"cannot reach {self._where()}: {exc}",
                raw=repr(exc.__cause__ or exc),
                attempts=attempt,
            ), backoff
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            raw = self._redact(exc.response.text if exc.response is not None else str(exc))
            if status in RETRYABLE_STATUS:
                kind = "rate_limited" if status == 429 else "server_error"
                wait = retry_after_seconds(exc.response.headers if exc.response is not None else None)
                return TeacherFailure(
                    kind=kind,
                    status_code=status,
                    raw=raw,
                    attempts=attempt,
                    message=f"HTTP {status} from {self._where()}",
                ), (backoff if wait is None else wait)
            kind, hint = {
                401: ("auth", f"the server rejected the API key (HTTP 401): check ${self.options.api_key_env}"),
                403: ("auth", "the API key may not use this model or endpoint (HTTP 403)"),
                404: ("not_found", f"model '{self.model}' or endpoint not found (HTTP 404)"),
            }.get(status, ("bad_request", f"the server refused the request (HTTP {status}): {raw[:300]}"))
            return TeacherFailure(
                kind=kind, status_code=status, raw=raw, attempts=attempt, message=hint, fatal=True
            ), 0.0
        # A body that is not valid JSON, a truncated stream: the server misbehaved; retry.
        return TeacherFailure(
            kind="server_error",
            message=f"unreadable answer from {self._where()}: {exc!r}"[:500],
            raw=self._redact(repr(exc)),
            attempts=attempt,
        ), backoff

    async def _not_found_hint(self, client: openai.AsyncOpenAI) -> str:
        message = f"model '{self.model}' not found at {self._where()} (HTTP 404): check teacher.model"
        try:
            served = [m.id async for m in client.models.list()]
        except Exception:
            return message
        return f"{message}; the server has: {', '.join(served) or 'no models'}"

    def _where(self) -> str:
        """The server of the request being answered (the first one outside a request)."""
        server = _SERVER.get() if len(self.servers) > 1 else None
        return (server or self.servers[0]).url or "api.openai.com"

    def _redact(self, text: str) -> str:
        env = self.options.api_key_env
        key = os.environ.get(env, "") if env else ""
        if key and len(key) >= 4:
            text = text.replace(key, "[redacted]")
            text = text.replace(key[-4:], "[redacted]")  # OpenAI echoes keys masked but with the tail
        return text


def _scored_token(token_id: int, position: dict[str, Any] | None, top_k: int) -> TokenLogprob | None:
    """One entry of vLLM's ``prompt_logprobs``: ``{token id: {logprob, rank, decoded_token}}`` holding the
    top-k and the actual token (None for the first token, which nothing predicts)."""
    if position is None:
        return None
    actual = position.get(str(token_id)) or {}
    ranked = {int(i): p for i, p in position.items() if p.get("rank") is not None and p["rank"] <= top_k}
    return TokenLogprob(
        token=actual.get("decoded_token") or "",
        logprob=actual.get("logprob", float("-inf")),
        top={p.get("decoded_token") or "": p["logprob"] for p in ranked.values()},
        id=token_id,
        top_ids={i: p["logprob"] for i, p in ranked.items()},
    )


@distill.hookimpl
def register_teachers(register: Any) -> None:
    register(OpenAITeacher)

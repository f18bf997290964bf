"""A small fault-injecting HTTP proxy for tests: sits between the openai teacher and the real vLLM
server and, per request, either forwards it or answers with a planned fault. It records the time of
every request it receives, so tests can assert on retries and rate limits at the wire."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


@dataclass
class Fault:
    """What to do with one request: ``kind`` is pass, status, hang (accept, never answer), reset
    (drop the connection), garbage (a body that is not JSON), truncated (a real answer cut off
    mid-body), trickle (a real answer sent a few bytes a second) or reply (a well-formed chat
    completion whose message content is ``body``)."""

    kind: str = "pass"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "injected fault"}}'


@dataclass
class Answered:
    """One request as the proxy saw it: when it came and left (monotonic), its body's hash, the
    fault applied (``pass``: forwarded untouched), the status sent back and its retry-after."""

    received: float
    sent: float
    body_sha256: str
    fault: str
    status: int
    retry_after: str | None


class FaultProxy:
    """``FaultProxy(upstream).start()``; queue faults with ``plan`` or set a random ``storm``;
    read ``received`` and ``answered``."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.received: list[tuple[float, str]] = []  # (monotonic time, path) of each request
        self.authorizations: list[str] = []  # the Authorization header of each request
        self.bodies: list[bytes] = []  # the body of each request
        self.answered: list[Answered] = []  # what each request got back
        self._storm: tuple[float, list[Fault], random.Random] | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def plan(self, *faults: Fault) -> None:
        """Faults to apply to the next requests, in order; then requests pass through."""
        self.faults.extend(faults)

    def storm(self, rate: float, faults: list[Fault], seed: int = 0) -> None:
        """Once the planned faults are used up, answer each request with probability ``rate``
        with one of ``faults`` (chosen at random, seeded); ``rate=0`` ends the storm."""
        self._storm = (rate, faults, random.Random(seed)) if rate > 0 else None

    def reset(self) -> None:
        self.faults.clear()
        self._storm = None
        self.received.clear()
        self.authorizations.clear()
        self.bodies.clear()
        self.answered.clear()

    def _next_fault(self) -> Fault:
        if self.faults:
            return self.faults.pop(0)
        if self._storm is not None:
            rate, faults, rng = self._storm
            if rng.random() < rate:
                return rng.choice(faults)
        return Fault()

    def start(self) -> FaultProxy:
        threading.Thread(target=self._serve, daemon=True).start()
        if not self._ready.wait(30):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)  # releases hanging handlers
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        self.received.append((received, request.path))
        self.authorizations.append(request.headers.get("Authorization", ""))
        fault = self._next_fault()
        body = await request.read()
        self.bodies.append(body)
        response = await self._respond(request, body, fault)
        self.answered.append(
            Answered(
                received,
                time.monotonic(),
                hashlib.sha256(body).hexdigest(),
                fault.kind,
                response.status,
                response.headers.get("retry-after"),
            )
        )
        return response

    async def _respond(self, request: web.Request, body: bytes, fault: Fault) -> web.StreamResponse:
        if fault.kind == "status":
            return web.Response(
                status=fault.status, text=fault.body, headers=fault.headers, content_type="application/json"
            )
        if fault.kind == "hang":  # accept, then never answer (until the proxy stops)
            assert self._stopping is not None
            await self._stopping.wait()
            return web.Response(status=503)
        if fault.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault.kind == "reply":
            completion = {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "created": 0,
                "model": "fault",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": fault.body}}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            return web.json_response(completion)
        if fault.kind == "garbage":
            return web.Response(status=200, text="<html>not json", content_type="application/json")
        upstream = await self._forward(request, body)
        if fault.kind in ("truncated", "trickle"):
            return await self._damaged(request, upstream, fault.kind)
        return upstream

    async def _damaged(self, request: web.Request, upstream: web.Response, kind: str) -> web.StreamResponse:
        """The real answer, cut off after half its bytes (connection closed), or trickled out."""
        payload = upstream.body if isinstance(upstream.body, bytes) else b""
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "application/json"})
        response.content_length = len(payload)
        await response.prepare(request)
        if kind == "truncated":
            await response.write(payload[: len(payload) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        assert self._stopping is not None
        try:
            for start in range(0, len(payload), 8):  # 8 bytes every 0.5 s: no read ever waits long
                if self._stopping.is_set():
                    break
                await response.write(payload[start : start + 8])
                await asyncio.sleep(0.5)
        except ConnectionError:
            pass  # the client gave up on us, as it should
        return response

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        skip = {"host", "content-length"}
        headers: dict[str, Any] = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, self.upstream + request.path_qs, data=body, headers=headers) as upstream,
        ):
            payload = await upstream.read()
            return web.Response(
                status=upstream.status, body=payload, content_type=upstream.content_type or "application/json"
            )


def pacing_violations(times: list[float], per_minute: float, slack_s: float = 0.35) -> list[tuple[int, int, float]]:
    """Runs of consecutive arrivals that came faster than ``per_minute`` allows: (first, last,
    span) for every i < j with ``times[j] - times[i] < (j - i) · 60 / per_minute - slack_s``. The
    slack forgives one late stamp on a busy machine, not a burst: two requests sent back to back
    (a gap of ~0 s) fail at any rate above 60 / slack_s per minute."""
    times = sorted(times)
    spacing = 60 / per_minute
    return [
        (i, j, round(times[j] - times[i], 3))
        for i in range(len(times))
        for j in range(i + 1, len(times))
        if times[j] - times[i] < (j - i) * spacing - slack_s
    ]

"""A small fault-injecting HTTP proxy for tests: sits between the openai teacher and the real vLLM
server and, per request, either forwards it or answers with a planned fault. It records the time of
every request it receives, so tests can assert on retries and rate limits at the wire."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


@dataclass
class Fault:
    """What to do with one request: ``kind`` is pass, status, hang, reset, garbage (a body that is
    not JSON) or reply (a well-formed chat completion whose message content is ``body``)."""

    kind: str = "pass"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "injected fault"}}'


class FaultProxy:
    """``FaultProxy(upstream).start()``; queue faults with ``plan``; read ``received``."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.received: list[tuple[float, str]] = []  # (monotonic time, path) of each request
        self.authorizations: list[str] = []  # the Authorization header of each request
        self.bodies: list[bytes] = []  # the body of each request
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

    def reset(self) -> None:
        self.faults.clear()
        self.received.clear()
        self.authorizations.clear()
        self.bodies.clear()

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
        self.received.append((time.monotonic(), request.path))
        self.authorizations.append(request.headers.get("Authorization", ""))
        fault = self.faults.pop(0) if self.faults else Fault()
        body = await request.read()
        self.bodies.append(body)
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
        return await self._forward(request, body)

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

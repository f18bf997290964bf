"""A small server with the OpenAI Batch API's files and batches endpoints, for tests: no paid API
is reachable and no real provider's lifecycle (validating → in_progress → finalizing →
completed, or expired, failed, cancelled) can be produced on demand. Every answer comes from a real
model: each line of a batch is sent to the real vLLM server's ``/v1/chat/completions``.

    server = BatchServer("http://127.0.0.1:PORT/v1").start()   # the vLLM server's base URL
    server.plan(Plan(hold=True))            # the next batch stays in_progress until release()
    server.plan(Plan(errors={0, 3}))        # lines 0 and 3 of the next batch fail with HTTP 500
    server.plan(Plan(expire_after=2))       # the next batch expires after answering 2 lines
    server.plan(Plan(fail=True))            # the next batch fails validation

Endpoints: POST /v1/files (multipart), GET /v1/files/{id}/content, POST /v1/batches,
GET /v1/batches, GET /v1/batches/{id} (each look moves a batch one step along its lifecycle),
POST /v1/batches/{id}/cancel. ``created`` records every batch created (id and custom ids), so a
test counts submissions at the server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


@dataclass
class Plan:
    """What happens to one batch: ``hold`` keeps it in_progress until ``release()``; ``errors``
    are the input lines answered with HTTP 500 (in the error file); ``expire_after`` answers that
    many lines, then the batch expires; ``fail`` fails it at validation."""

    hold: bool = False
    errors: set[int] = field(default_factory=set)
    expire_after: int | None = None
    fail: bool = False


@dataclass
class Batch:
    id: str
    input_file_id: str
    lines: list[dict[str, Any]]
    plan: Plan
    metadata: dict[str, Any] | None
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    output_file_id: str | None = None
    error_file_id: str | None = None
    task: asyncio.Task[None] | None = None
    results: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line, output row)
    errors: list[dict[str, Any]] = field(default_factory=list)
    looks: int = 0


class BatchServer:
    """``BatchServer(upstream).start()``; ``plan`` what the next batches do; read ``created``."""

    def __init__(self, upstream: str, concurrency: int = 4):
        self.upstream = upstream.rstrip("/")
        self.concurrency = concurrency
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, Batch] = {}
        self.created: list[tuple[str, list[str]]] = []  # (batch id, custom ids), in creation order
        self.plans: list[Plan] = []
        self.released = threading.Event()
        self.released.set()
        self.port = 0
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def plan(self, *plans: Plan) -> None:
        """Plans for the next batches created, in order; later batches complete normally."""
        self.plans.extend(plans)
        if any(p.hold for p in plans):
            self.released.clear()

    def release(self) -> None:
        """Let held batches finish."""
        self.released.set()

    def status(self, batch_id: str) -> str:
        return self.batches[batch_id].status

    def start(self) -> BatchServer:
        threading.Thread(target=self._serve, daemon=True).start()
        if not self._ready.wait(30):
            raise RuntimeError("batch server did not start")
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # Files -------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not hasattr(upload, "file"):
            return web.json_response({"error": {"message": "need purpose=batch and a file"}}, status=400)
        data = upload.file.read()  # type: ignore[union-attr]
        file_id = self._new_id("file")
        self.files[file_id] = data
        return web.json_response(self._file(file_id, getattr(upload, "filename", "input.jsonl"), "batch"))

    def _file(self, file_id: str, name: str, purpose: str) -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files[file_id]),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }

    async def _content(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["id"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    # Batches -----------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        data = self.files.get(body.get("input_file_id", ""))
        if data is None:
            return web.json_response({"error": {"message": "input file not found"}}, status=400)
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        batch = Batch(
            id=self._new_id("batch"),
            input_file_id=body["input_file_id"],
            lines=lines,
            plan=self.plans.pop(0) if self.plans else Plan(),
            metadata=body.get("metadata"),
        )
        self.batches[batch.id] = batch
        self.created.append((batch.id, [line["custom_id"] for line in lines]))
        return web.json_response(self._batch(batch))

    async def _list(self, request: web.Request) -> web.Response:
        data = [self._batch(b) for b in reversed(list(self.batches.values()))]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        batch.looks += 1
        self._advance(batch)
        return web.json_response(self._batch(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        if batch.status not in ("completed", "failed", "expired", "cancelled"):
            if batch.task is not None:
                batch.task.cancel()
            self._finish(batch, "cancelled", "batch_cancelled")
        return web.json_response(self._batch(batch))

    def _advance(self, batch: Batch) -> None:
        """One step along the lifecycle per look, as a provider's batch moves between polls."""
        if batch.status == "validating":
            if batch.plan.fail:
                batch.status = "failed"
                batch.errors = [{"code": "invalid_request", "message": "injected validation failure", "line": 1}]
                return
            batch.status = "in_progress"
            batch.task = asyncio.ensure_future(self._process(batch))
        elif batch.status == "in_progress":
            assert batch.task is not None
            held = batch.plan.hold and not self.released.is_set()
            if batch.task.done() and not held:
                batch.status = "finalizing"
        elif batch.status == "finalizing":
            if batch.plan.expire_after is not None:
                self._finish(batch, "expired", "batch_expired")
            else:
                self._finish(batch, "completed", None)

    async def _process(self, batch: Batch) -> None:
        """Answer the batch's lines with the real model (all but the planned errors)."""
        semaphore = asyncio.Semaphore(self.concurrency)
        planned = batch.plan.expire_after
        todo = list(enumerate(batch.lines))
        if planned is not None:
            todo = todo[:planned]

        async def one(session: aiohttp.ClientSession, number: int, line: dict[str, Any]) -> None:
            if number in batch.plan.errors:
                body = {"error": {"message": "injected server error", "type": "server_error"}}
                batch.results.append((number, self._row(line, 500, body)))
                return
            async with semaphore, session.post(self.upstream + "/chat/completions", json=line["body"]) as upstream:
                body = await upstream.json(content_type=None)
                batch.results.append((number, self._row(line, upstream.status, body)))

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session, number, line) for number, line in todo))

    def _row(self, line: dict[str, Any], status: int, body: Any) -> dict[str, Any]:
        return {
            "id": self._new_id("batch_req"),
            "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": self._new_id("req"), "body": body},
            "error": None,
        }

    def _finish(self, batch: Batch, status: str, missing_code: str | None) -> None:
        """Write the output file (answered lines) and the error file (failed and missing ones)."""
        answered = {number for number, _ in batch.results}
        good = [
            row for _, row in sorted(batch.results, key=lambda item: item[0]) if row["response"]["status_code"] == 200
        ]
        bad = [
            row for _, row in sorted(batch.results, key=lambda item: item[0]) if row["response"]["status_code"] != 200
        ]
        if missing_code is not None:
            message = {
                "batch_expired": "This request could not be executed before the completion window expired.",
                "batch_cancelled": "This request was not executed because the batch was cancelled.",
            }[missing_code]
            bad += [
                {
                    "id": self._new_id("batch_req"),
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": missing_code, "message": message},
                }
                for number, line in enumerate(batch.lines)
                if number not in answered
            ]
        for rows, attribute in ((good, "output_file_id"), (bad, "error_file_id")):
            if rows:
                file_id = self._new_id("file")
                self.files[file_id] = "".join(json.dumps(row) + "\n" for row in rows).encode()
                setattr(batch, attribute, file_id)
        batch.status = status

    def _batch(self, batch: Batch) -> dict[str, Any]:
        done = sum(1 for _, row in batch.results if row["response"]["status_code"] == 200)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "request_counts": {"total": len(batch.lines), "completed": done, "failed": len(batch.results) - done},
            "metadata": batch.metadata,
        }

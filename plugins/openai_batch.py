"""Batch mode of the ``openai`` teacher (``teacher.options.mode: batch``): the OpenAI Batch API, at
half the list price, or vLLM's offline batch runner on this machine (``batch_runner: vllm``).

One call of ``OpenAITeacher.generate_resumable(requests, jobs)`` is one or more batch jobs:

1. Each request becomes a line of a JSONL input file, ``{"custom_id": <distill's stable request
   id>, "method": "POST", "url": "/v1/chat/completions", "body": <the online payload>}``.
2. API: the file is uploaded (Files API, ``purpose=batch``), a batch is created and polled every
   ``poll_interval_s`` until it ends (``completed``, ``failed``, ``expired``, ``cancelled``); its
   output and error files are downloaded and every line is matched to its request by
   ``custom_id``. vllm: ``python -m vllm.entrypoints.launchers.run_batch -i IN -o OUT`` runs the
   same file with the model on this machine and writes the same output format.
3. Items in the error file (or missing from an expired, cancelled or failed batch) become
   ``TeacherFailure``s holding the raw error line, classified like online errors (a 5xx or 429 can
   be retried; a 400/401/403/404 stops the run). Expired, cancelled, failed and retryable items are
   submitted again, ``batch_resubmits`` times (default once), in a new batch of just those items.

**Resumable.** ``jobs`` is a JSONL file beside the stage's answer log (``responses.batches.jsonl``
for generate). Each step is appended there (fsynced) before the next one starts: ``uploaded``
(the input file id and the request ids) before the batch is created, ``submitted`` (the batch id)
before waiting, each status change while waiting. A rerun after a kill reads it first: a request
whose latest job is still running (or finished with its answer, which the kill kept from the
answer log) is collected from that job, never submitted again; a job that was uploaded but whose
batch creation was not recorded is looked up among the provider's batches by its input file.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai

from distill.records import ChatRequest, ChatResult, TeacherFailure
from distill.runstore import JsonlLog

if TYPE_CHECKING:
    from distill_plugins.openai_teacher import OpenAITeacher

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
ENDED = {"completed", "failed", "expired", "cancelled"}
RETRYABLE_KINDS = {"timeout", "cancelled", "server_error", "rate_limited", "connection"}


@dataclass
class Job:
    """One batch of requests, as the jobs file knows it."""

    key: str
    request_ids: list[str]
    runner: str = "api"
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    input_path: str | None = None
    output_path: str | None = None


@dataclass
class JobsFile:
    """The append-only record of a stage's batch jobs (in memory only when there is no path)."""

    path: Path | None
    jobs: dict[str, Job] = field(default_factory=dict)

    def load(self) -> dict[str, Job]:
        """Replay the file into jobs, in the order they were first recorded."""
        rows = JsonlLog(self.path).read() if self.path is not None else []
        for row in rows:
            key = row.get("key")
            if not key:
                continue
            if row.get("event") == "uploaded":
                self.jobs[key] = Job(
                    key=key,
                    request_ids=list(row.get("request_ids", [])),
                    runner=row.get("runner", "api"),
                    input_file_id=row.get("input_file_id"),
                    input_path=row.get("input_path"),
                    output_path=row.get("output_path"),
                )
            elif key in self.jobs:
                job = self.jobs[key]
                job.batch_id = row.get("batch_id") or job.batch_id
                job.status = row.get("status") or job.status
        return self.jobs

    def record(self, job: Job, event: str, **fields: Any) -> None:
        self.jobs[job.key] = job
        row = {"event": event, "key": job.key, "time": time.time(), **fields}
        if self.path is not None:
            JsonlLog(self.path).append([row])


@dataclass
class Outcome:
    """What one job said about one request: an answer, or a failure and whether to submit again."""

    result: ChatResult
    resubmit: bool = False
    ended: bool = False  # read from the files of a job that ended (not a polling or download failure)


class BatchRunner:
    """Runs requests as batch jobs for an ``OpenAITeacher`` (see the module docstring)."""

    def __init__(self, teacher: OpenAITeacher, jobs_path: Path | None):
        self.teacher = teacher
        self.options = teacher.options
        self.jobs = JobsFile(jobs_path)
        self.started = time.perf_counter()

    async def run(self, requests: list[ChatRequest]) -> list[ChatResult]:
        teacher = self.teacher
        results: dict[str, ChatResult] = {}
        todo: dict[str, ChatRequest] = {}
        for request in requests:
            if (failure := teacher.unsupported(request)) is not None:
                results[request.id] = teacher.failed(request, failure, self.started)
            else:
                todo.setdefault(request.id, request)
        known = self.jobs.load()
        latest: dict[str, Job] = {}
        for job in known.values():  # in recording order: the last job holding a request wins
            for request_id in job.request_ids:
                if request_id in todo:
                    latest[request_id] = job
        async with teacher._client() as client:
            adopted = list({job.key: job for job in latest.values()}.values())
            if adopted:
                log.info("resuming %d recorded batch job(s) for %d requests", len(adopted), len(latest))
            # Recorded jobs are collected while the requests no job holds go out as a new one.
            fresh = [request for request_id, request in todo.items() if request_id not in latest]
            resumed, submitted = await asyncio.gather(
                self._collect(client, adopted, todo), self._submit_and_collect(client, fresh, todo, attempt=0)
            )
            # A request that failed in a job recorded by an earlier run goes out again, as online
            # failures are retried by a rerun (also a fatal one: the key or model may be fixed now).
            for outcome in resumed.values():
                if not outcome.result.ok and outcome.ended:
                    outcome.resubmit = True
            outcomes = {**resumed, **submitted}
            # A recorded upload whose batch was never created: its requests go out now.
            orphans = [request for request_id, request in todo.items() if request_id not in outcomes]
            outcomes.update(await self._submit_and_collect(client, orphans, todo, attempt=0))
            for attempt in range(1, self.options.batch_resubmits + 1):
                again = [todo[request_id] for request_id, outcome in outcomes.items() if outcome.resubmit]
                if not again:
                    break
                log.info("submitting %d failed or expired requests again (attempt %d)", len(again), attempt + 1)
                outcomes.update(await self._submit_and_collect(client, again, todo, attempt=attempt))
        for request_id, outcome in outcomes.items():
            results[request_id] = outcome.result
        return [results[request.id] for request in requests]

    # Submitting ----------------------------------------------------------------------------------

    async def _submit_and_collect(
        self, client: openai.AsyncOpenAI, requests: list[ChatRequest], todo: dict[str, ChatRequest], attempt: int
    ) -> dict[str, Outcome]:
        if not requests:
            return {}
        size = self.options.batch_max_requests
        chunks = [requests[start : start + size] for start in range(0, len(requests), size)]
        submitted = await asyncio.gather(*(self._submit(client, chunk, attempt) for chunk in chunks))
        outcomes: dict[str, Outcome] = {}
        jobs = []
        for chunk, (job, failure) in zip(chunks, submitted):
            if job is None:
                assert failure is not None
                outcomes.update({r.id: Outcome(self.teacher.failed(r, failure, self.started)) for r in chunk})
            else:
                jobs.append(job)
        outcomes.update(await self._collect(client, jobs, todo))
        return outcomes

    def input_lines(self, requests: list[ChatRequest]) -> bytes:
        """The batch input file: one line per request, the same body as an online request."""
        lines = []
        for request in requests:
            body = self.teacher._payload(request)
            body.update(body.pop("extra_body", None) or {})  # the client merges extra_body; here we do
            lines.append(json.dumps({"custom_id": request.id, "method": "POST", "url": ENDPOINT, "body": body}))
        return ("\n".join(lines) + "\n").encode("utf-8")

    async def _submit(
        self, client: openai.AsyncOpenAI, requests: list[ChatRequest], attempt: int
    ) -> tuple[Job | None, TeacherFailure | None]:
        ids = [r.id for r in requests]
        key = hashlib.sha256(f"{attempt}:{time.time_ns()}:{','.join(ids)}".encode()).hexdigest()[:16]
        data = self.input_lines(requests)
        if self.options.batch_runner == "vllm":
            folder = self.jobs.path.parent if self.jobs.path is not None else Path(tempfile.mkdtemp(prefix="distill-"))
            stem = self.jobs.path.stem if self.jobs.path is not None else "batch"
            job = Job(
                key=key,
                request_ids=ids,
                runner="vllm",
                input_path=str(folder / f"{stem}-{key}.input.jsonl"),
                output_path=str(folder / f"{stem}-{key}.output.jsonl"),
            )
            Path(job.input_path).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
            Path(job.input_path).write_bytes(data)  # type: ignore[arg-type]
            self.jobs.record(
                job, "uploaded", request_ids=ids, runner="vllm", input_path=job.input_path, output_path=job.output_path
            )
            return job, None
        uploaded, failure = await self._call(
            lambda: client.files.create(file=("distill-batch.jsonl", data, "application/jsonl"), purpose="batch"),
            "upload the batch input file",
            probe=True,
        )
        if uploaded is None:
            return None, failure
        job = Job(key=key, request_ids=ids, input_file_id=uploaded.id)
        # Recorded before the batch exists: a kill between the two is found again by this file id.
        self.jobs.record(job, "uploaded", request_ids=ids, input_file_id=uploaded.id, attempt=attempt)
        return await self._create(client, job)

    async def _create(self, client: openai.AsyncOpenAI, job: Job) -> tuple[Job | None, TeacherFailure | None]:
        assert job.input_file_id is not None
        batch, failure = await self._call(
            lambda: client.batches.create(
                input_file_id=job.input_file_id,  # type: ignore[arg-type]
                endpoint=ENDPOINT,
                completion_window=self.options.completion_window,  # type: ignore[arg-type]
                metadata={"distill_job": job.key},
            ),
            "create the batch",
            probe=True,
        )
        if batch is None:
            return None, failure
        job.batch_id, job.status = batch.id, batch.status
        self.jobs.record(job, "submitted", batch_id=batch.id, status=batch.status)  # before any waiting
        log.info("batch %s submitted: %d requests", batch.id, len(job.request_ids))
        return job, None

    async def _call(self, make: Any, what: str, probe: bool = False) -> tuple[Any, TeacherFailure | None]:
        """One Files/Batches API call with the online retry rules. ``probe``: a 404 or 405 means
        the server has no Batch API at all (vLLM, llama.cpp): one fatal line saying so."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await asyncio.wait_for(make(), self.options.timeout_s), None
            except (openai.OpenAIError, TimeoutError, ValueError, OSError) as exc:
                failure, wait = self.teacher._classify(exc, attempt)
            if probe and failure.status_code in (404, 405):
                return None, failure.model_copy(
                    update={
                        "kind": "unsupported",
                        "fatal": True,
                        "message": f"teacher.options.mode: batch, but {self.teacher._where()} has no Batch API "
                        f"(could not {what}: HTTP {failure.status_code}); vLLM and llama.cpp servers answer "
                        "online only: use mode: online there, or batch_runner: vllm to run the batch file with "
                        "vLLM's offline runner on this machine",
                    }
                )
            if failure.fatal or attempt > self.options.max_retries:
                return None, failure.model_copy(update={"message": f"could not {what}: {failure.message}"})
            await asyncio.sleep(wait)

    # Collecting ----------------------------------------------------------------------------------

    async def _collect(
        self, client: openai.AsyncOpenAI, jobs: list[Job], todo: dict[str, ChatRequest]
    ) -> dict[str, Outcome]:
        found = await asyncio.gather(*(self._collect_one(client, job, todo) for job in jobs))
        outcomes: dict[str, Outcome] = {}
        for one in found:
            outcomes.update(one)
        return outcomes

    async def _collect_one(
        self, client: openai.AsyncOpenAI, job: Job, todo: dict[str, ChatRequest]
    ) -> dict[str, Outcome]:
        wanted = [todo[request_id] for request_id in job.request_ids if request_id in todo]
        if job.runner == "vllm":
            return await self._collect_local(job, wanted)
        if job.batch_id is None:  # uploaded, then killed before the batch was recorded
            job.batch_id = await self._find_batch(client, job)
            if job.batch_id is None:
                return {}  # never created: its requests are submitted afresh
            self.jobs.record(job, "submitted", batch_id=job.batch_id, found=True)
        batch = await self._wait(client, job, wanted)
        if isinstance(batch, dict):
            return batch  # polling gave up: failures, not resubmitted (the batch may still run)
        lines = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content, failure = await self._call(lambda f=file_id: client.files.content(f), "download batch results")
                if content is None:
                    return self._all_failed(wanted, failure, resubmit=False)
                lines += content.text.splitlines()
        return self._read_lines(lines, wanted, batch.status, batch)

    async def _find_batch(self, client: openai.AsyncOpenAI, job: Job) -> str | None:
        try:
            seen = 0
            async for batch in client.batches.list(limit=100):
                if batch.input_file_id == job.input_file_id:
                    return batch.id
                seen += 1
                if seen >= 1000:
                    break
        except (openai.OpenAIError, TimeoutError, ValueError, OSError) as exc:
            log.warning("could not list batches to find job %s: %r", job.key, exc)
        return None

    async def _wait(self, client: openai.AsyncOpenAI, job: Job, wanted: list[ChatRequest]) -> Any:
        """Poll until the batch ends; the batch, or failures for ``wanted`` when polling fails."""
        while True:
            batch, failure = await self._call(lambda: client.batches.retrieve(job.batch_id), "check the batch")
            if batch is None:
                return self._all_failed(wanted, failure, resubmit=False)
            if batch.status != job.status:
                job.status = batch.status
                counts = batch.request_counts.model_dump() if batch.request_counts else None
                self.jobs.record(job, "status", batch_id=job.batch_id, status=batch.status, request_counts=counts)
                log.info("batch %s: %s", job.batch_id, batch.status)
            if batch.status in ENDED:
                return batch
            await asyncio.sleep(self.options.poll_interval_s)

    def _all_failed(
        self, wanted: list[ChatRequest], failure: TeacherFailure | None, resubmit: bool
    ) -> dict[str, Outcome]:
        assert failure is not None
        return {r.id: Outcome(self.teacher.failed(r, failure, self.started), resubmit) for r in wanted}

    def _read_lines(
        self, lines: list[str], wanted: list[ChatRequest], status: str, batch: Any = None
    ) -> dict[str, Outcome]:
        """Match output and error lines to the wanted requests by ``custom_id``."""
        by_id = {r.id: r for r in wanted}
        outcomes: dict[str, Outcome] = {}
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("unreadable batch result line: %r", line[:200])
                continue
            request = by_id.get(row.get("custom_id"))
            if request is None:
                continue
            outcomes[request.id] = self._outcome(request, row, line)
            outcomes[request.id].ended = True
        for request in wanted:  # not in either file
            if request.id not in outcomes:
                outcomes[request.id] = Outcome(
                    self.teacher.failed(request, self._missing(status, batch), self.started), True, ended=True
                )
        return outcomes

    def _outcome(self, request: ChatRequest, row: dict[str, Any], line: str) -> Outcome:
        raw = self.teacher._redact(line)
        response = row.get("response") or {}
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict) and not row.get("error"):
            from openai.types.chat import ChatCompletion

            try:
                return Outcome(self.teacher._result(request, ChatCompletion.construct(**body), self.started))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                failure = TeacherFailure(kind="server_error", message=f"unreadable batch answer: {exc!r}", raw=raw)
                return Outcome(self.teacher.failed(request, failure, self.started), True)
        error = row.get("error") or {}
        code = error.get("code") if isinstance(error, dict) else None
        message = (error.get("message") if isinstance(error, dict) else None) or str(error or body)[:300]
        if code == "batch_expired":
            failure = TeacherFailure(
                kind="timeout",
                message=f"the batch expired before this request was answered ({self.options.completion_window})",
                raw=raw,
            )
        elif code == "batch_cancelled":
            failure = TeacherFailure(kind="cancelled", message="the batch was cancelled before this request", raw=raw)
        elif isinstance(status, int) and status >= 400:
            failure = self._status_failure(status, message, raw)
        else:
            failure = TeacherFailure(kind="server_error", message=f"batch item failed: {message}", raw=raw)
        return Outcome(self.teacher.failed(request, failure, self.started), failure.kind in RETRYABLE_KINDS)

    def _status_failure(self, status: int, message: str, raw: str) -> TeacherFailure:
        """A per-item HTTP status, classified as the same status would be online."""
        from distill_plugins.openai_teacher import RETRYABLE_STATUS

        if status in RETRYABLE_STATUS:
            kind = "rate_limited" if status == 429 else "server_error"
            return TeacherFailure(
                kind=kind, status_code=status, raw=raw, message=f"HTTP {status} in the batch: {message}"
            )
        kind = {401: "auth", 403: "auth", 404: "not_found"}.get(status, "bad_request")
        return TeacherFailure(
            kind=kind,  # type: ignore[arg-type]
            status_code=status,
            raw=raw,
            fatal=True,
            message=f"the server refused a batch request (HTTP {status}): {message[:300]}",
        )

    def _missing(self, status: str, batch: Any) -> TeacherFailure:
        """The failure of a request that is in neither result file."""
        if status == "expired":
            return TeacherFailure(kind="timeout", message=f"the batch expired ({self.options.completion_window})")
        if status == "cancelled":
            return TeacherFailure(kind="cancelled", message="the batch was cancelled")
        if status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            text = "; ".join(f"{e.code}: {e.message}" for e in errors if e is not None)[:500] or "no reason given"
            return TeacherFailure(
                kind="bad_request", message=f"the batch failed: {text}", raw=json.dumps([str(e) for e in errors])
            )
        return TeacherFailure(kind="server_error", message=f"the batch ended ({status}) without this request's result")

    # vLLM's offline batch runner ----------------------------------------------------------------

    async def _collect_local(self, job: Job, wanted: list[ChatRequest]) -> dict[str, Outcome]:
        """Run the job's input file with ``vllm run-batch`` (unless a complete output is there)."""
        assert job.input_path is not None and job.output_path is not None
        output = Path(job.output_path)
        ids = {r.id for r in wanted}
        if not (output.is_file() and ids <= _custom_ids(output)):
            failure = await self._run_vllm(Path(job.input_path), output)
            if failure is not None:
                return self._all_failed(wanted, failure, resubmit=False)
            self.jobs.record(job, "status", status="completed")
        return self._read_lines(output.read_text(encoding="utf-8").splitlines(), wanted, "completed")

    async def _run_vllm(self, input_path: Path, output_path: Path) -> TeacherFailure | None:
        from distill.models import resolve_model
        from distill.paths import ENGINE_LOG_ENV
        from distill.watchdog import EngineWatchdog

        module = "vllm.entrypoints.launchers.run_batch"
        if importlib.util.find_spec("vllm") is None:
            return TeacherFailure(kind="engine", fatal=True, message="batch_runner: vllm needs vLLM installed")
        if importlib.util.find_spec(module) is None:  # older vLLM releases
            module = "vllm.entrypoints.openai.run_batch"
        partial = output_path.with_name(output_path.name + ".partial")
        command = [
            sys.executable,
            "-m",
            module,
            "-i",
            str(input_path),
            "-o",
            str(partial),
            "--model",
            resolve_model(self.teacher.model),
            "--served-model-name",
            self.teacher.model,
            *self.options.vllm_args,
        ]
        engine_log = os.environ.get(ENGINE_LOG_ENV)
        sink = None
        if engine_log:
            Path(engine_log).parent.mkdir(parents=True, exist_ok=True)
            sink = open(engine_log, "ab")  # noqa: SIM115 - closed below, after the process ends
        watchdog = EngineWatchdog()  # the runner and its engine die with distill, even on SIGKILL
        try:
            with watchdog.marking():
                process = await asyncio.create_subprocess_exec(*command, stdout=sink, stderr=sink)
            code = await process.wait()
        finally:
            watchdog.stop()
            if sink is not None:
                sink.close()
        if code != 0 or not partial.is_file():
            where = f" (its log: {engine_log})" if engine_log else ""
            return TeacherFailure(
                kind="engine", fatal=True, message=f"vLLM's batch runner exited with code {code}{where}"
            )
        os.replace(partial, output_path)
        return None


def _custom_ids(path: Path) -> set[str]:
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ids.add(json.loads(line)["custom_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids

"""Where teachers run: in this process (``executor: local``), or as replicas on a Ray cluster
(``executor: ray``), each replica a Ray actor that owns one teacher (a vLLM engine on its GPUs, a
transformers model or an OpenAI-compatible client).

The executor sits *under* the answer log, not beside it: ``load_teacher(teacher_config, config)``
returns a ``RayTeacher``, a Teacher like any other, and ``AnswerSource`` on the driver stays the one
writer of the answer log and the request cache. So the guarantees of a local run hold unchanged:
answers already logged or cached are never sent, new ones are appended per batch before they are
used, a SIGKILLed driver resumes from its log. And because the driver builds every request (ids,
seeds, prompts) exactly as a local run does and gets one result per request back in order, the
rows are the same, wherever a request's answer depends only on the request: an API or server
(greedy or seeded), the transformers teacher (a request's answer also depends on the batch it is
in: chunks are whole batches of its ``batch_size``, so each replica computes the batches a local
run would). An in-process vLLM engine batches continuously; vLLM does not promise that a batch's
composition never moves a float, so with ``vllm`` replicas rows can differ in rare near-ties.

Why actors and not Ray Data's ``map_batches`` (or ``ray.data.llm``'s vLLM processor): a
self-instruct round is one small batch whose next round depends on what the driver kept, and
judge/eval are a few hundred batches; an executed Dataset builds its actor pool anew, which for a
vLLM replica means loading the model again (minutes for a 70B) every round. Long-lived actors load
once per stage (once per `distill run` for the shared teacher), work for every backend and plugin
(``ray.data.llm`` is vLLM-only), and keep retries ours: a replica that dies is restarted by Ray
(``max_restarts``) while the requests it held go to the next free replica.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from distill.errors import ConfigError, DistillError, TeacherError
from distill.paths import ENGINE_LOG_ENV
from distill.records import ChatRequest, ChatResult
from distill.teacher import Teacher
from distill.teacher import load_teacher as load_local_teacher

if TYPE_CHECKING:
    from distill.config import DistillConfig, RayConfig

log = logging.getLogger(__name__)

RAY_MISSING = "executor: ray needs Ray: pip install 'distill[ray]' (on every node of the cluster)"


def load_teacher(teacher_config: Any, config: DistillConfig | None = None) -> Teacher:
    """The teacher a ``TeacherConfig`` names, where ``config.executor`` says it runs (None or
    ``local``: in this process). Under a multi-process launch (torchrun / accelerate, e.g. RL
    rewards) the teacher stays in each process: one Ray fleet per rank would multiply replicas."""
    if config is None or config.executor != "ray" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return load_local_teacher(teacher_config)
    return RayTeacher.start(teacher_config, config.ray)


class RayTeacher(Teacher):
    """``ray.num_replicas`` copies of one teacher, each a Ray actor; a batch is cut into contiguous
    chunks handed to whichever replica is free; results come back in request order.

    It is made per wrapped class (``RayTeacher.start``): the class actually used derives from both
    this one and the wrapped teacher's class, so everything decided by the class — ``name``,
    ``cache_identity`` (the request-cache key: local and Ray runs share the cache), prices, speed-only
    options, capabilities — is the wrapped teacher's; only the work (``generate``, its chunks and
    retries) and the lifecycle are this class's own. Not registered as a backend: users pick it
    with ``executor: ray``."""

    def __init__(self, model: str, options: BaseModel, settings: RayConfig, wrapped: type[Teacher]):
        Teacher.__init__(self, model, options)  # not super(): the next class is the wrapped one, which loads a model
        self.settings = settings
        self.wrapped = wrapped
        self.replicas: list[Any] = []
        self.session: RaySession | None = None
        self.retried_chunks = 0  # chunks re-sent after their replica died (tests and logs read it)
        inner_batch = getattr(options, "batch_size", None)
        # A backend that batches inside generate (transformers) answers a request the same only in
        # the same batch: chunks are whole multiples of its batch size, so a replica sees the
        # batches a local run would.
        self.alignment = inner_batch if isinstance(inner_batch, int) and inner_batch > 0 else 1

    @classmethod
    def start(cls, teacher_config: Any, settings: RayConfig) -> RayTeacher:
        """Start ``settings.num_replicas`` replicas of the teacher ``teacher_config`` names and wait
        until every one has loaded it (an error in one stops them all, with its message)."""
        from distill.plugins import get_teachers

        teachers = get_teachers()
        wrapped = teachers[teacher_config.backend]
        options = teachers.options(teacher_config.backend, teacher_config.options)
        bulk = getattr(wrapped, "bulk_submission", None)
        if callable(bulk) and bulk(options):
            raise ConfigError(["executor: a provider batch job needs no Ray replicas; use executor: local"])
        teacher = _ray_class(wrapped)(teacher_config.model, options, settings, wrapped)
        try:
            teacher._launch()
        except BaseException:
            teacher.close()
            raise
        return teacher

    def _launch(self) -> None:
        import ray

        self.session = RaySession.acquire(self.settings)
        n = self.settings.num_replicas
        # Shared budgets (one API key's rate limit) are split between the replicas by the backend.
        replica_options = self.wrapped.replica_options(self.options, n)
        actor = ray.remote(Replica).options(
            max_restarts=self.settings.max_restarts,
            max_task_retries=0,  # at most once per call: a chunk whose replica died is re-sent by us, elsewhere
            max_concurrency=1,
            **ray_resources(self.settings.resources_per_replica),
        )
        self.replicas = [actor.remote(self.wrapped, self.model, replica_options) for _ in range(n)]
        try:
            infos = ray.get([replica.ready.remote() for replica in self.replicas])
        except ray.exceptions.RayError as exc:
            name = self.wrapped.name
            raise TeacherError(f"a Ray replica of the {name} teacher did not start: {_cause(exc)}") from None
        # Capabilities a backend decides per instance (from its options) come from a loaded replica.
        self.supports_response_format = infos[0]["supports_response_format"]  # type: ignore[misc]
        self.supports_logprobs = infos[0]["supports_logprobs"]  # type: ignore[misc]
        hosts = sorted({info["host"] for info in infos})
        log.info("%d %s replicas ready on %s", n, self.wrapped.name, ", ".join(hosts))

    def chunks(self, count: int) -> list[tuple[int, int]]:
        """Contiguous ``(start, end)`` slices of a batch of ``count`` requests, one per call."""
        size = self.settings.chunk_size or math.ceil(count / max(len(self.replicas), 1))
        size = math.ceil(size / self.alignment) * self.alignment
        return [(start, min(start + size, count)) for start in range(0, count, size)]

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer every request, in order. A replica that dies mid-chunk: the chunk goes back to the
        front of the queue for the next free replica, and the dead one is probed until Ray has
        restarted it (or dropped when its restarts are spent). Errors raised inside a replica's
        teacher (not per-request failures, which come back as results) are raised here."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        if not requests:
            return []
        results: list[ChatResult | None] = [None] * len(requests)
        queue = deque(self.chunks(len(requests)))
        idle = deque(index for index, replica in enumerate(self.replicas) if replica is not None)
        cooling: list[tuple[float, int]] = []  # (when to probe again, replica) for restarting replicas
        running: dict[Any, tuple[int, tuple[int, int] | None]] = {}  # ref -> (replica, chunk; None: a probe)
        failures = 0
        limit = (self.settings.max_restarts + 1) * len(self.replicas) + 1
        while queue or any(chunk is not None for _, chunk in running.values()):
            now = time.monotonic()
            for when, index in [c for c in cooling if c[0] <= now]:
                cooling.remove((when, index))
                running[self.replicas[index].ready.remote()] = (index, None)
            while queue and idle:
                index, chunk = idle.popleft(), queue.popleft()
                start, end = chunk
                running[self.replicas[index].generate.remote(requests[start:end])] = (index, chunk)
            if not running and not cooling:
                raise TeacherError(f"every Ray replica of the {self.wrapped.name} teacher died; see the log above")
            timeout = max(min(c[0] for c in cooling) - now, 0.0) if cooling else None
            if not running:  # only restarting replicas: wait for the next probe
                time.sleep(timeout or 0.0)
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
            for ref in done:
                index, chunk = running.pop(ref)
                try:
                    value = ray.get(ref)
                except RayTaskError as exc:  # the teacher itself raised (an engine that died, a bug)
                    if isinstance(exc.cause, DistillError):
                        raise exc.cause from None  # its own one-line message, not Ray's traceback
                    raise
                except RayActorError as exc:
                    if chunk is not None:
                        failures += 1
                        self.retried_chunks += 1
                        if failures > limit:
                            raise TeacherError(
                                f"Ray replicas died {failures} times in one batch ({_cause(exc)}); giving up"
                            ) from None
                        queue.appendleft(chunk)  # before the rest: its requests were asked first
                        log.warning("a %s replica died mid-chunk (%s); its requests go to another", self.name, exc)
                    if isinstance(exc, ActorDiedError):  # restarts spent: it is gone for good
                        self.replicas[index] = None
                    else:  # restarting: ask again in a moment
                        cooling.append((time.monotonic() + 0.5, index))
                    continue
                if chunk is not None:
                    start, end = chunk
                    for position, result in enumerate(value, start):
                        if result.request_id != requests[position].id:
                            raise TeacherError(f"a Ray replica answered request {result.request_id} out of order")
                        results[position] = result
                idle.append(index)
        missing = [requests[i].id for i, result in enumerate(results) if result is None]
        if missing:  # cannot happen: every chunk is re-queued until answered or the batch fails
            raise TeacherError(f"no answer for {len(missing)} requests from the Ray replicas")
        return results  # type: ignore[return-value]

    def generate_resumable(self, requests: list[ChatRequest], jobs: Any = None) -> list[ChatResult]:
        """Replicas answer at once: no provider jobs to resume."""
        return self.generate(requests)

    def close(self) -> None:
        """Stop the replicas (each closes its teacher), then Ray if this teacher started it."""
        if self.replicas:
            import ray

            live = [replica for replica in self.replicas if replica is not None]
            try:
                ray.get([replica.close.remote() for replica in live], timeout=60)
            except ray.exceptions.RayError as exc:  # one restarting after a crash: killed below all the same
                log.info("closing the Ray replicas: %s", exc)
            for replica in live:
                ray.kill(replica, no_restart=True)
            self.replicas = []
        if self.session is not None:
            self.session.release()
            self.session = None


@functools.cache
def _ray_class(wrapped: type[Teacher]) -> type[RayTeacher]:
    """The RayTeacher class for one wrapped class: RayTeacher's methods first, then the wrapped
    class's class-level behaviour (see RayTeacher)."""
    return type(f"Ray{wrapped.__name__}", (RayTeacher, wrapped), {"__doc__": RayTeacher.__doc__})


class Replica:
    """One replica: a Ray actor owning one teacher for its whole life (restarted by Ray, teacher
    included, if its process dies)."""

    def __init__(self, wrapped: type[Teacher], model: str, options: BaseModel):
        import socket

        self.teacher = wrapped(model=model, options=options)
        self.host = socket.gethostname()

    def ready(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": os.getpid(),
            "supports_response_format": self.teacher.supports_response_format,
            "supports_logprobs": self.teacher.supports_logprobs,
        }

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return self.teacher.generate(requests)

    def close(self) -> None:
        self.teacher.close()


def ray_resources(resources: dict[str, float]) -> dict[str, Any]:
    """``ray.resources_per_replica`` as actor options: CPU, GPU and memory (bytes) by their own
    keywords, anything else as a custom resource."""
    wanted = dict(resources)
    options: dict[str, Any] = {}
    if "CPU" in wanted:
        options["num_cpus"] = wanted.pop("CPU")
    if "GPU" in wanted:
        options["num_gpus"] = wanted.pop("GPU")
    if "memory" in wanted:
        options["memory"] = wanted.pop("memory")
    if wanted:
        options["resources"] = wanted
    return options


class RaySession:
    """This process's connection to Ray, shared by every RayTeacher alive in it. The first one
    connects (``ray.address``, else ``$RAY_ADDRESS``, else a new local Ray on this machine, listening
    on 127.0.0.1 only); the last one to close disconnects, and stops the local Ray if it started it.
    A local Ray's processes carry a watchdog's mark, so they die with distill even after a SIGKILL
    (Ray's own fate-sharing leaves agents behind). A Ray set up by someone else (a notebook, a test
    fixture) is used as is and never stopped."""

    _current: RaySession | None = None
    _lock = threading.Lock()

    def __init__(self, started: bool, watchdog: Any):
        self.started = started
        self.watchdog = watchdog
        self.users = 0

    @classmethod
    def acquire(cls, settings: RayConfig) -> RaySession:
        try:
            import ray
        except ImportError:
            raise ConfigError([RAY_MISSING]) from None
        with cls._lock:
            if cls._current is None:
                cls._current = cls._connect(ray, settings)
            cls._current.users += 1
            return cls._current

    @classmethod
    def _connect(cls, ray: Any, settings: RayConfig) -> RaySession:
        if ray.is_initialized():
            return cls(started=False, watchdog=None)
        verbose = logging.getLogger("distill").getEffectiveLevel() <= logging.INFO
        quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
        address = settings.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **quiet)
            return cls(started=False, watchdog=None)
        from distill.watchdog import EngineWatchdog

        watchdog = EngineWatchdog()
        try:
            # GCS, raylet, agents and every worker carry the mark; unless -v, what Ray and the
            # processes it starts print goes to the run's engine log, not the terminal.
            with watchdog.marking(), _output_to(None if verbose else os.environ.get(ENGINE_LOG_ENV)):
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        except BaseException:
            watchdog.stop()
            raise
        return cls(started=True, watchdog=watchdog)

    def release(self) -> None:
        with RaySession._lock:
            self.users -= 1
            if self.users > 0:
                return
            RaySession._current = None
            if self.started:
                import ray

                ray.shutdown()
                self.watchdog.stop()


@contextmanager
def _output_to(path: str | None) -> Iterator[None]:
    """File descriptors 1 and 2 (so C++ processes started meanwhile too) point at ``path`` for the
    block; None: left alone. (The vllm teacher does the same around its engine start.)"""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong inside a replica, without Ray's traceback framing."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__

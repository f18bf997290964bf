"""The records that cross stage and plugin boundaries. Stages exchange these as JSONL rows."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Record(BaseModel):
    # -inf is a real logprob (a token constrained decoding rules out): JSON keeps it as -Infinity,
    # which reads back, instead of pydantic's default null, which does not.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


def user_prompt(instruction: str, input: str = "") -> str:
    """The user turn of an Alpaca-style task: the instruction, then its input after a blank line."""
    return instruction + (f"\n\n{input}" if input else "")


class Message(Record):
    role: Role = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(description="The text of the message.")


class ChatRequest(Record):
    """One chat completion request. ``id`` is stable: the same content gives the same id."""

    id: str = Field("", description="Stable request id; filled from the content when empty.")
    messages: list[Message] = Field(min_length=1, description="The conversation to continue.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="Most new tokens per completion.")
    n: int = Field(1, ge=1, description="Completions to sample for this request.")
    seed: int | None = Field(None, description="Sampling seed, where the backend honours one.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion.")
    response_format: dict[str, Any] | None = Field(
        None, description="A JSON schema the answer must follow (backends that support it)."
    )
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Also return this many alternatives per token.")
    prompt_logprobs: int = Field(
        0,
        ge=0,
        le=20,
        description="Score the conversation instead of continuing it: the logprob of every token of the "
        "rendered messages (a final assistant turn included, closed as in training) with this many "
        "alternatives, token ids included (backends with supports_prompt_logprobs).",
    )

    def model_post_init(self, __context: Any) -> None:
        if not self.id:
            self.id = self.content_hash()

    def content_hash(self) -> str:
        """A hash of everything that changes the answer (not the id itself)."""
        payload = self.model_dump(exclude={"id"})
        if not payload["prompt_logprobs"]:  # added later: requests without it keep their old hashes
            del payload["prompt_logprobs"]
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class TokenLogprob(Record):
    token: str = Field(description="The generated token's text.")
    logprob: float = Field(description="Its natural-log probability.")
    top: dict[str, float] = Field(default_factory=dict, description="Alternatives: token text → logprob.")
    id: int | None = Field(None, description="The token's id, from backends that know it (vllm, transformers).")
    top_ids: dict[int, float] | None = Field(
        None, description="Alternatives by token id → logprob (texts can collide; ids can't), where known."
    )


class Usage(Record):
    prompt_tokens: int = Field(0, description="Tokens in the prompt.")
    completion_tokens: int = Field(0, description="Tokens generated, over all completions.")
    cached_tokens: int = Field(
        0, description="Of the prompt tokens, those the provider served from its prompt cache (billed lower)."
    )


ErrorKind = Literal[
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "bad_request",
    "auth",
    "not_found",
    "unsupported",
    "engine",
    "cancelled",
]


class TeacherFailure(Record):
    """Why a request produced no completion. Kept with the raw text so nothing is lost silently."""

    kind: ErrorKind = Field(description="Category of the failure.")
    message: str = Field(description="What went wrong and, where known, what to do.")
    status_code: int | None = Field(None, description="HTTP status, for HTTP backends.")
    raw: str | None = Field(None, description="Raw response body or exception text.")
    attempts: int = Field(1, description="How many times the request was tried.")
    fatal: bool = Field(False, description="True when retrying or continuing cannot help (fix config).")


class ChatResult(Record):
    """The answer to one ChatRequest: texts, or a failure; never both empty without a reason."""

    request_id: str = Field(description="The id of the request this answers.")
    backend: str = Field(description="Teacher backend that produced it.")
    model: str = Field(description="Model name as the backend knows it.")
    texts: list[str] = Field(default_factory=list, description="One text per completion (n).")
    finish_reasons: list[str] = Field(default_factory=list, description="'stop' or 'length' per completion.")
    logprobs: list[list[TokenLogprob]] | None = Field(None, description="Per completion, per token.")
    prompt_token_ids: list[int] | None = Field(None, description="The rendered prompt's token ids (scoring).")
    prompt_logprobs: list[TokenLogprob | None] | None = Field(
        None, description="Scoring (ChatRequest.prompt_logprobs): per prompt token (None for the first)."
    )
    usage: Usage = Field(default_factory=Usage, description="Token counts.")
    latency_s: float = Field(0.0, description="Wall time from send to answer, retries included.")
    error: TeacherFailure | None = Field(None, description="Set when no completion was produced.")
    created: str | None = Field(None, description="When the answer arrived (UTC, ISO 8601); kept on replay.")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """The first completion; raises if the request failed (check ``ok`` first)."""
        if self.error is not None:
            raise ValueError(f"request {self.request_id} failed: {self.error.message}")
        return self.texts[0]


class Provenance(Record):
    """Where a generated row came from."""

    backend: str = Field(description="Teacher backend.")
    model: str = Field(description="Teacher model.")
    temperature: float = Field(description="Sampling temperature of the request.")
    top_p: float = Field(description="Nucleus sampling mass of the request.")
    max_tokens: int = Field(description="Token limit of the request.")
    seed: int | None = Field(description="Per-request sampling seed, if any.")
    template_sha256: str = Field(description="Hash of the prompt template text.")
    seed_ids: list[str] = Field(description="Ids of the example tasks shown in the request.")
    request_id: str = Field(description="Stable id of the teacher request.")
    item_index: int = Field(description="Position of this task in the teacher's reply.")
    created: str = Field(description="When the teacher answered (UTC, ISO 8601).")
    usage: Usage = Field(description="Token usage of the whole request.")


class SimilarInstruction(Record):
    instruction: str = Field(description="A kept instruction.")
    rouge_l: float = Field(description="Its ROUGE-L F with this row's instruction.")


class Instruction(Record):
    """One generated Alpaca-style task, with chat messages for training and its provenance."""

    id: str = Field(description="Stable id: request id + position in the reply.")
    instruction: str = Field(min_length=1, description="What the user asks.")
    input: str = Field("", description="Optional context for the instruction.")
    output: str = Field(min_length=1, description="The teacher's answer.")
    category: str | None = Field(None, description="Task category, when known.")
    messages: list[Message] = Field(description="The task as a chat: user (instruction + input), assistant (output).")
    most_similar_instructions: list[SimilarInstruction] = Field(
        default_factory=list, description="Kept instructions within reach of the ROUGE-L threshold, best first."
    )
    max_rouge_l: float = Field(0.0, description="Highest ROUGE-L F against a kept instruction (0 if none near).")
    provenance: Provenance = Field(description="Where this row came from.")
    judge_reward: float | None = Field(
        None, description="Reward of generate.judge, when generation filters by a judge."
    )


class JudgeItem(Record):
    """What a judge looks at: a prompt and a response (and a second response for A-vs-B judges)."""

    id: str = Field(description="Row id in the judged dataset.")
    prompt: str = Field(description="The request the response answers.")
    response: str = Field(description="The response judged (response A for pairwise judges).")
    response_b: str | None = Field(None, description="Response B, for pairwise judges.")


class Judgement(Record):
    """A judge's verdict on one item. ``valid`` is False when no verdict could be read: then
    ``reward`` is None (never a default) and ``raw`` keeps what the judge said."""

    item_id: str = Field(description="The JudgeItem's id.")
    judge: str = Field(description="Judge label (from the config; default 'type:rubric').")
    judge_type: str = Field(description="Judge plugin name.")
    rubric: str | None = Field(description="Rubric name, for rubric-based judges.")
    verdict: str | None = Field(description="Class id, score, or A / B / tie; None when invalid.")
    reward: float | None = Field(description="Reward of the verdict; None when invalid.")
    invalid_reason: str | None = Field(None, description="Why no verdict was read (not_json, no_answer_line, ...).")
    raw: list[str] = Field(default_factory=list, description="The judge's raw replies (or the error text).")
    samples: list[str | None] = Field(default_factory=list, description="Verdict of each sampled reply.")
    agreement: float | None = Field(None, description="Share of samples agreeing with the verdict (k > 1).")
    probabilities: dict[str, float] | None = Field(None, description="Class probabilities from logprobs.")
    position_consistent: bool | None = Field(None, description="Pairwise: same winner in both orders.")
    judge_model: str | None = Field(None, description="Model that judged (None for rule-based judges).")
    latency_s: float = Field(0.0, description="Judge wall time for this item.")

    @property
    def valid(self) -> bool:
        return self.verdict is not None

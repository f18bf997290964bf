"""The three built-in teachers on the bundled SmolLM2: the openai teacher against a real vLLM
server, the vllm teacher in process, the transformers teacher."""

from __future__ import annotations

import json
import math

import pytest

from distill.records import ChatRequest, Message

pytestmark = pytest.mark.slow

TEACHERS = ["openai_teacher", "vllm_teacher", "transformers_teacher"]


def ask(question: str, **settings: object) -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=question)], **settings)  # type: ignore[arg-type]


@pytest.fixture(params=TEACHERS)
def teacher(request: pytest.FixtureRequest) -> object:
    return request.getfixturevalue(request.param)


def test_greedy_answer_is_sensible_on_every_backend(teacher: object) -> None:
    requests = [
        ask("What is the capital of France?", max_tokens=24),
        ask("What is the capital of Japan?", max_tokens=24),
    ]
    results = teacher.generate(requests)  # type: ignore[attr-defined]
    assert [r.request_id for r in results] == [r.id for r in requests]
    assert all(r.ok for r in results), [r.error for r in results]
    assert "Paris" in results[0].text
    assert "Tokyo" in results[1].text
    for result in results:
        assert result.usage.prompt_tokens > 5
        assert 0 < result.usage.completion_tokens <= 24
        assert result.finish_reasons[0] in {"stop", "length"}
        assert result.latency_s > 0


def test_backends_agree_on_greedy_text(
    openai_teacher: object, vllm_teacher: object, transformers_teacher: object
) -> None:
    """Same model, same greedy prompt: the two vLLM paths (server and in-process) give the same
    text; transformers (another engine, same float32 weights) gives the same answer."""
    request = ask("What is the capital of France?", max_tokens=16)
    texts = [t.generate([request])[0].text for t in (openai_teacher, vllm_teacher, transformers_teacher)]
    assert texts[0] == texts[1]
    assert all("Paris" in text for text in texts), texts
    # The model's probability of its first answer token agrees across engines (both float32).
    scored = ask("What is the capital of France?", max_tokens=1, logprobs=True)
    first = [t.generate([scored])[0].logprobs[0][0] for t in (openai_teacher, transformers_teacher)]
    assert first[0].token == first[1].token
    assert abs(first[0].logprob - first[1].logprob) < 0.01


def test_max_tokens_truncation_is_reported(teacher: object) -> None:
    result = teacher.generate([ask("Write a long story about a dragon.", max_tokens=5)])[0]  # type: ignore[attr-defined]
    assert result.finish_reasons == ["length"]
    assert result.usage.completion_tokens == 5


def test_logprobs_are_probabilities_and_greedy_picks_the_top(teacher: object) -> None:
    result = teacher.generate([ask("What is 2+2?", max_tokens=6, logprobs=True, top_logprobs=3)])[0]  # type: ignore[attr-defined]
    assert result.ok, result.error
    tokens = result.logprobs[0]
    assert len(tokens) == result.usage.completion_tokens
    for token in tokens:
        assert token.logprob <= 1e-6
        assert len(token.top) == 3
        # Greedy decoding picks the most likely token: it is the best of the alternatives.
        assert token.logprob >= max(token.top.values()) - 0.05
        assert sum(math.exp(logprob) for logprob in token.top.values()) <= 1 + 1e-3


def test_n_samples_and_stop_strings(teacher: object) -> None:
    result = teacher.generate(
        [  # type: ignore[attr-defined]
            ask("Count from 1 to 10, separated by commas.", max_tokens=40, n=3, temperature=1.0, seed=None),
        ]
    )[0]
    assert result.ok and len(result.texts) == 3 and len(result.finish_reasons) == 3
    stopped = teacher.generate([ask("Count from 1 to 10, separated by commas.", max_tokens=40, stop=["5"])])[0]  # type: ignore[attr-defined]
    assert "5" not in stopped.text and "4" in stopped.text
    assert stopped.finish_reasons == ["stop"]


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("name", ["openai_teacher", "vllm_teacher"])
def test_json_schema_response_format(name: str, request: pytest.FixtureRequest) -> None:
    teacher = request.getfixturevalue(name)
    result = teacher.generate(
        [
            ask(
                "Give the capital of France as JSON with keys city and country.", max_tokens=60, response_format=SCHEMA
            ),
        ]
    )[0]
    assert result.ok, result.error
    answer = json.loads(result.text)
    assert set(answer) == {"city", "country"}
    assert all(isinstance(v, str) for v in answer.values())


def test_transformers_refuses_json_schema_with_a_structured_failure(transformers_teacher: object) -> None:
    results = transformers_teacher.generate(
        [  # type: ignore[attr-defined]
            ask("hi", max_tokens=4, response_format=SCHEMA),
            ask("What is the capital of France?", max_tokens=12),
        ]
    )
    assert results[0].error is not None and results[0].error.kind == "unsupported"
    assert results[0].texts == []
    assert "Paris" in results[1].text  # the rest of the batch is kept

"""The openai teacher's failure handling against the real vLLM server, with a fault-injecting
proxy in front for the faults the real server can't produce on demand (401, 429, 503, hangs)."""

from __future__ import annotations

import time

import pytest

from distill.config import TeacherConfig
from distill.errors import TeacherError
from distill.records import ChatRequest, Message
from distill.teacher import load_teacher, raise_on_fatal
from tests.conftest import SERVED_NAME
from tests.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.slow


def request(question: str = "What is the capital of France?", **settings: object) -> ChatRequest:
    settings.setdefault("max_tokens", 8)
    return ChatRequest(messages=[Message(role="user", content=question)], **settings)  # type: ignore[arg-type]


def teacher_via(base_url: str, model: str = SERVED_NAME, **options: object):
    config = TeacherConfig(
        backend="openai",
        model=model,
        options={"base_url": base_url, "api_key_env": None, "backoff_initial_s": 0.05, **options},
    )
    return load_teacher(config)


def test_unknown_model_fails_fast_naming_the_served_models(vllm_server: str) -> None:
    teacher = teacher_via(vllm_server, model="no-such-model")
    results = teacher.generate([request(), request("2+2?")])
    assert all(r.error is not None and r.error.fatal for r in results)
    assert results[0].error.attempts == 1  # type: ignore[union-attr]
    with pytest.raises(TeacherError, match=rf"no-such-model.*404.*{SERVED_NAME}"):
        raise_on_fatal(results)


def test_bad_request_fails_fast_with_the_server_message(vllm_server: str) -> None:
    # max_tokens beyond the server's 2048-token context: a real 400 from vLLM.
    result = teacher_via(vllm_server).generate([request(max_tokens=100_000)])[0]
    assert result.error is not None and result.error.kind == "bad_request" and result.error.fatal
    assert result.error.status_code == 400 and "2048" in result.error.message


def test_401_stops_after_one_attempt(fault_proxy: FaultProxy) -> None:
    fault_proxy.plan(Fault("status", 401, body='{"error": {"message": "Incorrect API key"}}'))
    results = teacher_via(fault_proxy.base_url, max_concurrency=1).generate([request(), request("2+2?")])
    assert len(fault_proxy.received) == 1  # the second request is never sent
    assert results[0].error.kind == "auth" and results[0].error.attempts == 1  # type: ignore[union-attr]
    assert results[1].error.kind == "cancelled" and results[1].error.fatal  # type: ignore[union-attr]


def test_429_and_503_are_retried_honouring_retry_after(fault_proxy: FaultProxy) -> None:
    fault_proxy.plan(
        Fault("status", 429, headers={"retry-after": "1"}),
        Fault("status", 503),
        Fault("reset"),
    )
    started = time.monotonic()
    result = teacher_via(fault_proxy.base_url).generate([request()])[0]
    assert result.ok and "Paris" in result.text
    times = [t for t, _ in fault_proxy.received]
    assert len(times) == 4  # three faults, then the real answer
    assert times[1] - times[0] >= 0.95  # retry-after: 1 was honoured
    assert time.monotonic() - started >= 1.0


def test_gives_up_after_max_retries_and_keeps_the_rest(fault_proxy: FaultProxy) -> None:
    fault_proxy.plan(*[Fault("status", 500)] * 3)
    teacher = teacher_via(fault_proxy.base_url, max_retries=2, max_concurrency=1)
    results = teacher.generate([request(), request("What is the capital of Japan?")])
    assert results[0].error is not None and results[0].error.kind == "server_error"
    assert results[0].error.attempts == 3 and not results[0].error.fatal
    assert results[0].error.raw and "injected fault" in results[0].error.raw
    assert results[1].ok and "Tokyo" in results[1].text


def test_hanging_server_times_out_and_is_retried(fault_proxy: FaultProxy) -> None:
    fault_proxy.plan(Fault("hang"))
    result = teacher_via(fault_proxy.base_url, timeout_s=5).generate([request()])[0]
    assert result.ok and "Paris" in result.text
    # The hung attempt timed out and was retried. (On a very loaded machine a real answer may
    # also exceed the timeout once more, so count at least two attempts rather than exactly.)
    assert len(fault_proxy.received) >= 2


def test_garbage_body_is_retried(fault_proxy: FaultProxy) -> None:
    fault_proxy.plan(Fault("garbage"))
    result = teacher_via(fault_proxy.base_url).generate([request()])[0]
    assert result.ok and "Paris" in result.text


def test_requests_per_minute_limit_holds_at_the_wire(fault_proxy: FaultProxy) -> None:
    fault_proxy.plan(Fault("status", 503))  # the retry counts against the limit too
    teacher = teacher_via(fault_proxy.base_url, requests_per_minute=120, max_concurrency=8)
    results = teacher.generate([request(f"What is {i}+{i}?") for i in range(4)])
    assert all(r.ok for r in results)
    times = sorted(t for t, _ in fault_proxy.received)
    assert len(times) == 5
    # 120/min = one request per 0.5 s. Judged on windows, not single gaps: the proxy stamps a
    # request when its handler runs, so on a busy machine one late stamp shortens the next gap
    # (seen: 0.86 s then 0.21 s) although the client paced both sends evenly.
    # A burst puts 3+ stamps in one window; even pacing never does, jitter of up to 0.1 s included.
    assert all(sum(start <= t < start + 0.9 for t in times) <= 2 for start in times), times
    assert times[-1] - times[0] >= 1.5, times  # 5 paced requests span 2 s (less a late first stamp)


def test_missing_api_key_is_a_clear_error(vllm_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    config = TeacherConfig(
        backend="openai", model=SERVED_NAME, options={"base_url": vllm_server, "api_key_env": "DISTILL_TEST_KEY"}
    )
    with pytest.raises(TeacherError, match="DISTILL_TEST_KEY is not set"):
        load_teacher(config)

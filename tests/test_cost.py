"""The cost ledger, the budget and the estimate, against a tiny local server in the OpenAI format
whose usage numbers are known (no model needed): every paid answer is in the ledger at the price
the plugin's table gives (cached input and the batch discount included), cache hits cost nothing,
a budget stops a run before the batch that could cross it and a rerun with a larger budget
finishes it with no duplicate or lost row, and the estimate's range holds the actual cost."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from distill.cli import cli
from distill.config import load_config
from distill.errors import DistillError
from distill.estimate import estimate
from distill.generate import run_generate
from distill.ledger import cost_lines, read_ledger
from distill.records import Usage
from tests.conftest import read_jsonl, run_distill

COMPLETION_TOKENS = 50
OVERHEAD_TOKENS = 10  # what a chat template adds to a prompt's characters / 4


@pytest.fixture()
def server() -> Iterator[dict[str, Any]]:
    """Answers each generate request with three new tasks; usage: prompt = characters / 4 +
    OVERHEAD_TOKENS, completion = COMPLETION_TOKENS, ``state["cached"]`` of the prompt cached.
    Records every request's first message in ``state["prompts"]``."""
    state: dict[str, Any] = {"prompts": [], "cached": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            prompt = body["messages"][0]["content"]
            with lock:
                state["prompts"].append(prompt)
                number = len(state["prompts"])
            words = [f"{number}x{i}{part}" for i in range(3) for part in "abc"]  # no two instructions alike
            tasks = [
                {"instruction": f"Describe {' and '.join(words[3 * i : 3 * i + 3])}.", "input": "", "output": "..."}
                for i in range(3)
            ]
            prompt_tokens = math.ceil(len(prompt) / 4) + OVERHEAD_TOKENS
            reply = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": json.dumps({"tasks": tasks})},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": COMPLETION_TOKENS,
                    "total_tokens": prompt_tokens + COMPLETION_TOKENS,
                    "prompt_tokens_details": {"cached_tokens": state["cached"]},
                },
            }
            payload = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()


def settings(server: dict[str, Any], run_dir: Path, prices: dict[str, float], *extra: str) -> list[str]:
    """``--set`` overrides: the openai teacher at the test server (model "m" at ``prices``), a
    generate run of 12 tasks from requests of 3 tasks, 2 requests a batch, replies ≤ 100 tokens."""
    teacher = {
        "backend": "openai",
        "model": "m",
        "options": {"base_url": server["url"], "api_key_env": None, "prices": {"m": prices} if prices else {}},
    }
    return [
        f"run_dir={run_dir}",
        f"teacher={json.dumps(teacher)}",
        "generate.target=12",
        "generate.tasks_per_request=3",
        "generate.batch_size=2",
        "generate.max_tokens=100",
        "generate.max_requests=8",
        *extra,
    ]


def as_flags(overrides: list[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


def test_cost_usd_prices_cached_input_and_the_batch_discount() -> None:
    from distill_plugins.openai_teacher import PRICES_FILE, OpenAIOptions, OpenAITeacher

    table = yaml.safe_load(PRICES_FILE.read_text())  # read here, not through the code under test
    price, discount = table["prices"]["gpt-4o-mini"], table["batch_discount"]
    assert discount == 0.5  # "Batch API: save 50% on inputs and outputs"
    usage = Usage(prompt_tokens=1_000_000, cached_tokens=400_000, completion_tokens=1_000_000)
    expected = 0.6 * price["input_per_million"] + 0.4 * price["cached_input_per_million"] + price["output_per_million"]
    online, batch = OpenAIOptions(), OpenAIOptions(mode="batch")
    assert OpenAITeacher.cost_usd("gpt-4o-mini", online, usage) == pytest.approx(expected)
    assert OpenAITeacher.cost_usd("gpt-4o-mini", batch, usage) == pytest.approx(expected * 0.5)
    assert OpenAITeacher.cost_usd("no-such-model", batch, usage) is None  # unknown: None, never $0
    local = OpenAIOptions(mode="batch", batch_runner="vllm")  # vLLM's runner on this machine bills nothing
    assert OpenAITeacher.cost_usd("no-such-model", local, usage) == 0.0
    # Without a cached-input price, cached tokens are billed as input.
    custom = OpenAIOptions(prices={"m": {"input_per_million": 2.0, "output_per_million": 4.0}})
    assert OpenAITeacher.cost_usd("m", custom, usage) == pytest.approx(2.0 + 4.0)


def test_every_paid_answer_is_in_the_ledger_and_cache_hits_cost_nothing(server: dict[str, Any], tmp_path: Path) -> None:
    server["cached"] = 20
    prices = {"input_per_million": 1000.0, "cached_input_per_million": 100.0, "output_per_million": 2000.0}
    first = run_generate(load_config(None, settings(server, tmp_path / "a", prices)))
    sent = len(server["prompts"])
    assert first["kept"] == 12 and sent == 4
    rows = read_ledger(tmp_path / "a" / "ledger.jsonl")
    assert (
        len(rows) == sent and {r["source"] for r in rows} == {"teacher"} and {r["stage"] for r in rows} == {"generate"}
    )
    expected = sum(
        ((math.ceil(len(p) / 4) + OVERHEAD_TOKENS - 20) * 1000.0 + 20 * 100.0 + COMPLETION_TOKENS * 2000.0) / 1e6
        for p in server["prompts"]
    )
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(expected)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["summary"]["cost"]["usd"] == pytest.approx(expected)
    assert manifest["summary"]["cost_usd"] == round(expected, 4)

    # The same run in a new directory: every answer from the request cache, nothing paid.
    second = run_generate(load_config(None, settings(server, tmp_path / "b", prices)))
    assert second["kept"] == 12 and len(server["prompts"]) == sent
    rows = read_ledger(tmp_path / "b" / "ledger.jsonl")
    assert len(rows) == sent and {r["source"] for r in rows} == {"cache"} and sum(r["cost_usd"] for r in rows) == 0
    assert second["cost"]["usd"] == 0 and second["cost"]["from_cache"] == sent

    result = CliRunner().invoke(cli, ["cost", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert f"${expected:.4f}" in result.output and "m (openai, online)" in result.output


def test_a_model_without_a_price_shows_its_tokens_never_0_and_a_budget_refuses_it(
    server: dict[str, Any], tmp_path: Path
) -> None:
    config = load_config(None, [*settings(server, tmp_path / "a", {}), "teacher.model=unpriced"])
    summary = run_generate(config)
    assert summary["cost_usd"] is None and summary["cost"]["usd"] is None
    assert all(r["cost_usd"] is None for r in read_ledger(tmp_path / "a" / "ledger.jsonl"))
    table = "\n".join(cost_lines(tmp_path / "a"))
    assert "price unknown" in table and "$0" not in table
    sent = len(server["prompts"])
    config = load_config(
        None, [*settings(server, tmp_path / "b", {}), "teacher.model=unpriced", "budget_usd=5", "generate.cache=false"]
    )
    with pytest.raises(DistillError, match="price of 'unpriced' is unknown"):
        run_generate(config)
    assert len(server["prompts"]) == sent  # refused before sending


def test_a_budget_stops_the_run_and_a_larger_one_finishes_it_without_duplicates(
    server: dict[str, Any], tmp_path: Path
) -> None:
    # Each request costs COMPLETION_TOKENS × $1000/M = $0.05 and could cost up to 100 × $1000/M =
    # $0.10 (prompts are free here): a batch of 2 is bounded by $0.20. With $0.25 the first batch
    # goes ($0.10 spent), the second could reach $0.30: the run stops before sending it.
    prices = {"input_per_million": 0.0, "output_per_million": 1000.0}
    run_dir = tmp_path / "run"
    stopped = run_distill(
        "generate", "--no-progress", "--force", *as_flags(settings(server, run_dir, prices, "budget_usd=0.25"))
    )
    assert stopped.returncode == 1, stopped.stderr
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stopped.stderr
    assert "spent $0.1000 of $0.2500" in errors[0] and "up to $0.2000" in errors[0] and "budget_usd" in errors[0]
    assert len(server["prompts"]) == 2 and len(read_jsonl(run_dir / "responses.jsonl")) == 2
    assert not (run_dir / "manifest.json").exists()  # not finished: resumable

    # A larger budget: the estimate (4 more requests ≤ $0.40, $0.10 spent) fits, no --force needed.
    resumed = run_distill("generate", "--no-progress", *as_flags(settings(server, run_dir, prices, "budget_usd=1")))
    assert resumed.returncode == 0, resumed.stderr
    rows = read_jsonl(run_dir / "instructions.jsonl")
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12  # none lost, none twice
    assert len(server["prompts"]) == 4 and len(set(server["prompts"])) == 4  # no request sent twice
    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert len(ledger) == 4 and sum(r["cost_usd"] for r in ledger) == pytest.approx(4 * 0.05)


def test_the_estimate_range_holds_the_actual_cost(server: dict[str, Any], tmp_path: Path) -> None:
    prices = {"input_per_million": 1000.0, "output_per_million": 2000.0}
    config = load_config(None, settings(server, tmp_path / "run", prices))
    found = estimate(config, ("generate",))
    [line] = found.lines
    assert (line.requests_low, line.requests_high) == (4, 8)  # ceil(12 / 3) to max_requests
    low, high = found.total(False), found.total(True)
    assert not (tmp_path / "run").exists() and server["prompts"] == []  # nothing written, nothing sent
    run_generate(config)
    actual = sum(r["cost_usd"] for r in read_ledger(tmp_path / "run" / "ledger.jsonl"))
    print(f"estimate ${low:.4f} – ${high:.4f}, actual ${actual:.4f} ({len(server['prompts'])} requests)")
    assert low is not None and high is not None and low <= actual <= high


def test_dry_run_prints_the_estimate_and_a_budget_below_it_refuses_to_start(
    server: dict[str, Any], tmp_path: Path
) -> None:
    prices = {"input_per_million": 1.0, "output_per_million": 2.0}
    run_dir = tmp_path / "run"
    dry = CliRunner().invoke(cli, ["generate", "--dry-run", *as_flags(settings(server, run_dir, prices))])
    assert dry.exit_code == 0, dry.output
    assert "generate" in dry.output and "m (openai, online)" in dry.output and "4–8" in dry.output
    refused = CliRunner().invoke(cli, ["generate", *as_flags(settings(server, run_dir, prices, "budget_usd=0.0001"))])
    assert refused.exit_code == 1 and "exceeds budget_usd $0.0001" in refused.output
    assert server["prompts"] == [] and not run_dir.exists()  # nothing sent, nothing written

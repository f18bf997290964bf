"""`distill generate`: parsing, filters, the judge filter with dedup, end to end on the in-process
engine, and the request cache. (Dedup itself: tests/test_dedup.py; faults, kills and full disks:
tests/reliability/.)"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from distill.config import FilterConfig, load_config
from distill.errors import ConfigError
from distill.generate import load_seed_tasks, parse_reply, rejection_reason, run_generate
from tests.conftest import check_generate_run, openai_generate_args, read_jsonl, run_distill
from tests.fault_proxy import FaultProxy

# Parsing and filters ---------------------------------------------------------------------------


def test_parse_json_and_text_replies() -> None:
    tasks, problems = parse_reply(
        '{"tasks": [{"instruction": "Name a fruit.", "input": "", "output": "Apple"}, 3]}', "json"
    )
    assert tasks == [{"instruction": "Name a fruit.", "input": "", "output": "Apple"}]
    assert len(problems) == 1 and problems[0].startswith("task 1:")
    assert parse_reply('```json\n{"tasks": []}\n```', "json") == ([], [])
    assert parse_reply("Sure! Here you go", "json")[1][0].startswith("reply is not JSON")
    text = (
        "Task 4\nInstruction: Add the numbers.\nInput: 2, 3\nOutput: 5\n\n"
        "**Task 5**\nInstruction: Name a colour.\nOutput: Blue\n\nTask 6\nnothing here"
    )
    tasks, problems = parse_reply(text, "text")
    assert tasks == [
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ]
    assert len(problems) == 1 and "block 2" in problems[0]


@pytest.mark.parametrize(
    ("instruction", "output", "truncated", "reason"),
    [
        ("Add numbers.", "5", False, "too_short"),
        ("Describe the picture in detail please.", "It shows...", False, "blocklist:picture"),
        ("Plot the data as a chart now.", "...", False, "blocklist:plot"),
        ("Go to the website and read it.", "...", False, "blocklist:go to"),
        ("- List three colours you like.", "Red", False, "starts_with_punctuation"),
        ("¿Cuál es la capital de Francia?", "París", False, "starts_with_non_ascii"),
        ("Name three primary colours please.", "   ", False, "empty_output"),
        ("Name three primary colours please.", "Red, blue", True, "truncated"),
        ("Name three primary colours please.", "Red, blue, yellow", False, None),
        ("Explain how a mapping function works.", "It maps.", False, None),  # "map" is a whole word only
    ],
)
def test_filters(instruction: str, output: str, truncated: bool, reason: str | None) -> None:
    task = {"instruction": instruction, "input": "", "output": output}
    assert rejection_reason(task, FilterConfig(), truncated) == reason


def test_bad_seed_files_fail_before_any_request(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="has no tasks"):
        load_seed_tasks(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_seed_tasks(latin)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": ""}\nnot json\n')
    with pytest.raises(ConfigError) as caught:
        load_seed_tasks(broken)
    assert caught.value.problems == [
        f"{broken} line 2: 'instruction' must be a non-empty string",
        f"{broken} line 2: 'output' must be a non-empty string",
        f"{broken} line 3: not JSON (Expecting value)",
    ]
    result = run_distill("generate", "--run-dir", str(tmp_path / "run"), "--set", f"generate.seed_file={broken}")
    assert result.returncode == 2 and "line 3: not JSON" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bundled_seed_tasks_are_valid_and_varied() -> None:
    seeds = load_seed_tasks(None)
    assert len(seeds) >= 40
    assert len({s["category"] for s in seeds}) >= 10
    assert len({s["id"] for s in seeds}) == len(seeds)


# End to end ------------------------------------------------------------------------------------


def test_a_task_the_judge_rejects_never_blocks_a_later_near_duplicate(scripted: dict[str, Any], tmp_path: Path) -> None:
    """With generate.judge, only kept instructions join the dedup index: a near-duplicate of a task
    the judge rejected is judged on its own merits."""
    rejected = {"instruction": "Describe the water cycle in three short sentences for kids.", "output": "BAD"}
    twin = {"instruction": "Describe the water cycle in three short sentences for children.", "output": "Rain."}
    other = {"instruction": "Name two mammals that live in the sea.", "output": "Whales and seals."}
    replies = iter([[rejected, other], [twin]])
    scripted["two-replies"] = lambda request, k: json.dumps({"tasks": [dict(t, input="") for t in next(replies)]})
    scripted["judge-bad"] = lambda request, k: json.dumps(
        {"class": "C" if "BAD" in request.messages[-1].content else "A"}
    )
    judge_teacher = {"backend": "scripted", "model": "judge", "options": {"script": "judge-bad"}}
    config = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "teacher.backend=scripted",
            "teacher.options={script: two-replies}",
            f"judge.teacher={json.dumps(judge_teacher)}",
            "generate.judge=helpfulness",
            "generate.min_reward=0.5",
            "generate.target=2",
            "generate.batch_size=1",
        ],
    )
    summary = run_generate(config)
    kept = [row["instruction"] for row in read_jsonl(tmp_path / "run" / "instructions.jsonl")]
    assert kept == [other["instruction"], twin["instruction"]]
    assert summary["rejected"] == {"low_reward": 1}
    [row] = read_jsonl(tmp_path / "run" / "rejected.jsonl")
    assert row["instruction"] == rejected["instruction"] and row["reason"] == "low_reward"


@pytest.mark.slow
def test_generate_with_the_in_process_vllm_engine(vllm_teacher: object, tmp_path: Path) -> None:
    from distill.generate import run_generate

    config = load_config(
        overrides=[
            f"run_dir={tmp_path / 'run'}",
            "teacher.backend=vllm",
            "generate.target=5",
            "generate.batch_size=4",
            "generate.tasks_per_request=3",
            "generate.max_tokens=320",
            "generate.temperature=0.7",
            "generate.cache=false",
        ]
    )
    summary = run_generate(config, teacher=vllm_teacher)  # type: ignore[arg-type]
    assert summary["kept"] == 5 and summary["reply_format"] == "json"
    check_generate_run(tmp_path / "run", 5, "vllm")


@pytest.mark.slow
def test_identical_rerun_is_free_and_changed_settings_miss(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    # A fresh example-sampling seed: the machine-wide cache can't know these requests yet.
    fresh = ("--set", f"generate.seed={random.randrange(10**9)}")
    first = run_distill(*openai_generate_args(fault_proxy.base_url, tmp_path / "a", 4, *fresh))
    assert first.returncode == 0, first.stderr
    sent = len(fault_proxy.bodies)
    assert sent > 0
    fault_proxy.reset()
    again = run_distill(*openai_generate_args(fault_proxy.base_url, tmp_path / "b", 4, *fresh))
    assert again.returncode == 0, again.stderr
    assert fault_proxy.bodies == []  # every answer came from the cache
    rows_a = read_jsonl(tmp_path / "a" / "instructions.jsonl")
    assert [r["instruction"] for r in read_jsonl(tmp_path / "b" / "instructions.jsonl")] == [
        r["instruction"] for r in rows_a
    ]
    changed = run_distill(
        *openai_generate_args(fault_proxy.base_url, tmp_path / "c", 4, *fresh), "--set", "generate.temperature=0.6"
    )
    assert changed.returncode == 0, changed.stderr
    assert len(fault_proxy.bodies) >= 1  # a setting that changes answers is not served from cache

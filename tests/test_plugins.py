"""The plugin system: built-ins through the same hooks, entry-point plugins, DISTILL_LOAD_PLUGINS,
a plugin added at run time without touching core, and the README documenting every hook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import distill
from distill import hookspecs
from distill.config import load_config
from distill.errors import PluginError
from distill.plugins import DEFAULT_PLUGINS, get_judges, get_tasks, get_teachers, pm
from distill.records import ChatRequest, ChatResult, Message
from distill.teacher import Teacher, load_teacher
from tests.conftest import REPO, run_distill

EXAMPLE_PLUGIN = REPO / "examples" / "distill-logging-teacher"


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The example plugin package, installed like a user would (pip, found through its entry point)
    but into a throwaway folder put on PYTHONPATH, so it never stays in the test environment.
    Yields the environment for `run_distill` and the plugin's entry-point name as ``name``."""
    target = tmp_path_factory.mktemp("example-plugin")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(EXAMPLE_PLUGIN)], check=True)
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "name": "logging_teacher"}


class EchoTeacher(Teacher):
    """A fixture plugin's teacher: answers with the prompt reversed."""

    name = "echo-test"

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return [
            ChatResult(
                request_id=r.id,
                backend=self.name,
                model=self.model,
                texts=[r.messages[-1].content[::-1]],
                finish_reasons=["stop"],
            )
            for r in requests
        ]


class EchoPlugin:
    @distill.hookimpl
    def register_teachers(self, register: Any) -> None:
        register(EchoTeacher)


@pytest.fixture()
def echo_plugin() -> Iterator[None]:
    pm.register(EchoPlugin(), name="echo-test-plugin")
    get_teachers.cache_clear()
    yield
    pm.unregister(name="echo-test-plugin")
    get_teachers.cache_clear()


def test_builtin_teachers_come_through_the_hooks() -> None:
    teachers = get_teachers()
    assert {"openai", "vllm", "transformers"} <= set(teachers.names())
    assert {teachers.owners[name] for name in ("openai", "vllm", "transformers")} == {
        f"distill_plugins.{module}" for module in ("openai_teacher", "vllm_teacher", "transformers_teacher")
    }
    judges = get_judges()
    assert {judges.owners[name] for name in judges.names()} == {
        "distill_plugins.judges",
        "distill_plugins.rule_judge",
        "distill_plugins.reward_model_judge",
    }
    tasks = get_tasks()
    assert {tasks.owners[name] for name in tasks.names()} == {"distill_plugins.tasks"}
    assert set(DEFAULT_PLUGINS) <= set(teachers.owners.values()) | set(judges.owners.values()) | {
        "distill_plugins.tasks"
    }


def test_core_never_imports_builtin_plugins() -> None:
    for path in (REPO / "distill").glob("*.py"):
        source = path.read_text()
        imports = re.findall(r"^\s*(?:from|import)\s+(distill_plugins\S*)", source, re.M)
        assert not imports, f"{path.name} imports {imports}: core must reach backends only through hooks"


def test_a_plugin_teacher_is_usable_from_config_without_core_changes(echo_plugin: None) -> None:
    config = load_config(overrides=["teacher.backend=echo-test", "teacher.model=anything"])
    teacher = load_teacher(config.teacher)
    result = teacher.generate([ChatRequest(messages=[Message(role="user", content="abc")])])[0]
    assert result.text == "cba"


def test_two_plugins_with_one_name_is_an_error(echo_plugin: None) -> None:
    class Clash:
        @distill.hookimpl
        def register_teachers(self, register: Any) -> None:
            register(EchoTeacher)

    pm.register(Clash(), name="clash")
    get_teachers.cache_clear()
    try:
        with pytest.raises(PluginError, match="'echo-test' is registered by both"):
            get_teachers()
    finally:
        pm.unregister(name="clash")
        get_teachers.cache_clear()


def test_entry_point_plugin_is_listed_with_what_it_registered(example_plugin: dict[str, str]) -> None:
    name, env = example_plugin["name"], {"PYTHONPATH": example_plugin["PYTHONPATH"]}
    assert run_distill("plugins", "--json").stdout.count(name) == 0  # not in the test environment itself
    result = run_distill("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    plugins = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert plugins[name]["teachers"] == ["logging"]
    assert plugins[name]["hooks"] == ["register_commands", "register_teachers"]
    assert plugins[name]["package"] == "distill-logging-teacher 0.1.0"
    assert plugins[name]["about"]["teachers"]["logging"].startswith("Wraps another teacher")
    assert plugins["distill_plugins.vllm_teacher"]["teachers"] == ["vllm"]


def test_distill_load_plugins_limits_installed_plugins(example_plugin: dict[str, str]) -> None:
    name, env = example_plugin["name"], {"PYTHONPATH": example_plugin["PYTHONPATH"]}
    none = json.loads(run_distill("plugins", "--json", env={**env, "DISTILL_LOAD_PLUGINS": ""}).stdout)
    assert [entry["name"] for entry in none] == list(DEFAULT_PLUGINS)
    only = json.loads(run_distill("plugins", "--json", env={**env, "DISTILL_LOAD_PLUGINS": name}).stdout)
    assert name in [entry["name"] for entry in only]
    missing = run_distill("plugins", env={**env, "DISTILL_LOAD_PLUGINS": "nope"})
    assert missing.returncode == 2
    assert "DISTILL_LOAD_PLUGINS: no installed plugin 'nope'; installed: " in missing.stderr
    assert name in missing.stderr


@pytest.mark.slow
def test_example_plugin_teacher_and_command_work_end_to_end(
    example_plugin: dict[str, str], smollm2_dir: Path, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": example_plugin["PYTHONPATH"]}
    log_file = tmp_path / "teacher-log.jsonl"
    result = run_distill(
        "ask",
        "--teacher",
        "logging",
        "--model",
        "smollm2-135m-instruct",
        "--max-tokens",
        "16",
        "--set",
        f"teacher.options.log_file={log_file}",
        "What is the capital of France?",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["backend"] == "transformers" and rows[0]["error"] is None
    assert rows[0]["completion_tokens"] > 0
    summary = run_distill("teacher-log", str(log_file), env=env)
    assert summary.stdout.strip() == f"1 requests, 0 failed, {rows[0]['completion_tokens']} completion tokens"


def test_readme_documents_every_hook() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert hooks == ["register_commands", "register_judges", "register_tasks", "register_teachers"]
    for hook in hooks:
        assert f"### `{hook}" in section, f"README 'Writing a plugin' has no section for {hook}"


def test_readme_file_tree_lists_every_tracked_file() -> None:
    """The README's Files section has a line for every file in the repository (globs and
    folders ending in / cover several)."""
    import fnmatch

    block = (REPO / "README.md").read_text().split("## Files", 1)[1].split("```", 2)[1]
    entries = [line.split()[0] for line in block.strip().splitlines() if line.strip()]
    listing = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listing.returncode != 0 or not listing.stdout:
        pytest.skip("not a git checkout")
    tracked = listing.stdout.split()
    missing = [
        path
        for path in tracked
        if not any(path.startswith(e) if e.endswith("/") else fnmatch.fnmatch(path, e) for e in entries)
    ]
    assert missing == [], "add these to the README's Files section"


def test_the_readme_teacher_plugin_works_and_caches_safely(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The `register_teachers` example in the README, registered at run time like an installed
    plugin: it answers, its answer-changing option keys the cache, its speed-only option doesn't."""
    import types

    from distill.answers import AnswerSource
    from distill.config import TeacherConfig
    from distill.plugins import load_plugins

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    section = (REPO / "README.md").read_text().split("### `register_teachers(register)`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_teacher_plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    load_plugins().register(module, name="readme_teacher_plugin")
    get_teachers.cache_clear()

    def ask(**options: Any) -> tuple[str, int]:
        config = TeacherConfig(backend="shout", model="any", options=options)
        source = AnswerSource.for_teacher(config, None, log=None, cache=True)
        try:
            [result] = source.generate([config.request("hello")])
        finally:
            source.close()
        return result.text, source.counts.sent

    try:
        assert ask() == ("HELLO!", 1)
        assert ask() == ("HELLO!", 0)  # from the cache
        assert ask(suffix="?") == ("HELLO?", 1)  # an option that changes answers: asked again
        assert ask(max_concurrency=16) == ("HELLO!", 0)  # a speed-only option: still cached
    finally:
        load_plugins().unregister(name="readme_teacher_plugin")
        get_teachers.cache_clear()

"""One writer per run directory, and no orphans.

Two `distill` processes on one directory: the second is refused with one line naming the first
(pid and command) and sends nothing; a SIGKILLed holder leaves no stale lock (the kernel drops
it), so the same command resumes at once. Every command that writes a run directory is refused
the same way, before it sends a request or loads a model. The lock tests run against a tiny local
OpenAI-format server (no model: fast and deterministic) that counts requests per client path.

No orphans: SIGKILL a `distill generate` running the vllm teacher, and no process it started
(engine core, workers, helpers) outlives it by more than a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from distill.cli import cli
from distill.config import load_config
from distill.runlock import LOCK_FILE, RunDirBusy, empty_directory, locked
from tests.conftest import REPO, TEACHER_MODEL, check_generate_run, openai_generate_args, read_jsonl, run_distill

Measure = Callable[[str, object], None]


def reply(number: int) -> dict[str, Any]:
    """A self-instruct reply with three new tasks (no two requests' tasks alike)."""
    words = [f"w{number}x{i}{part}" for i in range(3) for part in "abc"]
    tasks = [
        {"instruction": f"Describe {' and '.join(words[3 * i : 3 * i + 3])}.", "input": "", "output": "It is."}
        for i in range(3)
    ]
    content = json.dumps({"tasks": tasks})
    return {
        "id": f"r{number}",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


@pytest.fixture()
def server() -> Iterator[dict[str, Any]]:
    """An OpenAI-format server at ``url``/v1; clients tell themselves apart by their API key (a
    speed-only option, so every client is the same teacher to distill): ``requests`` lists
    (client, first user message) per request. While ``gate`` is clear, every request after
    the first waits for it (so a run can be caught mid-way)."""
    state: dict[str, Any] = {"requests": [], "gate": threading.Event()}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                client = self.headers.get("authorization", "").removeprefix("Bearer ")
                state["requests"].append((client, body["messages"][0]["content"]))
                number = len(state["requests"])
            if number > 1:
                state["gate"].wait(120)
            payload = json.dumps(reply(number)).encode()
            try:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client was killed while waiting

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    state["gate"].set()
    httpd.shutdown()


def sent_by(server: dict[str, Any], client: str) -> list[str]:
    return [prompt for who, prompt in server["requests"] if who == client]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


HOLD = (
    "import sys\nfrom pathlib import Path\nfrom distill.runlock import locked\n"
    "with locked(*map(Path, sys.argv[1:])):\n    print('held', flush=True)\n    sys.stdin.read()\n"
)


class Holder:
    """Another process holding the lock of some directories until ``release()``."""

    def __init__(self, *directories: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, *map(str, directories)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "held"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(30) == 0


@pytest.fixture()
def holders() -> Iterator[Callable[..., Holder]]:
    started: list[Holder] = []

    def hold(*directories: Path) -> Holder:
        started.append(Holder(*directories))
        return started[-1]

    yield hold
    for holder in started:
        holder.process.kill()
        holder.process.wait()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_second_generate_is_refused_and_a_killed_one_leaves_no_stale_lock(
    server: dict[str, Any], tmp_path: Path, measure: Measure
) -> None:
    run_dir, target = tmp_path / "run", 12  # 4 requests of 3 tasks, one at a time

    def args(client: str) -> list[str]:
        key = ("--set", "teacher.options.api_key_env=CLIENT_KEY")
        settings = ("--set", "generate.batch_size=1", "--set", "generate.cache=false", *key)
        return openai_generate_args(f"{server['url']}/v1", run_dir, target, *settings)

    def env(client: str) -> dict[str, str]:
        return {"CLIENT_KEY": client}

    log = run_dir / "responses.jsonl"
    command = [sys.executable, "-m", "distill.cli", *args("first")]
    first = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env("first")}
    )
    try:
        # The first run saved one answer and waits for its second: it is mid-run.
        wait_for(lambda: log.is_file() and len(read_jsonl(log)) == 1 and len(sent_by(server, "first")) == 2, "run 1")
        second = run_distill(*args("second"), env=env("second"))
        assert first.poll() is None, "the first run must still be running"
        assert second.returncode == 1
        assert error_lines(second.stderr) == [
            f"error: {run_dir} is being written by another distill process (pid {first.pid}: "
            f"distill {' '.join(args('first'))}); wait for it or stop it"
        ], second.stderr
        assert "Traceback" not in second.stderr
        assert sent_by(server, "second") == []  # refused before sending anything
        assert len(read_jsonl(log)) == 1  # and before writing anything

        os.kill(first.pid, signal.SIGKILL)  # the kernel drops its lock; the lock file stays
        first.wait()
    finally:
        first.kill()
        first.wait()
    assert (run_dir / LOCK_FILE).is_file()
    saved = {row["request"]["messages"][0]["content"] for row in read_jsonl(log)}
    server["gate"].set()
    third = run_distill(*args("third"), env=env("third"))  # the same command again: resumes at once
    assert third.returncode == 0, third.stderr
    check_generate_run(run_dir, target, "openai")
    answers = read_jsonl(log)
    assert len(answers) == 4 and len({row["request_id"] for row in answers}) == 4  # none bought twice
    assert saved.isdisjoint(sent_by(server, "third")) and len(sent_by(server, "third")) == 3
    assert not (run_dir / LOCK_FILE).exists()  # a holder that lets go removes it
    measure("concurrent generate: requests sent by the refused run", len(sent_by(server, "second")))
    measure("concurrent generate: answers saved twice", len(answers) - len({row["request_id"] for row in answers}))
    measure("after SIGKILL of the holder: rerun refused", third.returncode != 0)


def test_every_command_that_writes_a_run_dir_is_refused_while_another_process_writes_it(
    server: dict[str, Any], tmp_path: Path, holders: Callable[..., Holder], measure: Measure
) -> None:
    run_dir = tmp_path / "run"
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text(json.dumps({"id": "r0", "instruction": "Say hi.", "output": "Hi."}) + "\n")
    teacher = [
        "--set",
        "teacher.backend=openai",
        "--set",
        "teacher.model=m",
        "--set",
        f"teacher.options.base_url={server['url']}/v1",
        "--set",
        "teacher.options.api_key_env=null",
    ]
    commands = {  # the directory each command writes → the command
        run_dir: ["generate", "--run-dir", str(run_dir), "--no-progress", *teacher],
        run_dir / "judged": [
            "judge",
            str(dataset),
            "--rubric",
            "helpfulness",
            "--run-dir",
            str(run_dir / "judged"),
            *teacher,
        ],
        run_dir / "eval": ["eval", "--run-dir", str(run_dir), "--no-progress", *teacher],
        run_dir / "sft": ["train", "sft", "--run-dir", str(run_dir), "--no-progress"],
        run_dir / "rl": ["train", "rl", "--run-dir", str(run_dir), "--no-progress"],
        run_dir / "asked": ["ask", "Hi?", "--run-dir", str(run_dir / "asked"), *teacher],
        # `distill run` holds its stages' directories from the start, not only RUN_DIR
        tmp_path / "other" / "judge": ["run", "--run-dir", str(tmp_path / "other"), *teacher],
    }
    holder = holders(*commands)
    runner = CliRunner()
    for directory, command in commands.items():
        result = runner.invoke(cli, command)
        assert result.exit_code == 1, (command, result.output)
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert lines[0].startswith(f"error: {directory} is being written by another distill process (pid ")
        assert f"(pid {holder.process.pid}: distill " in lines[0] and lines[0].endswith("; wait for it or stop it")
    assert server["requests"] == []
    assert not (run_dir / "manifest.json").exists() and not (tmp_path / "other" / "stages").exists()
    holder.release()
    measure("commands refused while another process writes (of 7)", len(commands))


def test_the_lock_is_reentrant_in_a_process_released_after_and_kept_by_overwrite(
    tmp_path: Path, holders: Callable[..., Holder]
) -> None:
    directory, link = tmp_path / "out", tmp_path / "link"
    directory.mkdir()
    link.symlink_to(directory)
    with locked(directory), locked(link):  # the same dir again, by another name: no deadlock
        info = json.loads((directory / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["command"].startswith("distill")
        (directory / "checkpoints").mkdir()
        (directory / "adapter_model.safetensors").write_text("x")
        empty_directory(directory)  # --overwrite empties the dir but keeps the lock file
        assert [p.name for p in directory.iterdir()] == [LOCK_FILE]
        refused = subprocess.run([sys.executable, "-c", HOLD, str(directory)], cwd=REPO, capture_output=True, text=True)
        assert refused.returncode == 1 and f"(pid {os.getpid()}: distill" in refused.stderr
    assert not (directory / LOCK_FILE).exists()
    holders(directory).release()  # free again for another process


def test_under_torchrun_only_rank_0_takes_the_training_dir(
    tmp_path: Path, holders: Callable[..., Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.errors import ConfigError
    from distill.train import run_sft

    config = load_config(None, [f"run_dir={tmp_path}", f"train.sft.data={tmp_path / 'missing.jsonl'}"])
    holders(tmp_path / "sft")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunDirBusy):
        run_sft(config)
    monkeypatch.setenv("RANK", "1")  # another rank of the same launch: rank 0 holds the lock for it
    with pytest.raises(ConfigError, match="dataset not found"):
        run_sft(config)


def test_a_lock_kept_by_a_child_of_a_dead_holder_says_how_to_find_it(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    script = HOLD.replace(
        "    sys.stdin.read()\n",
        # the child closes its output, so that only the lock outlives the parent
        "    import os, time\n    if os.fork() == 0:\n        os.close(1)\n        os.close(2)\n"
        "        time.sleep(60)\n    os._exit(0)\n",
    )
    parent = subprocess.run([sys.executable, "-c", script, str(directory)], cwd=REPO, capture_output=True, text=True)
    assert parent.stdout.strip() == "held"
    import psutil

    children = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and p.info["cmdline"][-1] == str(directory) and p.pid != os.getpid()
    ]
    try:
        with (
            pytest.raises(RunDirBusy, match=r"which exited, but a child of it holds the lock: `fuser -v "),
            locked(directory),
        ):
            pass
    finally:
        for child in children:
            child.kill()
    psutil.wait_procs(children, timeout=10)
    with locked(directory):  # the child is gone: free
        pass


# No orphans ------------------------------------------------------------------------------------

OWNER = """
import subprocess, sys, time
from distill_plugins.vllm_teacher import EngineWatchdog

watchdog = EngineWatchdog()
with watchdog.marking():  # like an engine core: ignores SIGTERM, and starts a worker of its own
    code = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    engine = subprocess.Popen([sys.executable, "-c", code])
unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(watchdog.process.pid, engine.pid, unmarked.pid, flush=True)
time.sleep(120)
"""


def test_the_engine_watchdog_kills_what_the_engine_started_when_its_owner_is_killed(measure: Measure) -> None:
    import psutil

    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    watchdog, engine, unmarked = (psutil.Process(int(pid)) for pid in owner.stdout.readline().split())
    wait_for(lambda: len(engine.children()) == 1, "the engine's worker", 30)
    doomed = [watchdog, engine, *engine.children()]
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        killed = time.monotonic()

        def alive() -> list[psutil.Process]:
            return [p for p in doomed if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        wait_for(lambda: not alive(), "the engine's processes to die", 10)
        seconds = time.monotonic() - killed
        assert unmarked.is_running()  # only what the engine started
    finally:
        for process in [*doomed, unmarked]:
            with contextlib.suppress(psutil.Error):
                process.kill()
    measure("engine watchdog: seconds until the engine and its worker died", round(seconds, 2))


@pytest.mark.slow
def test_sigkill_of_distill_with_the_vllm_teacher_leaves_no_process_behind(
    smollm2_dir: Path, tmp_path: Path, measure: Measure
) -> None:
    import psutil

    run_dir = tmp_path / "run"
    args = [
        "generate",
        "--teacher",
        "vllm",
        "--model",
        TEACHER_MODEL,
        "--run-dir",
        str(run_dir),
        "--target",
        "500",
        "--no-progress",
        "--set",
        "generate.cache=false",
        "--set",
        "generate.batch_size=2",
        "--set",
        "generate.max_tokens=48",
    ]
    for option in ("enforce_eager=true", "max_model_len=2048", "cpu_kv_cache_gib=1"):
        args += ["--set", f"teacher.options.{option}"]
    tree: list[psutil.Process] = []
    terminal = (tmp_path / "terminal.txt").open("w")  # what a user would see, stdout and stderr
    distill = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=REPO,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,  # its own process group: the kill below is of the one process only
    )
    try:
        wait_for(lambda: (run_dir / "responses.jsonl").is_file() or distill.poll() is not None, "the engine", 600)
        assert distill.poll() is None, "distill exited before it answered"
        tree = psutil.Process(distill.pid).children(recursive=True)
        names = sorted(p.name() for p in tree)
        assert any("EngineCore" in name for name in names), names  # the engine runs in a child process
        os.kill(distill.pid, signal.SIGKILL)
        killed = time.monotonic()
        distill.wait()

        def alive() -> list[psutil.Process]:
            return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        while alive() and time.monotonic() - killed < 10:
            time.sleep(0.05)
        seconds = time.monotonic() - killed
        left = [(p.pid, p.name()) for p in alive()]
        assert left == [], f"left behind after SIGKILL of distill: {left}"
    finally:
        distill.kill()
        distill.wait()
        for process in tree:  # whatever the outcome, leave nothing running
            with contextlib.suppress(psutil.Error):
                process.kill()
    terminal.close()
    # A quiet terminal (no -v): the engine's logs, warnings and loading bars went to the run's log.
    shown = (tmp_path / "terminal.txt").read_text()
    engine_log = (run_dir / "logs" / "engines.log").read_text()
    assert "vllm" not in shown.lower() and "Warning" not in shown and "INFO" not in shown, shown[-2000:]
    assert "EngineCore" in engine_log and "INFO" in engine_log
    measure(
        "vllm teacher: engine log lines on the terminal without -v",
        sum("vllm" in line.lower() for line in shown.splitlines()),
    )
    measure("vllm teacher: processes started by distill", f"{len(tree)} ({', '.join(names)})")
    measure("vllm teacher: alive 10 s after SIGKILL of distill", len(left))
    measure("vllm teacher: seconds until all were gone", round(seconds, 1))

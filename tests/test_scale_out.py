"""`executor: ray`: teacher replicas as Ray actors on a local Ray (``ray.init(num_cpus=2)``, started
once for the module), the driver still the single writer of the answer logs and the cache.

- Same rows: generate (sampled, seeded), judge and eval on the bundled model through the
  transformers teacher, local vs 2 replicas: identical outputs, byte for byte (timings aside).
  transformers, not vLLM: it starts in seconds, and its answers depend only on the batch a request
  is in, which the executor keeps (chunks are whole multiples of the teacher's batch_size).
- A replica killed mid-batch (``ray.kill``, restarts allowed): the call finishes, every row once;
  the dead replica's chunk was re-sent to the other one, counted at the server.
- The driver SIGKILLed mid-run (`distill generate --executor ray` against a model-free
  OpenAI-format server): no Ray process outlives it, and the rerun asks nothing saved again,
  with no duplicate and no lost row.
The openai teacher's ``base_urls`` (several servers, with or without Ray) is tested here too:
model-free servers and two fault proxies in front of the real vLLM server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from distill.config import DistillConfig, TeacherConfig, load_config
from tests.conftest import (
    REPO,
    SERVED_NAME,
    TEACHER_MODEL,
    check_generate_run,
    read_jsonl,
    run_distill,
    write_judge_dataset,
)
from tests.fault_proxy import pacing_violations
from tests.openai_stub import StubServer, echo, self_instruct

RAY_ON_TWO_CORES = ["ray.num_replicas=2", "ray.resources_per_replica={CPU: 0.5}"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray for the module (2 logical CPUs, 127.0.0.1 only); its processes die with the
    test run even if pytest is killed (the watchdog distill uses for its own local Ray)."""
    import ray

    from distill.watchdog import EngineWatchdog

    watchdog = EngineWatchdog()
    with watchdog.marking():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    try:
        yield ray
    finally:
        ray.shutdown()
        watchdog.stop()


@pytest.fixture()
def stub() -> Iterator[StubServer]:
    server = StubServer(echo).start()
    yield server
    server.stop()


def without(row: dict[str, Any], *paths: str) -> dict[str, Any]:
    """``row`` without the fields at dotted ``paths`` (timings and timestamps differ run to run)."""
    row = json.loads(json.dumps(row))
    for path in paths:
        node, *rest = path.split(".")
        target = row
        for part in [node, *rest][:-1]:
            target = target.get(part) or {}
        target.pop(path.split(".")[-1], None)
    return row


# Same rows ------------------------------------------------------------------------------------


def small_run(run_dir: Path, executor: str) -> DistillConfig:
    """Two seeded, sampled self-instruct requests; judge and eval settings small enough for 2 busy
    cores. One request per transformers batch, so that every call spreads over both replicas."""
    teacher = {"backend": "transformers", "model": TEACHER_MODEL, "seed": 1, "options": {"batch_size": 1}}
    judges = [{"type": "rubric", "rubric": "helpfulness", "options": {"structured": "off", "max_tokens": 16}}]
    models = [
        {"name": "base", "role": "base", "teacher": teacher},
        {"name": "teacher", "role": "teacher", "teacher": teacher},
    ]
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"executor={executor}",
            *RAY_ON_TWO_CORES,
            f"teacher={json.dumps(teacher)}",
            "generate.target=4",
            "generate.max_requests=2",
            "generate.batch_size=2",
            "generate.examples_per_request=1",
            "generate.tasks_per_request=2",
            "generate.max_tokens=16",
            "generate.temperature=0.7",
            "generate.cache=false",
            f"judge.judges={json.dumps(judges)}",
            "judge.cache=false",
            "judge.batch_size=2",
            f"eval.models={json.dumps(models)}",
            "eval.tasks=[{type: countries, options: {limit: 2}}]",
            "eval.max_tokens=8",
            "eval.style_rubric=null",
            "eval.cache=false",
        ],
    )


def run_all(config: DistillConfig, teacher: Any, dataset: Path) -> dict[str, Any]:
    """generate, judge and eval with one loaded teacher (as `distill run` shares it); their outputs."""
    from distill.evaluation import run_eval
    from distill.generate import run_generate
    from distill.judging import run_judge

    run_dir = config.run_dir
    assert run_dir is not None
    summary = run_generate(config, teacher=teacher)
    run_judge(config, dataset, run_dir / "judge", teacher=teacher)
    scores = run_eval(config, teachers={"base": teacher, "teacher": teacher})["scores"]
    answers = [without(row, "result.latency_s", "result.created") for row in read_jsonl(run_dir / "responses.jsonl")]
    return {
        "sent": summary["sent_to_teacher"],
        "responses": sorted(answers, key=lambda row: row["request_id"]),
        "instructions": [without(row, "provenance.created") for row in read_jsonl(run_dir / "instructions.jsonl")],
        "rejected": read_jsonl(run_dir / "rejected.jsonl"),
        "failures": read_jsonl(run_dir / "failures.jsonl"),
        "judgements": [without(row, "latency_s") for row in read_jsonl(run_dir / "judge" / "judgements.jsonl")],
        "predictions": read_jsonl(run_dir / "eval" / "predictions.jsonl"),
        "scores": scores,
    }


@pytest.mark.slow
def test_two_ray_replicas_write_the_rows_a_local_run_writes(local_ray: Any, smollm2_dir: Path, tmp_path: Path) -> None:
    import torch

    from distill.executor import RayTeacher, load_teacher
    from distill.teacher import load_teacher as load_local

    dataset = write_judge_dataset(tmp_path / "rows.jsonl", JUDGE_ROWS)
    local_config = small_run(tmp_path / "local", "local")
    # One torch thread, as in each replica (Ray sets OMP_NUM_THREADS to an actor's CPUs, at least
    # 1): on 2 busy cores two spinning OpenMP threads made the local run 10x slower. (With 2 threads
    # here the rows were identical too: these kernels don't split the sums they reduce.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with load_local(local_config.teacher) as teacher:
            local = run_all(local_config, teacher, dataset)
    finally:
        torch.set_num_threads(threads)
    ray_config = small_run(tmp_path / "ray", "ray")
    with load_teacher(ray_config.teacher, ray_config) as teacher:
        assert isinstance(teacher, RayTeacher) and len(teacher.replicas) == 2
        assert teacher.chunks(2) == [(0, 1), (1, 2)]  # one request per replica
        remote = run_all(ray_config, teacher, dataset)
    assert local["sent"] == remote["sent"] == 2
    assert len(local["responses"]) == 2 and all(row["result"]["texts"][0] for row in local["responses"])
    for part in local:
        assert remote[part] == local[part], part
    assert len(local["judgements"]) == 2 and len(local["predictions"]) == 4


JUDGE_ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "Spiders are the best pizza toppings in Italy."),
]


# Settings, without Ray ------------------------------------------------------------------------


def test_executor_settings_are_checked_before_any_work() -> None:
    from click.testing import CliRunner

    from distill.cli import cli
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ray\.resources_per_replica: .*every amount must be > 0"):
        load_config(None, ["executor=ray", "ray.resources_per_replica={GPU: 0}"])
    with pytest.raises(ConfigError, match="executor: must be one of 'local' or 'ray'"):
        load_config(None, ["executor=slurm"])
    vllm_tp2 = ["teacher.backend=vllm", "teacher.options.tensor_parallel_size=2", "ray.resources_per_replica={GPU: 1}"]
    assert load_config(None, vllm_tp2).executor == "local"  # Ray settings matter only with executor: ray
    # --executor ray on the command line sets executor: the same settings are now refused.
    result = CliRunner().invoke(
        cli, ["generate", "--executor", "ray", "--run-dir", "x", *(f"--set={o}" for o in vllm_tp2)]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: ray.resources_per_replica.GPU: a replica of teacher (vllm, tensor_parallel_size 2) needs GPU: 2, got 1"
    )


def test_a_ray_teacher_is_the_wrapped_teacher_to_the_cache_prices_and_stages() -> None:
    """Everything decided by the teacher's class is the wrapped class's: the request-cache key (local
    and Ray runs share the cache), the price, the name; chunks follow the teacher's batch size."""
    from distill.answers import AnswerSource
    from distill.config import RayConfig
    from distill.executor import _ray_class
    from distill.plugins import get_teachers
    from distill.records import Usage
    from distill.teacher import teacher_identity

    teachers = get_teachers()
    config = TeacherConfig(
        backend="openai", model="gpt-4o-mini", options={"base_url": "http://h/v1", "requests_per_minute": 90}
    )
    wrapped = teachers["openai"]
    options = teachers.options("openai", config.options)
    teacher = _ray_class(wrapped)(config.model, options, RayConfig(num_replicas=3), wrapped)
    assert isinstance(teacher, wrapped) and teacher.name == "openai"
    assert teacher_identity(config, teacher) == teacher_identity(config)  # as if not loaded: the same key
    source = AnswerSource.for_teacher(config, teacher, None, cache=False)
    assert source.identity == teacher_identity(config) and source.teacher_class.cost_usd is not None
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert type(teacher).cost_usd(config.model, options, usage) == wrapped.cost_usd(config.model, options, usage)
    assert wrapped.replica_options(options, 3).requests_per_minute == 30  # one key's limit, shared by 3
    local = TeacherConfig(backend="transformers", model=TEACHER_MODEL, options={"batch_size": 4})
    transformers = teachers["transformers"]
    chunked = _ray_class(transformers)(
        local.model, teachers.options("transformers", local.options), RayConfig(num_replicas=2), transformers
    )
    chunked.replicas = [None, None]  # as if started: two replicas
    assert chunked.chunks(10) == [(0, 8), (8, 10)]  # half of 10, rounded up to whole batches of 4
    chunked.settings = RayConfig(chunk_size=3)
    assert chunked.chunks(10) == [(0, 4), (4, 8), (8, 10)]


# base_urls: several servers of one model --------------------------------------------------------


def base_urls_teacher(urls: list[str], **options: Any) -> Any:
    from distill.teacher import load_teacher

    config = TeacherConfig(
        backend="openai", model="m", max_tokens=8, options={"base_urls": urls, "api_key_env": None, **options}
    )
    return config, load_teacher(config)


def test_base_urls_spread_requests_each_server_keeps_its_own_rate_limit() -> None:
    from distill.errors import ConfigError
    from distill.plugins import get_teachers

    servers = [StubServer(echo).start() for _ in range(2)]
    try:
        config, teacher = base_urls_teacher([s.url for s in servers], requests_per_minute=120, max_concurrency=4)
        # A first request to each server (imports, connections): a cold start stamped late at the
        # server would look like a burst with the next one. The pace carries over to what follows.
        teacher.generate([config.request("warm-up"), config.request("warm-up too")])
        for server in servers:
            server.reset()
        results = teacher.generate([config.request(f"q{i}") for i in range(16)])
        assert [r.text for r in results] == [f"echo: q{i}" for i in range(16)]
        # The least busy server gets the next request: the first 8 (4 per server may be in flight)
        # go 4 and 4 before any answer comes back; then each server gets what it frees.
        assert sum(len(s.times) for s in servers) == 16 and min(len(s.times) for s in servers) >= 4
        for server in servers:  # 120/min each: together 240/min, but no server sees more than its limit
            assert pacing_violations(server.times, per_minute=120) == [], server.times
        assert sorted(servers[0].prompts + servers[1].prompts) == sorted(f"q{i}" for i in range(16))  # each once
        # The cache key: the first server stands for the replicas (as base_url would).
        openai = get_teachers()["openai"]
        identity = openai.cache_identity("m", openai.options_model(base_urls=[servers[0].url, servers[1].url]))
        assert identity == openai.cache_identity("m", openai.options_model(base_url=servers[0].url))
        both = [f"teacher.options.base_url={servers[0].url}", f"teacher.options.base_urls=[{servers[0].url}]"]
        with pytest.raises(ConfigError, match=r"teacher\.options: .*base_url and base_urls: set one"):
            load_config(None, ["teacher.backend=openai", *both])
    finally:
        for server in servers:
            server.stop()


def test_a_retry_moves_to_another_server() -> None:
    from tests.conftest import free_port

    alive = StubServer(echo).start()
    try:
        dead = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens: connection refused
        config, teacher = base_urls_teacher([dead, alive.url], max_retries=2, backoff_initial_s=0.01)
        results = teacher.generate([config.request(f"q{i}") for i in range(6)])
        assert all(r.ok for r in results), [r.error for r in results]
        assert sorted(alive.prompts) == sorted(f"q{i}" for i in range(6))  # each answered once, by the live one
    finally:
        alive.stop()


@pytest.mark.slow
def test_base_urls_with_two_proxies_in_front_of_the_real_server(vllm_server: str) -> None:
    from tests.fault_proxy import FaultProxy

    proxies = [FaultProxy(vllm_server.removesuffix("/v1")).start() for _ in range(2)]
    try:
        from distill.teacher import load_teacher

        config = TeacherConfig(
            backend="openai",
            model=SERVED_NAME,
            max_tokens=4,
            options={"base_urls": [p.base_url for p in proxies], "api_key_env": None, "requests_per_minute": 180},
        )
        teacher = load_teacher(config)
        teacher.generate([config.request("Say hello."), config.request("Say goodbye.")])  # warm: see above
        for proxy in proxies:
            proxy.reset()
        results = teacher.generate([config.request(f"Say the number {i}.") for i in range(8)])
        assert all(r.ok and r.usage.completion_tokens > 0 for r in results), [r.error for r in results]
        arrivals = [[t for t, path in p.received if path.endswith("/chat/completions")] for p in proxies]
        assert all(arrivals) and sum(map(len, arrivals)) == 8  # both served, every request once
        for times in arrivals:
            assert pacing_violations(times, per_minute=180) == [], times
    finally:
        for proxy in proxies:
            proxy.stop()


# Ray replicas: failures and limits ----------------------------------------------------------------


def openai_on_ray(url: str, **options: Any) -> DistillConfig:
    teacher = {"backend": "openai", "model": "m", "options": {"base_url": url, "api_key_env": None, **options}}
    return load_config(None, ["executor=ray", *RAY_ON_TWO_CORES, f"teacher={json.dumps(teacher)}"])


@pytest.mark.slow
def test_a_replica_killed_mid_batch_is_restarted_and_its_requests_answered_once(local_ray: Any, tmp_path: Path) -> None:
    from distill.executor import load_teacher
    from distill.generate import run_generate

    server = StubServer(self_instruct, delay_s=0.5).start()
    try:
        config = openai_on_ray(server.url, max_concurrency=2)
        settings = [
            "generate.target=12",
            "generate.batch_size=8",
            "generate.tasks_per_request=3",
            "generate.cache=false",
        ]
        config = load_config(None, [f"run_dir={tmp_path / 'run'}", *settings, *overrides_of(config)])
        with load_teacher(config.teacher, config) as teacher:
            first = teacher.replicas[0]
            killed_pid = local_ray.get(first.ready.remote())["pid"]

            def kill_when_busy() -> None:
                # Only once a request of *this* replica is at the server (the other replica's may arrive
                # first under load): matched by the sender's port among the replica process's sockets.
                replica = psutil.Process(killed_pid)
                while True:
                    with server.lock:
                        sent = set(server.client_ports)
                    if sent & {c.laddr.port for c in replica.net_connections(kind="tcp")}:
                        break
                    time.sleep(0.01)
                local_ray.kill(first, no_restart=False)  # Ray restarts it; its chunk must go elsewhere

            killer = threading.Thread(target=kill_when_busy)
            killer.start()
            summary = run_generate(config, teacher=teacher)
            killer.join()
            assert teacher.retried_chunks == 1
            assert ready_again(local_ray, first) != killed_pid  # Ray restarted it: a new process answers
        rows = check_generate_run(tmp_path / "run", 12, "openai")
        assert len({row.instruction for row in rows}) == 12
        answers = read_jsonl(tmp_path / "run" / "responses.jsonl")
        assert len(answers) == len({a["request_id"] for a in answers}) == summary["sent_to_teacher"] == 8
        # At the server: every request answered; only the killed replica's chunk (4 requests) was
        # asked again, and only as much of it as had reached the server.
        assert set(server.prompts) == {a["request"]["messages"][0]["content"] for a in answers}
        assert 8 < len(server.prompts) <= 8 + 4
    finally:
        server.stop()


@pytest.mark.slow
def test_replicas_share_a_rate_limit_instead_of_multiplying_it(local_ray: Any) -> None:
    from distill.executor import load_teacher

    server = StubServer(echo).start()
    try:
        config = openai_on_ray(server.url, requests_per_minute=240)  # one key: 240/min for all replicas
        with load_teacher(config.teacher, config) as teacher:
            results = teacher.generate([config.teacher.request(f"q{i}") for i in range(12)])
        assert [r.text for r in results] == [f"echo: q{i}" for i in range(12)]
        assert pacing_violations(server.times, per_minute=240) == [], server.times
    finally:
        server.stop()


def ready_again(ray: Any, actor: Any) -> int:
    """The pid of ``actor`` once it answers (while Ray restarts it, calls fail as unavailable)."""
    from ray.exceptions import ActorUnavailableError

    for _ in range(600):
        with contextlib.suppress(ActorUnavailableError):
            return ray.get(actor.ready.remote())["pid"]
        time.sleep(0.2)
    raise AssertionError("the killed replica never came back")


def overrides_of(config: DistillConfig) -> list[str]:
    """``config``'s executor and teacher as --set overrides (to add a run's own settings)."""
    return [
        f"executor={config.executor}",
        f"ray={json.dumps(config.ray.model_dump(mode='json'))}",
        f"teacher={json.dumps(config.teacher.model_dump(mode='json'))}",
    ]


# The driver SIGKILLed ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_ray_process_and_resumes_exactly(tmp_path: Path) -> None:
    import psutil

    server = StubServer(self_instruct, delay_s=1.0).start()
    run_dir = tmp_path / "run"
    args = [
        "generate",
        "--executor",
        "ray",
        "--teacher",
        "openai",
        "--model",
        "m",
        "--run-dir",
        str(run_dir),
        "--target",
        "12",
        "--no-progress",
        *(f"--set={o}" for o in RAY_ON_TWO_CORES),
        f"--set=teacher.options.base_url={server.url}",
        "--set=teacher.options.api_key_env=null",
        "--set=generate.batch_size=2",
        "--set=generate.tasks_per_request=3",
        "--set=generate.cache=false",
    ]
    log = run_dir / "responses.jsonl"
    driver = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill below is of the one process only
    )
    tree: list[Any] = []
    try:
        deadline = time.monotonic() + 600
        while len(read_jsonl(log)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the run finished (or failed) before the kill point"
        tree = psutil.Process(driver.pid).children(recursive=True)
        names = " ".join(p.name() + " " + " ".join(p.cmdline()[:2]) for p in tree)
        assert "raylet" in names and "gcs_server" in names, names  # a local Ray the driver started
        os.kill(driver.pid, signal.SIGKILL)
        killed = time.monotonic()
        driver.wait()

        def alive() -> list[Any]:
            return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        while alive() and time.monotonic() - killed < 10:
            time.sleep(0.1)
        left = [(p.pid, p.name()) for p in alive()]
        assert left == [], f"left behind after SIGKILL of the driver: {left}"
        saved = {row["request"]["messages"][0]["content"] for row in read_jsonl(log)}
        assert saved, "nothing was saved before the kill"
        server.reset()
        result = run_distill(*args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert saved.isdisjoint(server.prompts)  # nothing saved was asked again
        rows = check_generate_run(run_dir, 12, "openai")  # no duplicate, no lost row
        assert len({row.instruction for row in rows}) == 12
        answers = read_jsonl(log)
        assert len({a["request_id"] for a in answers}) == len(answers)  # no answer saved twice
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        driver.wait()
        for process in tree:  # whatever the outcome, leave nothing running
            with contextlib.suppress(psutil.Error):
                process.kill()
        server.stop()


# Training across machines ----------------------------------------------------------------------


def test_the_multinode_accelerate_recipe_launches_8_processes_on_each_of_2_machines() -> None:
    """examples/accelerate/multinode.yaml as `accelerate launch` reads it on machine 1: the torchrun
    rendezvous it would start (2 nodes, 8 processes each, machine 0 as master)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    command = ["--config_file", str(REPO / "examples" / "accelerate" / "multinode.yaml"), "--machine_rank", "1"]
    args = launch_command_parser().parse_args([*command, "-m", "distill.cli", "train", "sft", "-c", "my.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.multi_gpu and args.mixed_precision == "bf16"
    prepare_multi_gpu_env(args)  # what accelerate hands torchrun
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.0.0.1:29500")  # machine 0 as master
    assert args.training_script == "distill.cli" and args.module

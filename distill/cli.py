"""The ``distill`` command line. Each command: load and validate the config, call the stage,
print a summary. Errors the user can fix print one line per problem and exit non-zero."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from distill import __version__
from distill.errors import ConfigError, DistillError

log = logging.getLogger("distill")


def handle_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DistillError into its message on stderr and its exit code, without a traceback."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except DistillError as exc:
            for line in str(exc).splitlines() or ["error"]:
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: saved work is kept; run the same command again to resume", err=True)
            sys.exit(130)
        except Exception as exc:
            storage = storage_error(exc)
            if storage is None:
                raise  # a bug: keep the traceback
            where = storage.filename or "the output directory"
            click.echo(
                f"error: cannot write {where}: {storage.strerror or storage}; free space or make it writable (or pick "
                "another --run-dir), then run the same command again: saved work is kept and resumes",
                err=True,
            )
            sys.exit(1)

    return wrapper


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def storage_error(exc: BaseException) -> OSError | None:
    """The full-disk / read-only / permission OSError behind ``exc`` (libraries such as datasets
    and torch wrap it), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def cli_overrides(flags: dict[str, Any], no_cache: bool = False) -> list[str]:
    """Command-line flags as ``--set`` overrides (flags left unset are skipped); ``--executor``
    (remembered by its option) too."""
    context = click.get_current_context(silent=True)
    executor = context.meta.get(EXECUTOR_KEY) if context is not None else None
    flags = {**flags, "executor": executor} if executor is not None else flags
    return [*(f"{key}={value}" for key, value in flags.items() if value is not None), *(NO_CACHE if no_cache else ())]


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML config file (see examples/).",
)
no_cache_option = click.option(
    "--no-cache",
    is_flag=True,
    help="Ask the teacher again instead of reusing answers from the request cache "
    "(sets generate.cache, judge.cache and eval.cache to false; the run's own answer log still resumes).",
)
NO_CACHE = ("generate.cache=false", "judge.cache=false", "eval.cache=false")
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD.PATH=VALUE",
    help="Override a config field, e.g. --set teacher.temperature=0.2 (repeatable).",
)
EXECUTOR_KEY = "distill.executor"
executor_option = click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    expose_value=False,  # read back by cli_overrides: no command signature changes
    callback=lambda context, _, value: context.meta.__setitem__(EXECUTOR_KEY, value) if value else None,
    help="Where teachers run: local (this process) or ray (ray.num_replicas Ray actors; sets executor).",
)
dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Print the cost estimate (requests, tokens, USD low–high, whether it fits budget_usd); send nothing.",
)
force_option = click.option(
    "--force",
    is_flag=True,
    help="Start even when the estimate's upper bound is above budget_usd (the run still stops before any "
    "batch that could cross the budget).",
)


def budget_gate(config: Any, stages: tuple[str, ...], dry_run: bool, force: bool, **where: Any) -> bool:
    """``--dry-run``: print the estimate of ``stages`` and return True (the command stops there).
    With ``budget_usd``: refuse to start when the estimate's upper bound doesn't fit, unless
    ``--force``. Either way nothing is sent or written."""
    if not dry_run and (config.budget_usd is None or force):
        return False
    from distill.estimate import estimate, print_estimate, refuse_over_budget

    found = estimate(config, stages, **where)
    if dry_run:
        print_estimate(found, click.echo)
        return True
    refuse_over_budget(found, force)
    return False


@click.group()
@click.version_option(__version__, prog_name="distill")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, and the engines' own logs; -vv debug).")
@click.pass_context
def cli(context: click.Context, verbose: int) -> None:
    """distill: turn a teacher LLM into training data and a better student model, and measure
    how much the student really learned."""
    if _plugin_error is not None:
        click.echo(f"error: {_plugin_error}", err=True)
        sys.exit(_plugin_error.exit_code)
    context.ensure_object(dict)["verbose"] = verbose
    level = os.environ.get("DISTILL_LOG_LEVEL") or ["WARNING", "INFO", "DEBUG"][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def quiet_libraries(config: Any) -> Path | None:
    """Unless -v: the terminal shows distill's own progress and summaries only. Engine logs (vLLM
    and its workers), library progress bars and Python warnings go to RUN_DIR/logs/engines.log
    (or $DISTILL_HOME/logs/ without a run dir). Returns the log file, or None with -v."""
    from distill.paths import ENGINE_LOG_ENV, distill_home

    if click.get_current_context().find_root().obj.get("verbose"):
        os.environ.pop(ENGINE_LOG_ENV, None)
        return None
    folder = config.run_dir / "logs" if config.run_dir is not None else distill_home() / "logs"
    log_file = folder / "engines.log"  # created by the first line written: a refused run writes nothing
    os.environ[ENGINE_LOG_ENV] = str(log_file)
    os.environ.setdefault("TQDM_DISABLE", "1")  # vLLM's and transformers' loading bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings_log = logging.getLogger("py.warnings")
    if not warnings_log.handlers:
        logging.captureWarnings(True)
        handler = FileHandlerMakingFolders(log_file, delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        warnings_log.addHandler(handler)
        warnings_log.propagate = False
    return log_file


class FileHandlerMakingFolders(logging.FileHandler):
    """A log file (and its folder) that appears with its first line."""

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@cli.command()
@click.argument("prompts", nargs=-1)
@config_option
@set_option
@click.option("--teacher", "backend", help="Teacher backend (openai, vllm, transformers or a plugin's).")
@click.option("--model", help="Model: bundled alias, local HF directory, hub id, or served model name.")
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=int, help="Most new tokens per answer.")
@click.option("--system", "system_prompt", help="System message before each prompt.")
@click.option(
    "--json-schema",
    "json_schema",
    type=click.Path(exists=True, path_type=Path),
    help="Constrain answers to the JSON schema in this file.",
)
@click.option("--logprobs", type=int, default=None, help="Return logprobs with this many alternatives per token.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Also save answers.jsonl and manifest.json here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result per line instead of text.")
@handle_errors
def ask(
    prompts: tuple[str, ...],
    config_path: Path | None,
    overrides: tuple[str, ...],
    backend: str | None,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    system_prompt: str | None,
    json_schema: Path | None,
    logprobs: int | None,
    run_dir: Path | None,
    as_json: bool,
) -> None:
    """Ask the teacher PROMPTS (or the config's ask.prompts) and print the answers.

    \b
    distill ask "What is the capital of France?"
    distill ask --teacher vllm --model smollm2-135m-instruct "Name three primes."
    distill ask --teacher openai --model gpt-4o-mini "Hi"     # needs OPENAI_API_KEY
    distill ask -c examples/quickstart.yaml
    """
    from distill.config import config_dump, load_config
    from distill.runlock import locked
    from distill.teacher import load_teacher, raise_on_fatal

    flags = {
        "teacher.backend": backend,
        "teacher.model": model,
        "teacher.temperature": temperature,
        "teacher.max_tokens": max_tokens,
        "teacher.system_prompt": system_prompt,
        "run_dir": run_dir,
    }
    config = load_config(config_path, [*overrides, *cli_overrides(flags)])
    quiet_libraries(config)
    questions = list(prompts) or config.ask.prompts
    if not questions:
        raise DistillError("nothing to ask: give prompts as arguments or list them in ask.prompts")
    extra: dict[str, Any] = {}
    if json_schema is not None:
        try:
            extra["response_format"] = json.loads(json_schema.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DistillError(f"--json-schema {json_schema}: not a JSON file ({exc})") from None
    if logprobs is not None:
        extra.update(logprobs=True, top_logprobs=logprobs)
    requests = [config.teacher.request(question, **extra) for question in questions]

    with locked(config.run_dir):  # one writer per run dir, before the teacher loads (None: no lock)
        with load_teacher(config.teacher) as teacher:
            results = teacher.generate(requests)
        if config.run_dir is not None:
            _save_answers(config.run_dir, config_dump(config), requests, results)
    for question, result in zip(questions, results):
        if as_json:
            click.echo(result.model_dump_json())
        elif result.ok:
            click.echo(f"> {question}\n{result.text.strip()}\n")
        else:
            click.echo(f"> {question}\n[failed: {result.error.message}]\n")  # type: ignore[union-attr]
    raise_on_fatal(results)
    failed = sum(not r.ok for r in results)
    if failed:
        raise DistillError(f"{failed} of {len(results)} requests failed (see above)")


def _save_answers(run_dir: Path, config: dict[str, Any], requests: list[Any], results: list[Any]) -> None:
    from distill.runstore import JsonlLog, write_manifest

    JsonlLog(run_dir / "answers.jsonl").append(
        {"request": request.model_dump(), "result": result.model_dump()} for request, result in zip(requests, results)
    )
    write_manifest(run_dir, "ask", config, {})


@cli.command()
@config_option
@set_option
@click.option("--teacher", "backend", help="Teacher backend (openai, vllm, transformers or a plugin's).")
@click.option("--model", help="Teacher model: bundled alias, local HF directory, hub id, or served model name.")
@click.option("--target", type=int, help="Number of tasks to keep.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where the run's files go (resumes if present).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@no_cache_option
@executor_option
@dry_run_option
@force_option
@handle_errors
def generate(
    config_path: Path | None,
    overrides: tuple[str, ...],
    backend: str | None,
    model: str | None,
    target: int | None,
    run_dir: Path | None,
    no_progress: bool,
    no_cache: bool,
    dry_run: bool,
    force: bool,
) -> None:
    """Generate Alpaca-style instruction data by self-instruct from the teacher.

    Resumable: run the same command again after a crash or Ctrl-C and it continues where it
    stopped, without repeating saved requests or duplicating rows.

    \b
    distill generate -c examples/quickstart.yaml
    distill generate --teacher vllm --target 500 --run-dir runs/data
    """
    from distill.config import load_config
    from distill.generate import run_generate
    from distill.progress import StageProgress, generate_detail, print_generate_summary

    flags = {"teacher.backend": backend, "teacher.model": model, "generate.target": target, "run_dir": run_dir}
    config = load_config(config_path, [*overrides, *cli_overrides(flags, no_cache)])
    if budget_gate(config, ("generate",), dry_run, force):
        return
    quiet_libraries(config)
    with StageProgress("generate", config.generate.target, "kept", enabled=not no_progress) as bar:
        summary = run_generate(
            config, progress=lambda state, seconds: bar.update(len(state.kept), generate_detail(state, seconds))
        )
    print_generate_summary(summary, config.run_dir)


@cli.command()
@click.argument("dataset", type=click.Path(path_type=Path), required=False)
@config_option
@set_option
@click.option(
    "--rubric",
    "rubrics",
    multiple=True,
    help="Judge with this rubric (bundled name or .yaml path; repeatable); replaces judge.judges.",
)
@click.option("--type", "judge_type", default="rubric", show_default=True, help="Judge type used with --rubric.")
@click.option("--teacher", "backend", help="Judge model's backend (sets judge.teacher.backend).")
@click.option("--model", help="Judge model (sets judge.teacher.model).")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where judgements go (resumes if present).")
@click.option("--limit", type=int, help="Judge only the first N rows.")
@click.option("--robustness", is_flag=True, help="Also attack each judge and report attack success rates.")
@click.option(
    "--calibrate",
    is_flag=True,
    help="Also (or, without DATASET, only) measure each judge on its rubric's gold set: accuracy vs chance, "
    "confusion matrix, position and length bias; writes calibration.json.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@no_cache_option
@executor_option
@dry_run_option
@force_option
@handle_errors
def judge(
    dataset: Path | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
    rubrics: tuple[str, ...],
    judge_type: str,
    backend: str | None,
    model: str | None,
    run_dir: Path | None,
    limit: int | None,
    robustness: bool,
    calibrate: bool,
    as_json: bool,
    no_progress: bool,
    no_cache: bool,
    dry_run: bool,
    force: bool,
) -> None:
    """Score DATASET with judges and write judgements.jsonl and judge_summary.json.

    DATASET: a generate run directory, a JSONL or JSON file, or a saved Hugging Face dataset.
    Resumable like generate: a rerun replays saved verdicts and sends nothing twice.

    \b
    distill judge runs/quickstart --rubric helpfulness --run-dir runs/judged
    distill judge data.jsonl --rubric harmlessness --type score --robustness
    distill judge pairs.jsonl --rubric helpfulness --type pairwise   # needs a response_b column
    distill judge --calibrate -c examples/quickstart.yaml --run-dir runs/calibration   # can the judges be believed?
    """
    from distill.config import load_config
    from distill.judging import run_judge, run_robustness
    from distill.paths import RunLayout
    from distill.progress import StageProgress
    from distill.runlock import locked

    flags: dict[str, Any] = {"run_dir": run_dir}
    if backend is not None or model is not None:
        flags["judge.teacher.backend"] = backend
        flags["judge.teacher.model"] = model
    if rubrics:
        flags["judge.judges"] = json.dumps([{"type": judge_type, "rubric": rubric} for rubric in rubrics])
    config = load_config(config_path, [*overrides, *cli_overrides(flags, no_cache)])
    quiet_libraries(config)
    out_dir = RunLayout.of(config).root  # a judge run's own directory
    if dataset is None and not calibrate:
        raise DistillError("give a DATASET to judge, or --calibrate to measure the judges on their gold sets")
    planned = (("calibrate",) if calibrate else ()) + (("judge",) if dataset is not None else ())
    if budget_gate(config, planned, dry_run, force, dataset=_limited(dataset, limit), judge_dir=out_dir):
        return
    summary: dict[str, Any] = {}
    with locked(out_dir):  # one writer, from the --limit subset through --robustness
        if calibrate:
            from distill.calibration import run_calibration

            summary["calibration"] = run_calibration(config, out_dir)
        if dataset is not None:
            if limit is not None:
                dataset = _first_rows(dataset, limit, out_dir)
            with StageProgress("judge", None, "verdicts", enabled=not no_progress and not as_json) as bar:
                progress = lambda done, total: bar.update(done, total=total)  # noqa: E731
                summary.update(run_judge(config, dataset, out_dir, progress=progress))
            if robustness:
                summary["robustness"] = run_robustness(config, dataset, out_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for label, entry in summary.get("calibration", {}).get("judges", {}).items():
        click.echo(calibration_line(label, entry))
    for label, entry in summary.get("judges", {}).items():
        extra = ""
        if "mean_agreement" in entry:
            extra += f"  agreement {entry['mean_agreement']:.2f}"
        if "position_consistency" in entry:
            extra += f"  position-consistent {entry['position_consistency']:.0%}"
        reward = "n/a" if entry["mean_reward"] is None else f"{entry['mean_reward']:.3f}"
        click.echo(
            f"{label}: {entry['valid']}/{entry['items']} valid ({entry['invalid_rate']:.0%} invalid)  "
            f"mean reward {reward}  classes {entry['classes']}{extra}"
        )
    if "cost" in summary:
        click.echo(f"cost: {summary['cost']['text']}")
    for report in summary.get("robustness", []):
        click.echo(f"robustness of {report['judge']} (attack success rate):")
        for name, attack in report["attacks"].items():
            rate = "n/a" if attack["success_rate"] is None else f"{attack['success_rate']:.0%}"
            click.echo(
                f"  {name:<18} {rate:>5}  ({attack['successes']}/{attack['eligible']}, {attack['invalid']} invalid)"
            )
    click.echo(f"outputs: {out_dir}")


def calibration_line(label: str, entry: dict[str, Any]) -> str:
    """One line per judge: gold accuracy vs chance, and any warning."""
    from distill.stats import pct

    if not entry.get("calibrated"):
        return f"{label}: not calibrated ({entry['reason']})"
    line = (
        f"{label}: gold accuracy {pct(entry['accuracy'])} (95% CI {pct(entry['interval'][0])} to "
        f"{pct(entry['interval'][1])}, chance {pct(entry['chance'])}, {entry['items']} items, "
        f"{pct(entry['invalid_rate'])} invalid)"
    )
    return line + "".join(f"\n  warning: {warning}" for warning in entry["warnings"])


def _limited(dataset: Path | None, limit: int | None) -> Path | None:
    """DATASET, or its first ``limit`` rows in a temporary file (for an estimate: writes nothing in the run)."""
    if dataset is None or limit is None:
        return dataset
    import tempfile

    from distill.runstore import read_rows

    handle = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")  # noqa: SIM115
    with handle:
        handle.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in read_rows(dataset)[:limit])
    return Path(handle.name)


def _first_rows(dataset: Path, limit: int, out_dir: Path) -> Path:
    """The first ``limit`` rows of DATASET as a JSONL file in the run dir (so reruns see the same rows)."""
    from distill.runstore import read_rows, write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    subset = out_dir / "judged_rows.jsonl"
    rows = read_rows(dataset)[:limit]
    write_atomic(subset, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    return subset


@cli.group()
def train() -> None:
    """Train the student: LoRA SFT on the teacher's data, KD from its token distributions, then RL
    against judge rewards."""


train_options = [
    config_option,
    set_option,
    click.option("--student", help="Student model: bundled alias, local HF directory or hub id."),
    click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory (data and outputs)."),
    click.option("--max-steps", type=int, help="Optimizer steps."),
    click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the output dir."),
    click.option("--overwrite", is_flag=True, help="Delete an earlier run in the output dir and start over."),
    click.option("--no-progress", is_flag=True, help="No progress bar."),
    no_cache_option,
]


def with_train_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(train_options):
        function = option(function)
    return function


def _train_config(
    stage: str,
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    no_cache: bool,
) -> Any:
    from distill.config import load_config

    flags = {"train.student": student, "run_dir": run_dir, f"train.{stage}.max_steps": max_steps}
    return load_config(config_path, [*overrides, *cli_overrides(flags, no_cache)])


@train.command("sft")
@with_train_options
@click.option(
    "--branch",
    "branches",
    multiple=True,
    help="Train only this branch of train.branches (repeatable; 'all': every branch), not the main adapter.",
)
@handle_errors
def train_sft(
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_cache: bool,
    branches: tuple[str, ...],
) -> None:
    """LoRA SFT of the student on a generate run (or any Alpaca JSON / JSONL / HF dataset).

    Writes the adapter, a model card, metrics.jsonl, TensorBoard logs and checkpoints to
    train.sft.output_dir (default RUN_DIR/sft). Works under `accelerate launch` / `torchrun`.
    With train.branches, then trains each branch the same way on its subset, into RUN_DIR/branches/NAME.

    \b
    distill train sft -c examples/quickstart.yaml
    distill train sft --run-dir runs/data --student gemma-3-270m --max-steps 200
    distill train sft -c my.yaml --resume          # after a crash: continue from the last checkpoint
    distill train sft -c my.yaml --branch all      # only the branches (train.branches)
    """
    from distill.branches import run_branches
    from distill.train import run_sft

    config = _train_config("sft", config_path, overrides, student, run_dir, max_steps, no_cache)
    quiet_libraries(config)
    if not branches:
        summary = run_sft(config, resume=resume, overwrite=overwrite, progress=not no_progress)
        click.echo(json.dumps(summary, indent=2))
    if branches and not config.train.branches:
        raise ConfigError([f"--branch {branches[0]}: train.branches is empty; configure the branches to train"])
    if branches or config.train.branches:
        names = None if not branches or "all" in branches else list(branches)
        trained = run_branches(config, names, resume=resume, overwrite=overwrite, progress=not no_progress)
        click.echo(json.dumps({"branches": trained}, indent=2))


allow_weak_judge_option = click.option(
    "--allow-weak-judge",
    is_flag=True,
    help="Train RL even when a judge is not above chance on its gold set or its rewards don't vary "
    "(sets train.rl.allow_weak_judge; the summary and the report carry the warning).",
)


@train.command("rl")
@with_train_options
@allow_weak_judge_option
@handle_errors
def train_rl(
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_cache: bool,
    allow_weak_judge: bool,
) -> None:
    """RL (GRPO by default, or RLOO) of the student against the judges' rewards (judge.judges).

    Starts from the SFT adapter (train.rl.start_from=sft) or the base student; prompts are the
    held-in instructions of the SFT data. Outputs like `train sft`, in RUN_DIR/rl.

    \b
    distill train rl -c examples/quickstart.yaml
    distill train rl -c my.yaml --set train.rl.algorithm=rloo --max-steps 100
    """
    from distill.train import run_rl

    weak = ("train.rl.allow_weak_judge=true",) if allow_weak_judge else ()
    config = _train_config("rl", config_path, (*overrides, *weak), student, run_dir, max_steps, no_cache)
    quiet_libraries(config)
    summary = run_rl(config, resume=resume, overwrite=overwrite, progress=not no_progress)
    click.echo(json.dumps(summary, indent=2))


@train.command("kd")
@with_train_options
@click.option("--mode", type=click.Choice(["offline", "on-policy"]), help="Sets train.kd.mode (default offline).")
@handle_errors
def train_kd(
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_cache: bool,
    mode: str | None,
) -> None:
    """Distil the teacher's token distributions into the student (LoRA; same tokenizer).

    offline: KL to the teacher's top-K logprobs captured by `distill generate` with
    generate.capture_logprobs=K, mixed with cross-entropy (train.kd.alpha, train.kd.temperature).
    on-policy: TRL's DistillationTrainer (GKD): the student samples, the teacher scores.
    Outputs like `train sft`, in RUN_DIR/kd. A tokenizer mismatch stops before any model loads.

    \b
    distill train kd -c my.yaml --mode offline
    distill train kd -c my.yaml --mode on-policy --set train.kd.beta=0.5 --max-steps 50
    """
    from distill.kd import run_kd

    extra = (f"train.kd.mode={mode}",) if mode else ()
    config = _train_config("kd", config_path, (*overrides, *extra), student, run_dir, max_steps, no_cache)
    quiet_libraries(config)
    summary = run_kd(config, resume=resume, overwrite=overwrite, progress=not no_progress)
    click.echo(json.dumps(summary, indent=2))


@train.command("prefs")
@with_train_options
@handle_errors
def train_prefs(
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_cache: bool,
) -> None:
    """Preference pairs for `train rm` and `train dpo`: the teacher's answer vs the student's own.

    The student (its SFT adapter, or the base: train.preference.student) answers every held-in
    instruction; the pairwise style judge compares both answers in both orders (or, with
    train.preference.rank_by, a pointwise judge scores each answer and the higher reward wins). Writes
    a judge run into RUN_DIR/preferences (resumable: answers and verdicts are logged and cached).
    Any other pairwise run works too: `distill judge pairs.jsonl --type pairwise --run-dir DIR`,
    then train.preference.data=DIR.

    \b
    distill train prefs -c my.yaml
    """
    from distill.preference import run_prefs

    config = _train_config("preference", config_path, overrides, student, run_dir, None, no_cache)
    quiet_libraries(config)
    click.echo(json.dumps(run_prefs(config), indent=2))


@train.command("rm")
@with_train_options
@handle_errors
def train_rm(
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_cache: bool,
) -> None:
    """A reward model from the judge's comparisons (TRL RewardTrainer, LoRA + a scalar head).

    Pairs: the position-consistent A/B verdicts of a pairwise judge run (train.preference.data, default
    RUN_DIR/preferences), or the ranked pairs of `train prefs` with train.preference.rank_by; ties,
    order-dependent and invalid verdicts are left out and counted. Reports held-out
    pairwise accuracy against the judge (95% interval) and agreement with the rubric's gold pairs.
    Use it as a reward: judge.judges: [{type: reward_model, options: {path: RUN_DIR/rm}}].

    \b
    distill train rm -c my.yaml --max-steps 200
    """
    from distill.reward_model import run_rm

    config = _train_config("rm", config_path, overrides, student, run_dir, max_steps, no_cache)
    quiet_libraries(config)
    summary = run_rm(config, resume=resume, overwrite=overwrite, progress=not no_progress)
    click.echo(json.dumps(summary, indent=2))


@train.command("dpo")
@with_train_options
@handle_errors
def train_dpo(
    config_path: Path | None,
    overrides: tuple[str, ...],
    student: str | None,
    run_dir: Path | None,
    max_steps: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_cache: bool,
) -> None:
    """DPO (or IPO, hinge, robust...: train.dpo.loss_type) of the student on the judge's preferences.

    TRL DPOTrainer with LoRA; the reference is the SFT adapter it continues (train.dpo.start_from=sft,
    TRL keeps a frozen copy) or the base. Same pairs and held-out split as `train rm`. Outputs like
    `train sft`, in RUN_DIR/dpo; `distill eval` compares it as the tuned model "dpo".

    \b
    distill train dpo -c my.yaml --set train.dpo.beta=0.1 --max-steps 100
    """
    from distill.dpo import run_dpo

    config = _train_config("dpo", config_path, overrides, student, run_dir, max_steps, no_cache)
    quiet_libraries(config)
    summary = run_dpo(config, resume=resume, overwrite=overwrite, progress=not no_progress)
    click.echo(json.dumps(summary, indent=2))


@cli.command()
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--merge", is_flag=True, required=True, help="Merge the LoRA adapter into the base weights.")
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory for the merged model."
)
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the base model's directory.")
@handle_errors
def export(adapter_dir: Path, merge: bool, out_dir: Path, trust_remote_code: bool) -> None:
    """Write base model + LoRA adapter (ADAPTER_DIR, from `distill train`) as one merged model
    (safetensors, with its tokenizer) that vLLM and transformers load directly.

    \b
    distill export runs/quickstart/sft --merge --out runs/quickstart/merged
    """
    from distill.train import export_merged

    path = export_merged(adapter_dir, out_dir, trust_remote_code=trust_remote_code)
    click.echo(f"merged model: {path}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--repo-id", required=True, help="Hub repository to create or update, e.g. me/my-distilled-data.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="Stage and check the files and list them; upload nothing.")
@click.option(
    "--staging",
    type=click.Path(path_type=Path),
    help="Folder to stage the upload in (default: a temporary one, kept after --dry-run).",
)
@handle_errors
def push(path: Path, repo_id: str, private: bool, dry_run: bool, staging: Path | None) -> None:
    """Upload a finished generate run (as a dataset) or a trained adapter (as a model) to the
    Hugging Face Hub, with its card. The files are staged and scanned first: a file holding the
    value of any *KEY* / *TOKEN* / *SECRET* environment variable stops the push. The Hub token
    comes from HF_TOKEN or `hf auth login`, never from distill's files.

    \b
    distill push runs/quickstart --repo-id me/quickstart-data --dry-run
    distill push runs/quickstart/sft --repo-id me/quickstart-sft --private
    """
    import tempfile

    from distill.push import plan_push, stage, upload

    plan = plan_push(path)
    folder = staging or Path(tempfile.mkdtemp(prefix="distill-push-"))
    listed = stage(plan, folder)
    click.echo(f"{plan.repo_type} repo {repo_id}: {len(listed)} files staged in {folder}")
    for name, size in listed:
        click.echo(f"  {name}  {size:,} bytes")
    if dry_run:
        click.echo("dry run: nothing uploaded")
        return
    url = upload(plan, folder, repo_id, private)
    if staging is None:
        shutil.rmtree(folder, ignore_errors=True)
    click.echo(f"pushed: {url}")


@cli.command("eval")
@config_option
@set_option
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory (adapters are found here).")
@click.option("--task", "task_types", multiple=True, help="Task to evaluate (repeatable); replaces eval.tasks.")
@click.option("--limit", type=int, help="Questions per task (a seeded sample).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@no_cache_option
@executor_option
@dry_run_option
@force_option
@handle_errors
def evaluate(
    config_path: Path | None,
    overrides: tuple[str, ...],
    run_dir: Path | None,
    task_types: tuple[str, ...],
    limit: int | None,
    as_json: bool,
    no_progress: bool,
    no_cache: bool,
    dry_run: bool,
    force: bool,
) -> None:
    """Answer held-out factual questions with every model (base student, tuned students,
    teacher), score them with bootstrap intervals, and measure judge preference vs the teacher.

    \b
    distill eval -c examples/quickstart.yaml
    distill eval -c my.yaml --task countries --task mmlu --set 'eval.tasks.1.options.path=data/mmlu.jsonl'
    """
    from distill.config import load_config
    from distill.evaluation import run_eval
    from distill.paths import RunLayout
    from distill.progress import StageProgress

    flags: dict[str, Any] = {"run_dir": run_dir}
    if task_types:
        tasks = [{"type": t, "options": {"limit": limit} if limit else {}} for t in task_types]
        flags["eval.tasks"] = json.dumps(tasks)
    config = load_config(config_path, [*overrides, *cli_overrides(flags, no_cache)])
    quiet_libraries(config)
    if limit and not task_types:
        for spec in config.eval.tasks:
            spec.options["limit"] = limit
    if budget_gate(config, ("eval",), dry_run, force):
        return
    with StageProgress("eval", None, "answers", enabled=not no_progress and not as_json) as bar:
        summary = run_eval(config, progress=lambda done, total: bar.update(done, total=total))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for task, scores in summary["scores"].items():
        for model, entry in scores.items():
            accuracy = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.1%}"
            click.echo(f"{task:<12} {model:<10} accuracy {accuracy:>6}  (n={entry['n']}, failed {entry['failed']})")
    for model, entry in summary["style"].items():
        preference = "n/a" if entry["preference"] is None else f"{entry['preference']:.1%}"
        click.echo(f"style        {model:<10} judge preference vs teacher {preference} ({entry['items']} items)")
    click.echo(f"cost: {summary['cost']['text']}")
    click.echo(f"outputs: {RunLayout.of(config).eval}")


@cli.command()
@config_option
@set_option
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory.")
@handle_errors
def report(config_path: Path | None, overrides: tuple[str, ...], run_dir: Path | None) -> None:
    """Write the false-promise gap report (HTML, Markdown, JSON) from `distill eval`'s outputs.

    \b
    distill report -c examples/quickstart.yaml
    """
    from distill.config import load_config
    from distill.report import write_report

    config = load_config(config_path, [*overrides, *cli_overrides({"run_dir": run_dir})])
    paths = write_report(config)
    for line in json.loads(paths["json"].read_text())["verdict"]:
        click.echo(line)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@cli.command()
@config_option
@set_option
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory (resumes if present).")
@click.option("--stages", help="Comma-separated subset of calibrate,generate,judge,sft,kd,prefs,rm,dpo,rl,eval,report.")
@no_cache_option
@executor_option
@allow_weak_judge_option
@dry_run_option
@force_option
@handle_errors
def run(
    config_path: Path | None,
    overrides: tuple[str, ...],
    run_dir: Path | None,
    stages: str | None,
    no_cache: bool,
    allow_weak_judge: bool,
    dry_run: bool,
    force: bool,
) -> None:
    """Calibrate → generate → judge → sft → kd → prefs → rm → dpo → rl → eval → report in one command,
    resumable stage by stage (train.method, e.g. sft, sft+kd or sft+dpo, picks the student stages).

    Finished stages are skipped on a rerun; an interrupted stage resumes with its own resume
    (answer logs, request cache, training checkpoints).

    \b
    distill run -c examples/quickstart.yaml
    """
    from distill.config import load_config
    from distill.pipeline import STAGES, run_pipeline

    weak = {"train.rl.allow_weak_judge": "true" if allow_weak_judge else None}
    config = load_config(config_path, [*overrides, *cli_overrides({"run_dir": run_dir, **weak}, no_cache)])
    chosen = tuple(s.strip() for s in stages.split(",")) if stages else STAGES
    if config.run_dir is not None:  # finished stages are skipped: they cost nothing more
        from distill.paths import RunLayout

        layout = RunLayout.of(config)
        pending = tuple(stage for stage in chosen if not layout.stage_marker(stage).is_file())
    else:
        pending = chosen
    if budget_gate(config, pending, dry_run, force):
        return
    quiet_libraries(config)
    results = run_pipeline(config, chosen, echo=lambda line: click.echo(line, err=True))
    if "report" in results:
        for line in json.loads(Path(results["report"]["json"]).read_text())["verdict"]:
            click.echo(line)
        click.echo(f"report: {results['report']['html']}")
    if config.run_dir is not None:
        from distill.ledger import cost_lines

        for line in cost_lines(config.run_dir):
            click.echo(line, err=True)


@cli.command()
@config_option
@set_option
@click.option(
    "--run-dir", type=click.Path(path_type=Path), help="Run directory (measured sizes and spend are read there)."
)
@click.option(
    "--stages", help="Comma-separated subset of calibrate,generate,judge,rl,eval (default: all that ask a teacher)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def estimate(
    config_path: Path | None, overrides: tuple[str, ...], run_dir: Path | None, stages: str | None, as_json: bool
) -> None:
    """What a run will cost, before anything is sent: requests per stage and model, tokens, USD
    low – high, and whether the high end fits budget_usd. Token sizes are measured from the run
    directory when it holds a run, else assumed (said so). Sends and writes nothing.

    \b
    distill estimate -c examples/openai.yaml
    distill estimate -c my.yaml --stages generate,judge --set budget_usd=20
    """
    from distill.config import load_config
    from distill.estimate import ESTIMATED_STAGES, print_estimate
    from distill.estimate import estimate as plan

    config = load_config(config_path, [*overrides, *cli_overrides({"run_dir": run_dir})])
    chosen = tuple(s.strip() for s in stages.split(",")) if stages else ESTIMATED_STAGES
    unknown = [s for s in chosen if s not in ESTIMATED_STAGES]
    if unknown:
        raise DistillError(f"--stages: {', '.join(unknown)} ask no teacher; choose from {', '.join(ESTIMATED_STAGES)}")
    print_estimate(plan(config, chosen), click.echo, as_json)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def cost(run_dir: Path, as_json: bool) -> None:
    """What RUN_DIR paid its teachers, per stage and model: requests, cached answers, tokens and
    USD, from the run's ledgers (ledger.jsonl in RUN_DIR and its stage directories). Works on a
    finished run and on one still running (read-only).

    \b
    distill cost runs/quickstart
    """
    from distill.ledger import cost_lines, read_ledger, run_ledger_files, summarize

    if as_json:
        rows = [row for path in run_ledger_files(run_dir) for row in read_ledger(path)]
        click.echo(json.dumps(summarize(rows), indent=2))
        return
    for line in cost_lines(run_dir):
        click.echo(line)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def plugins(as_json: bool) -> None:
    """List loaded plugins and what each registered."""
    from distill.plugins import describe_plugins

    described = describe_plugins()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for entry in described:
        origin = "built-in" if entry["builtin"] else entry.get("package", "installed")
        click.echo(f"{entry['name']} ({origin})")
        for kind in ("teachers", "judges", "tasks"):
            for name in entry.get(kind, []):
                click.echo(f"  {kind[:-1]} {name}: {entry['about'][kind][name]}")
        click.echo(f"  hooks: {', '.join(entry['hooks'])}")


@cli.group()
def cache() -> None:
    """The request cache: answers shared by all runs on this machine ($DISTILL_HOME/cache)."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def cache_info(as_json: bool) -> None:
    """Show where the cache is and how many answers it holds per teacher backend and model."""
    from distill.answers import RequestCache

    store = RequestCache()
    try:
        entries = store.entries()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"path": str(store.path), "entries": entries}, indent=2))
        return
    click.echo(f"{store.path}")
    for entry in entries:
        click.echo(
            f"  {entry['backend']:<14} {entry['model']:<32} {entry['answers']:>7} answers  "
            f"{entry['bytes'] / 1e6:8.2f} MB  {entry['oldest'][:10]} … {entry['newest'][:10]}"
        )
    if not entries:
        click.echo("  (empty)")


@cache.command("clear")
@click.option("--backend", help="Only the answers of this teacher backend.")
@click.option("--model", help="Only the answers of this model.")
@click.option("--yes", is_flag=True, help="Don't ask for confirmation.")
@handle_errors
def cache_clear(backend: str | None, model: str | None, yes: bool) -> None:
    """Delete cached answers (all, or one backend's / model's). Runs keep their own answer logs,
    so a rerun of a run still resumes; only identical requests in new runs are asked again."""
    from distill.answers import RequestCache

    what = " and ".join(f"{k} {v}" for k, v in (("backend", backend), ("model", model)) if v) or "all answers"
    if not yes:
        click.confirm(f"delete {what} from the request cache?", abort=True)
    store = RequestCache()
    try:
        deleted = store.clear(backend, model)
    finally:
        store.close()
    click.echo(f"deleted {deleted} cached answers ({what})")


@cli.group()
def models() -> None:
    """Bundled models: list them, prepare (convert and verify) them."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_list(as_json: bool) -> None:
    """List the bundled model aliases and whether each is prepared."""
    from distill.models import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "prepared" if row["prepared"] else "not prepared"
        click.echo(f"{row['alias']:<24} {state:<13} {row['description']}  [{row['licence']}]")


@models.command("prune")
@click.argument("source")
@click.option("--keep-layers", type=int, required=True, help="Decoder layers to keep (evenly spaced, first and last).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory to write.")
@handle_errors
def models_prune(source: str, keep_layers: int, out_dir: Path) -> None:
    """Write a depth-pruned copy of SOURCE (alias or local directory): KEEP_LAYERS evenly spaced
    decoder layers, config updated, safetensors + tokenizer, verified against the source with the
    same layers removed. Prune, then distil it from SOURCE (same tokenizer) with `distill train kd`.

    \b
    distill models prune smollm2-135m-instruct --keep-layers 10 --out models/smollm2-10l
    """
    from distill.prune import prune_model

    record = prune_model(source, keep_layers, out_dir)
    check = record["verification"]
    click.echo(
        f"{out_dir}: {record['layers']} of {record['source_layers']} layers (kept {record['kept_layers']}), "
        f"{record['parameters'] / 1e6:.1f}M of {record['source_parameters'] / 1e6:.1f}M parameters; "
        f"max |Δlogit| vs the source with those layers removed {check['max_abs_logit_diff']:.2e}"
    )


@models.command("prepare")
@click.argument("aliases", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Convert again even if prepared.")
@handle_errors
def models_prepare(aliases: tuple[str, ...], force: bool) -> None:
    """Convert bundled GGUF models into verified HF directories under $DISTILL_HOME/models.

    ALIASES: names from `distill models list`, or `all`.
    """
    from distill.models import BUNDLED, METADATA_FILE, prepare

    names = list(BUNDLED) if aliases == ("all",) else list(aliases)
    for alias in names:
        path = prepare(alias, force=force)
        check = json.loads((path / METADATA_FILE).read_text())["verification"]
        click.echo(
            f"{alias}: {path} (max |Δlogit| vs GGUF load {check['max_abs_logit_diff']:.2e}, "
            f"tolerance {check['tolerance']:.0e})"
        )


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--port", type=int, default=8765, show_default=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--expose",
    is_flag=True,
    help="Allow a --host other than this machine's loopback: anyone who can reach it can read the run.",
)
@handle_errors
def view(run_dir: Path, port: int, host: str, expose: bool) -> None:
    """Look at a run in the browser: the generated rows (kept, rejected and why, failed) with
    search and filters, each row's provenance and judgements, every eval answer with its score
    and style verdict, training curves, and the gap report with links to the rows behind it.
    Read-only; works while the run is still writing (re-index from the page).

    \b
    distill view runs/quickstart               # then open http://127.0.0.1:8765/
    distill view runs/quickstart --port 9000
    """
    from distill.view import serve

    serve(run_dir, host, port, expose=expose, echo=click.echo, warn=lambda line: click.echo(line, err=True))


@cli.group()
def index() -> None:
    """Retrieval indexes for grounded eval models (eval.models[].retrieval, eval.retrieval): BM25 over a corpus."""


@index.command("build")
@click.argument("corpus", type=click.Path(path_type=Path, exists=True))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Index directory to write.")
@click.option("--max-words", type=int, default=200, show_default=True, help="Most words per chunk.")
@handle_errors
def index_build(corpus: Path, out_dir: Path, max_words: int) -> None:
    """Index CORPUS (a folder or file of .md / .txt / .jsonl documents) for BM25 retrieval: one SQLite
    FTS5 file and a manifest. Chunks are paragraphs merged up to --max-words; a chunk's id is DOC#OFFSET.

    \b
    distill index demo-corpus --out corpora/countries    # the countries task's plugin adds this one
    distill index build corpora/countries --out indexes/countries
    """
    from distill.retrieval import build_index

    record = build_index(corpus, out_dir, max_words)
    click.echo(
        f"{out_dir}: {record['chunks']} chunks of {record['documents']} documents from {len(record['files'])} files "
        f"({record['library']}, tokenizer {record['tokenizer']})"
    )


@index.command("query")
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("-k", type=int, default=3, show_default=True, help="Passages to show.")
@handle_errors
def index_query(index_dir: Path, text: str, k: int) -> None:
    """Show the top-k passages INDEX_DIR returns for TEXT (what a grounded model would read)."""
    from distill.retrieval import Index

    found = Index(index_dir)
    try:
        for passage in found.search(text, k):
            click.echo(f"{passage.score:9.4f}  {passage.id}\n    {' '.join(passage.text.split())[:300]}")
    finally:
        found.close()


def _register_plugin_commands() -> DistillError | None:
    """Let plugins add commands; a broken plugin setup is reported when the CLI runs, not at import."""
    try:
        from distill.plugins import load_plugins

        load_plugins().hook.register_commands(cli=cli)
    except DistillError as exc:
        return exc
    return None


_plugin_error = _register_plugin_commands()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

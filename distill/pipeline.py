"""`distill run`: calibrate → generate → judge → sft → kd → prefs → rm → dpo → rl → eval → report in one
command (train.method picks the student stages: sft, kd, rm, dpo, '+'-joined; prefs runs when rm or
dpo needs preference pairs and train.preference.data names none).

Each finished stage leaves ``RUN_DIR/stages/STAGE.json``; a rerun skips finished stages and resumes
the interrupted one with that stage's own resume (answer logs, request cache, training
checkpoints). The teacher is loaded once and shared by the stages that use it (generate, the
judges, the teacher's eval answers), so a local engine starts once per run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.config import DistillConfig, JudgeSpec
from distill.errors import ConfigError
from distill.paths import RunLayout
from distill.runlock import locks
from distill.runstore import MANIFEST, write_atomic

log = logging.getLogger(__name__)

# calibrate first: whether the judges can be believed is known before compute is spent on them.
STAGES = ("calibrate", "generate", "judge", "sft", "kd", "prefs", "rm", "dpo", "rl", "eval", "report")
METHOD_STAGES = ("sft", "kd", "prefs", "rm", "dpo")
"""The stages train.method decides (the others always run when chosen)."""


def trained_stages(config: DistillConfig) -> set[str]:
    """The stages of METHOD_STAGES that train.method runs: its parts, and prefs when rm or dpo needs
    pairs that train.preference.data does not name."""
    parts = set(config.train.trained())
    if parts & {"rm", "dpo"} and config.train.preference.data is None:
        parts.add("prefs")
    return parts


def without_pending_reward_models(config: DistillConfig) -> DistillConfig:
    """The config without reward_model judges whose model does not exist yet (trained later in this
    run by the rm stage): calibrate and judge run before it; RL calibrates its own judges itself."""
    pending = [
        spec
        for spec in config.judge.judges
        if spec.type == "reward_model" and not (Path(str(spec.options.get("path", ""))) / "reward_model.json").is_file()
    ]
    if not pending:
        return config
    kept = [spec for spec in config.judge.judges if spec not in pending]
    return config.model_copy(update={"judge": config.judge.model_copy(update={"judges": kept})})


def finished_summary(output_dir: Path) -> dict[str, Any] | None:
    """A training stage's summary when it finished in ``output_dir`` (its manifest is written last), else None."""
    summary = output_dir / "training_summary.json"
    if (output_dir / MANIFEST).is_file() and summary.is_file():
        return dict(json.loads(summary.read_text()))
    return None


def written_dirs(config: DistillConfig, stages: tuple[str, ...]) -> list[Path]:
    """RUN_DIR and the directories the chosen stages write: `distill run` holds them all for the
    whole run, so a second writer is refused at the start, not hours later at its stage."""
    if config.run_dir is None:
        return []
    layout = RunLayout.of(config)
    where = {
        "calibrate": layout.calibration,
        "judge": layout.judge,
        "sft": layout.sft,
        "kd": layout.kd,
        "prefs": layout.preferences,
        "rm": layout.rm,
        "dpo": layout.dpo,
        "rl": layout.rl,
        "eval": layout.eval,
        "report": layout.report,
    }
    return [layout.root, *(where[stage] for stage in stages if stage in where)]


@locks(lambda config, stages, **_: written_dirs(config, stages))
def run_pipeline(
    config: DistillConfig, stages: tuple[str, ...] = STAGES, echo: Callable[[str], None] = print, teacher: Any = None
) -> dict[str, Any]:
    """Run the stages not yet finished; return {stage: summary}."""
    from distill.branches import run_branches
    from distill.calibration import run_calibration
    from distill.dpo import check_dpo, run_dpo
    from distill.evaluation import run_eval
    from distill.executor import load_teacher
    from distill.generate import run_generate
    from distill.judging import run_judge
    from distill.kd import check_kd, run_kd
    from distill.preference import run_prefs
    from distill.report import write_report
    from distill.reward_model import run_rm
    from distill.train import check_rl, run_rl, run_sft

    if config.run_dir is None:
        raise ConfigError(["run_dir: required for distill run"])
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError([f"--stages: unknown {', '.join(unknown)}; stages: {', '.join(STAGES)}"])
    if not config.judge.judges:  # the judge stage and RL need a judge: default to the helpfulness rubric
        config = config.model_copy(
            update={"judge": config.judge.model_copy(update={"judges": [JudgeSpec(rubric="helpfulness")]})}
        )
    method = config.train.method
    untrained = set(METHOD_STAGES) - trained_stages(config)
    if "kd" in stages and "kd" not in untrained:
        check_kd(config, require_capture="generate" not in stages)  # a tokenizer mismatch fails here
    if "dpo" in stages and "dpo" not in untrained:
        check_dpo(config, require_adapter="sft" not in set(stages) - untrained)
    if "prefs" in stages and "prefs" not in untrained and config.train.preference.student == "sft":
        sft_trained = "sft" in set(stages) - untrained
        if not sft_trained and not (RunLayout.of(config).sft / "adapter_model.safetensors").is_file():
            raise ConfigError(
                [
                    "train.preference.student: sft, but no SFT adapter exists and train.method does not train one: "
                    "add sft to train.method or set train.preference.student=base"
                ]
            )
    if "rl" in stages:  # before hours of generate and SFT
        check_rl(config, require_adapter=config.train.rl.start_from not in set(stages) - untrained)
    before_rm = without_pending_reward_models(config)  # calibrate and judge run before the rm stage

    layout = RunLayout.of(config)
    owned = teacher is None
    shared: dict[str, Any] = {"teacher": teacher}

    def the_teacher() -> Any:
        if shared["teacher"] is None:
            shared["teacher"] = load_teacher(config.teacher, config)  # executor: ray → Ray replicas
        return shared["teacher"]

    def judge_teacher() -> Any:
        return the_teacher() if config.judge.teacher is None else None

    def resume_of(output_dir: Path) -> bool:
        return (output_dir / "checkpoints").is_dir()

    actions: dict[str, Callable[[], Any]] = {
        "calibrate": lambda: run_calibration(before_rm, layout.calibration, teacher=judge_teacher()),
        "generate": lambda: run_generate(config, teacher=the_teacher()),
        "judge": lambda: run_judge(before_rm, layout.generate, layout.judge, teacher=judge_teacher()),
        "sft": lambda: {
            **(
                finished_summary(layout.sft)  # SFT finished and a branch did not: train only the branches again
                or run_sft(config, resume=resume_of(layout.sft), overwrite=not resume_of(layout.sft), progress=False)
            ),
            "branches": run_branches(config, resume=None, progress=False),  # train.branches, each resumed or anew
        },
        "kd": lambda: run_kd(config, resume=resume_of(layout.kd), overwrite=not resume_of(layout.kd), progress=False),
        "prefs": lambda: run_prefs(config, judge_teacher=judge_teacher()),
        "rm": lambda: run_rm(config, resume=resume_of(layout.rm), overwrite=not resume_of(layout.rm), progress=False),
        "dpo": lambda: run_dpo(
            config, resume=resume_of(layout.dpo), overwrite=not resume_of(layout.dpo), progress=False
        ),
        "rl": lambda: run_rl(
            config,
            resume=resume_of(layout.rl),
            overwrite=not resume_of(layout.rl),
            progress=False,
            judge_teacher=judge_teacher(),
        ),
        "eval": lambda: run_eval(config, teachers={"teacher": the_teacher()}),
        "report": lambda: {k: str(v) for k, v in write_report(config).items()},
    }
    results: dict[str, Any] = {}
    try:
        for stage in stages:
            if stage in untrained:
                echo(f"[{stage}] not trained with train.method={method}, skipped")
                continue
            marker = layout.stage_marker(stage)
            if marker.is_file():
                echo(f"[{stage}] done earlier, skipped ({marker})")
                results[stage] = json.loads(marker.read_text())["summary"]
                continue
            echo(f"[{stage}] running")
            summary = actions[stage]()
            marker.parent.mkdir(parents=True, exist_ok=True)
            finished = datetime.now(timezone.utc).isoformat()
            write_atomic(marker, json.dumps({"stage": stage, "finished": finished, "summary": summary}, default=str))
            results[stage] = summary
            echo(f"[{stage}] done")
    finally:
        if owned and shared["teacher"] is not None:
            shared["teacher"].close()
    return results

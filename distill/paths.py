"""Where things live. ``distill_home()`` holds what all runs on a machine share (prepared models,
the request cache); ``RunLayout`` says where each stage of one run reads and writes. Every stage
asks the layout for its paths: nothing else derives a path inside a run directory.

    RUN_DIR/                  generate's outputs (instructions.jsonl, dataset/, manifest.json, ...)
    RUN_DIR/judge/            distill judge over the generated data
    RUN_DIR/sft/  RUN_DIR/rl/ adapters (train.sft.output_dir / train.rl.output_dir override them)
    RUN_DIR/kd/               the distilled adapter of `distill train kd` (train.kd.output_dir overrides it)
    RUN_DIR/preferences/      `distill train prefs`: teacher vs student answers, judged pairwise (preference pairs)
    RUN_DIR/rm/  RUN_DIR/dpo/ the reward model and the DPO adapter (train.rm.output_dir / train.dpo.output_dir)
    RUN_DIR/branches/NAME/    one LoRA branch per train.branches entry (NAME.jsonl beside it: the rows it trained on)
    RUN_DIR/logprobs/         the teacher's captured top-K distributions on the kept rows (generate)
    RUN_DIR/eval/             eval answers, scores and the gap report (eval.output_dir overrides it)
    RUN_DIR/calibration/      judge calibration on the gold sets
    RUN_DIR/stages/           one marker per finished `distill run` stage
    RUN_DIR/logs/             engine logs (vLLM, ...), shown on the terminal only with -v
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import ConfigError

if TYPE_CHECKING:
    from distill.config import DistillConfig


ENGINE_LOG_ENV = "DISTILL_ENGINE_LOG"
"""Set by the CLI (unless -v) to the file where teacher engines (vLLM, ...) write their logs."""


def distill_home() -> Path:
    """Where prepared models and caches live: ``$DISTILL_HOME``, default ``~/.cache/distill``."""
    return Path(os.environ.get("DISTILL_HOME") or Path.home() / ".cache" / "distill").expanduser()


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run, from its config. A path that can't be derived (no ``run_dir`` and no
    override) raises a ``ConfigError`` naming the field to set."""

    run_dir: Path | None
    sft_dir: Path | None = None
    rl_dir: Path | None = None
    eval_dir: Path | None = None
    kd_dir: Path | None = None
    rm_dir: Path | None = None
    dpo_dir: Path | None = None

    @classmethod
    def of(cls, config: DistillConfig) -> RunLayout:
        return cls(
            run_dir=config.run_dir,
            sft_dir=config.train.sft.output_dir,
            rl_dir=config.train.rl.output_dir,
            eval_dir=config.eval.output_dir,
            kd_dir=config.train.kd.output_dir,
            rm_dir=config.train.rm.output_dir,
            dpo_dir=config.train.dpo.output_dir,
        )

    @property
    def root(self) -> Path:
        if self.run_dir is None:
            raise ConfigError(["run_dir: required; set run_dir in the config or pass --run-dir"])
        return self.run_dir

    def _below(self, name: str, override: Path | None, field: str) -> Path:
        if override is not None:
            return override
        if self.run_dir is None:
            raise ConfigError([f"{field}: required (or set run_dir)"])
        return self.run_dir / name

    @property
    def generate(self) -> Path:
        return self.root

    @property
    def judge(self) -> Path:
        return self.root / "judge"

    @property
    def sft(self) -> Path:
        return self._below("sft", self.sft_dir, "train.sft.output_dir")

    @property
    def rl(self) -> Path:
        return self._below("rl", self.rl_dir, "train.rl.output_dir")

    @property
    def kd(self) -> Path:
        return self._below("kd", self.kd_dir, "train.kd.output_dir")

    @property
    def rm(self) -> Path:
        return self._below("rm", self.rm_dir, "train.rm.output_dir")

    @property
    def dpo(self) -> Path:
        return self._below("dpo", self.dpo_dir, "train.dpo.output_dir")

    @property
    def preferences(self) -> Path:
        """`distill train prefs`: a pairwise judge run over teacher-vs-student answers."""
        return self.root / "preferences"

    @property
    def logprobs(self) -> Path:
        return self.root / "logprobs"

    @property
    def branches(self) -> Path:
        """Trunk and branches: one adapter directory per train.branches entry."""
        return self.root / "branches"

    def branch(self, name: str) -> Path:
        """The adapter directory of branch ``name``."""
        return self.branches / name

    def branch_rows(self, name: str) -> Path:
        """The rows branch ``name`` trains on (its subset, as JSONL), beside its adapter directory."""
        return self.branches / f"{name}.jsonl"

    @property
    def eval(self) -> Path:
        return self._below("eval", self.eval_dir, "eval.output_dir")

    @property
    def report(self) -> Path:
        return self.eval

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def stage_marker(self, stage: str) -> Path:
        """The file a finished `distill run` stage leaves behind."""
        return self.root / "stages" / f"{stage}.json"

    def adapter(self, stage: str) -> Path | None:
        """The trained adapter directory of ``sft``, ``kd``, ``dpo``, ``rl`` (or the reward model, ``rm``); None
        for another name (``base``) or when it can't be derived."""
        where = {
            "sft": lambda: self.sft,
            "kd": lambda: self.kd,
            "dpo": lambda: self.dpo,
            "rl": lambda: self.rl,
            "rm": lambda: self.rm,
        }.get(stage)
        try:
            return where() if where is not None else None
        except ConfigError:
            return None

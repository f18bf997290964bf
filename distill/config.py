"""Configuration: pydantic models for every stage, loaded from YAML, overridable from the CLI.

Validation happens once, before any work: every problem becomes one line
``field.path: what is allowed, got VALUE`` in a ``ConfigError``. Teacher options are validated
against the options model of the chosen teacher plugin, so plugins get the same treatment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import ConfigError, format_validation_error
from distill.records import ChatRequest, Message


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TeacherConfig(StrictModel):
    """Which teacher answers, and its default sampling settings."""

    backend: str = Field(
        "transformers", description="Teacher plugin name: openai, vllm, transformers or an installed plugin's."
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="Bundled alias (see `distill models list`), a local HF directory or a hub id; "
        "for the openai backend, the model name the server knows.",
    )
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, le=65536, description="Most new tokens per answer.")
    seed: int | None = Field(None, description="Sampling seed passed with each request, where honoured.")
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Backend-specific options, validated by the backend's options model "
        "(see the README section of each teacher).",
    )

    def request(self, prompt: str, **overrides: Any) -> ChatRequest:
        """A ChatRequest for one user prompt with this config's sampling settings."""
        messages = [Message(role="user", content=prompt)]
        if self.system_prompt:
            messages.insert(0, Message(role="system", content=self.system_prompt))
        settings: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }
        settings.update(overrides)
        return ChatRequest(messages=messages, **settings)


class AskConfig(StrictModel):
    """`distill ask`: prompts for a quick check of a teacher."""

    prompts: list[str] = Field(
        default_factory=list, description="Prompts asked when none are given on the command line."
    )


# Alpaca's blocklist: tasks a text-only model cannot do (plus "go to" for browsing).
DEFAULT_BLOCKLIST = [
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
]


class FilterConfig(StrictModel):
    """Which generated tasks are kept. Every rejection is recorded with its reason."""

    min_instruction_words: int = Field(3, ge=1, description="Reject instructions with fewer words.")
    max_instruction_words: int = Field(150, ge=1, description="Reject instructions with more words.")
    blocklist: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BLOCKLIST),
        description="Reject instructions containing any of these words or phrases (whole words, any case).",
    )
    rouge_l_threshold: float = Field(
        0.7, gt=0, le=1, description="Reject an instruction whose ROUGE-L F with any kept one is >= this."
    )
    reject_truncated: bool = Field(True, description="Reject tasks from replies cut off by max_tokens.")


class GenerateConfig(StrictModel):
    """`distill generate`: self-instruct data from the teacher."""

    seed_file: Path | None = Field(
        None,
        description="Seed tasks JSONL (instruction, input, output[, category, id]); "
        "empty: the bundled prompts/seed_tasks.jsonl.",
    )
    target: int = Field(100, ge=1, description="Stop when this many tasks are kept.")
    max_requests: int = Field(1000, ge=1, description="Stop after this many teacher requests (budget).")
    batch_size: int = Field(16, ge=1, description="Requests sent together; results are saved per batch.")
    examples_per_request: int = Field(3, ge=1, description="Seed tasks shown in each request.")
    generated_examples_per_request: int = Field(
        0, ge=0, description="Already generated tasks mixed into the examples (Self-Instruct); 0: seeds only (Alpaca)."
    )
    tasks_per_request: int = Field(5, ge=1, le=50, description="New tasks asked for in each request.")
    reply_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json: a JSON schema the teacher must follow; text: 'Task N / Instruction: / Output:' "
        "layout; auto: json when the teacher can enforce a schema.",
    )
    template: str = Field("generate/self_instruct.jinja", description="Jinja template under prompts/ (or a path).")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature of generation requests.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of generation requests.")
    max_tokens: int = Field(1024, ge=16, description="Most new tokens per generation request.")
    seed: int = Field(0, description="Seed of the example sampling: same seed and settings, same requests.")
    cache: bool = Field(True, description="Reuse answers to identical requests from $DISTILL_HOME/cache.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="What is kept.")
    judge: str | None = Field(
        None,
        description="Keep only tasks this judge rewards >= min_reward: a label from judge.judges, "
        "or a rubric name (a rubric judge with default options).",
    )
    min_reward: float | None = Field(None, description="Threshold for generate.judge.")
    capture_logprobs: int = Field(
        0,
        ge=0,
        le=20,
        description="Also capture the teacher's top-K token distribution on every kept row's answer (teacher "
        "forcing, saved in RUN_DIR/logprobs/ for `distill train kd --mode offline`); 0: off.",
    )
    capture_tokenizer: str | None = Field(
        None,
        description="Tokenizer that renders rows for the capture (alias or directory); empty: the teacher's model "
        "(vllm, transformers); required for an openai teacher (a vLLM server that returns prompt_logprobs).",
    )

    @model_validator(mode="after")
    def _judge_filter(self) -> GenerateConfig:
        if (self.judge is None) != (self.min_reward is None):
            raise ValueError("judge and min_reward go together: set both (or neither)")
        return self


class JudgeSpec(StrictModel):
    """One judge: a judge plugin, its rubric, its weight in combined rewards, its options."""

    type: str = Field("rubric", description="Judge plugin: rubric, score, pairwise, rule or an installed plugin's.")
    rubric: str | None = Field(
        None,
        description="Rubric name under prompts/rubrics/ (helpfulness, harmlessness, honesty, format) or a .yaml path.",
    )
    label: str = Field("", description="Name in outputs and logs; empty: 'type:rubric' (or 'type').")
    weight: float = Field(1.0, description="Weight of this judge's reward when rewards are combined (RL).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Judge-specific options, validated by the judge's options model."
    )

    @model_validator(mode="after")
    def _default_label(self) -> JudgeSpec:
        if not self.label:
            self.label = f"{self.type}:{Path(self.rubric).stem}" if self.rubric else self.type
        return self


class JudgeConfig(StrictModel):
    """`distill judge` and every other use of judges (generate filter, RL rewards, reports)."""

    teacher: TeacherConfig | None = Field(
        None, description="The model that judges; empty: the top-level teacher judges."
    )
    judges: list[JudgeSpec] = Field(default_factory=list, description="The judges to run.")
    batch_size: int = Field(32, ge=1, description="Items judged together; judgements are saved per batch.")
    cache: bool = Field(True, description="Reuse verdicts for identical judge requests from $DISTILL_HOME/cache.")
    prompt_field: str = Field(
        "instruction", description="Dataset column with the prompt ('instruction' also appends 'input')."
    )
    response_field: str = Field("output", description="Dataset column with the response to judge.")
    response_b_field: str = Field("response_b", description="Dataset column with response B (pairwise judges).")
    calibration_items: int | None = Field(
        None,
        ge=1,
        description="Calibrate on a seeded sample of this many items of each gold set (faster, wider intervals); "
        "empty: every item.",
    )


class LoraSettings(StrictModel):
    """The LoRA adapter (peft) trained on the student."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer but the head.",
    )


class SFTSettings(StrictModel):
    """`distill train sft`: LoRA supervised fine-tuning on the teacher's data."""

    data: Path | None = Field(
        None,
        description="Generate run dir, Alpaca JSON, JSONL (messages or instruction/output) or saved HF dataset; "
        "empty: run_dir (the generate run).",
    )
    output_dir: Path | None = Field(None, description="Where the adapter goes; empty: run_dir/sft.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1: use epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (linear decay, warmup_ratio warmup).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    batch_size: int = Field(8, ge=1, description="Rows per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(512, ge=16, description="Tokens per row (or per packed sequence); longer rows are cut.")
    packing: bool = Field(
        False, description="Pack several rows into each max_length sequence (BFD, no cross-attention)."
    )
    padding_free: bool = Field(
        False,
        description="Flatten each batch into one row without padding, sequences told apart by position ids "
        "(same loss as padded batches, fewer tokens computed).",
    )
    completion_only_loss: bool = Field(True, description="Loss on the assistant's answer only, not on the prompt.")
    condition_on: list[str] = Field(
        default_factory=list,
        description="Conditional training: judge labels (or rubric names) whose verdicts on each row (RUN_DIR/judge/"
        "judgements.jsonl) prefix the row's user turn as control tags, e.g. <helpfulness:A>; rows of every class are "
        "kept, a row without a valid verdict stays untagged for that label. Empty: off.",
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share of rows for eval loss (0: none).")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")


class RLSettings(StrictModel):
    """`distill train rl`: RL against the judges' rewards (judge.judges with weights)."""

    algorithm: Literal["grpo", "rloo", "ppo"] = Field(
        "grpo", description="TRL trainer: grpo (default), rloo; ppo needs a TRL that still ships PPOTrainer."
    )
    start_from: Literal["sft", "kd", "dpo", "base"] = Field(
        "sft",
        description="sft / kd / dpo: continue the adapter of train.sft.output_dir / train.kd.output_dir / "
        "train.dpo.output_dir; base: a new adapter on the student.",
    )
    output_dir: Path | None = Field(None, description="Where the RL adapter goes; empty: run_dir/rl.")
    max_steps: int = Field(50, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-5, gt=0, description="Learning rate.")
    batch_size: int = Field(8, ge=1, description="Completions per device per step (a multiple of num_generations).")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(128, ge=1, description="Most new tokens per completion.")
    temperature: float = Field(1.0, gt=0, le=2, description="Rollout sampling temperature.")
    beta: float = Field(0.04, ge=0, description="KL penalty to the starting policy (0: no reference model, no KL).")
    use_vllm: bool = Field(
        False, description="Rollouts with vLLM (GPU; TRL colocate/server modes) instead of HF generate."
    )
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="TRL's vLLM mode when use_vllm is on.")
    allow_weak_judge: bool = Field(
        False,
        description="Train even when a judge's gold accuracy is not above chance or the rewards show no variance "
        "on probe completions (the summary and the report then carry the warning).",
    )
    probe_prompts: int = Field(
        4, ge=0, description="Training prompts sampled before RL starts to check that the rewards vary (0: no probe)."
    )
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(25, ge=1, description="Save a resumable checkpoint every this many steps.")


class KDSettings(StrictModel):
    """`distill train kd`: distillation from the teacher's token distributions (same tokenizer)."""

    mode: Literal["offline", "on-policy"] = Field(
        "offline",
        description="offline: KL to the captured top-K distributions (generate.capture_logprobs) mixed with CE; "
        "on-policy: TRL's DistillationTrainer / GKDTrainer, the teacher scoring the student's own samples.",
    )
    output_dir: Path | None = Field(None, description="Where the KD adapter goes; empty: run_dir/kd.")
    logprobs: Path | None = Field(
        None, description="Captured logprobs directory; empty: DATA/logprobs of the training data's generate run."
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Offline: loss = alpha·T²·KL(teacher‖student) + (1−alpha)·CE; 0: CE only."
    )
    temperature: float = Field(
        1.0,
        gt=0,
        le=10,
        description="Offline: softmax temperature of both K+1-bucket distributions in the KL; on-policy: "
        "sampling and loss temperature.",
    )
    lmbda: float = Field(
        1.0,
        ge=0,
        le=1,
        description="On-policy: share of steps on the student's own samples (GKD's lambda); 1: always "
        "(TRL DistillationTrainer), below 1: TRL's experimental GKDTrainer mixes in the dataset's answers.",
    )
    beta: float = Field(
        1.0, ge=0, le=1, description="On-policy: generalized JSD; 0: forward KL, 0.5: JSD, 1: reverse KL."
    )
    max_new_tokens: int = Field(128, ge=1, description="On-policy: most tokens per student sample.")
    teacher: str | None = Field(
        None,
        description="On-policy: the teacher model loaded locally (alias or directory); empty: teacher.model.",
    )
    teacher_server: str | None = Field(
        None,
        description="On-policy: base URL of a vLLM server (without /v1) serving the teacher: TRL's experimental "
        "ServerDistillationTrainer asks it for top-k logprobs instead of loading the teacher.",
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1: use epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (linear decay after warmup).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    batch_size: int = Field(8, ge=1, description="Rows per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(512, ge=16, description="Tokens per row; longer rows are cut.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Held-out share of rows (the same seeded split as SFT with the same value)."
    )
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")


class PreferenceSettings(StrictModel):
    """Preference pairs for `distill train rm` and `distill train dpo`, from a pairwise judge's verdicts."""

    data: Path | None = Field(
        None,
        description="A pairwise judge run (`distill judge DATA --type pairwise --run-dir DIR`: judgements.jsonl and "
        "the dataset it judged); empty: RUN_DIR/preferences, which `distill train prefs` (a `distill run` stage) "
        "fills with the teacher's answer vs the student's own on each held-in instruction.",
    )
    judge: str | None = Field(None, description="Label of the pairwise judge to read; empty: the only one there.")
    eval_fraction: float = Field(
        0.2, ge=0, lt=1, description="Held-out share of pairs (seeded): the RM's and DPO's held-out accuracy."
    )
    student: Literal["sft", "base"] = Field(
        "sft", description="`train prefs`: which student writes the second answer (the SFT adapter or the base)."
    )
    rank_by: str | None = Field(
        None,
        description="`train prefs`: the label of a pointwise judge in judge.judges (rubric, rule, reward_model) that "
        "judges the teacher's and the student's answer each on its own; the higher reward is chosen, equal rewards "
        "and invalid verdicts are left out and counted. Empty: the pairwise style judge, both orders.",
    )
    max_tokens: int = Field(128, ge=1, description="`train prefs`: most new tokens of the student's answer.")


class RMSettings(StrictModel):
    """`distill train rm`: a reward model (TRL RewardTrainer, LoRA + a scalar head) on the preference pairs."""

    model: str | None = Field(
        None, description="Base of the reward model: alias, directory or hub id; empty: train.student."
    )
    output_dir: Path | None = Field(None, description="Where the reward model goes; empty: run_dir/rm.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1: use epochs.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (linear decay after warmup).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(
        512, ge=16, description="Tokens per prompt + answer; TRL leaves longer pairs out (counted in the summary)."
    )
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")


DPO_LOSSES = Literal[
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "exo_pair", "apo_zero", "apo_down",
    "aot", "aot_unpaired", "discopop", "sigmoid_norm",
]  # fmt: skip


class DPOSettings(StrictModel):
    """`distill train dpo`: TRL DPOTrainer (LoRA) on the preference pairs, the reference frozen at the start."""

    start_from: Literal["sft", "base"] = Field(
        "sft",
        description="sft: continue the SFT adapter (TRL keeps a frozen copy of it as the reference); base: a new "
        "adapter on the student, the base as the reference.",
    )
    output_dir: Path | None = Field(None, description="Where the DPO adapter goes; empty: run_dir/dpo.")
    loss_type: DPO_LOSSES = Field(
        "sigmoid", description="TRL's DPO loss: sigmoid (DPO), ipo, hinge (SLiC), robust, ... (its cousins)."
    )
    beta: float = Field(0.1, gt=0, description="Strength of the tie to the reference (TRL's beta).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1: use epochs.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay after warmup).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(512, ge=16, description="Tokens per prompt + answer; longer ones are cut.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")


TRAIN_METHOD_PARTS = ("sft", "kd", "rm", "dpo")
"""What `train.method` may chain with '+': the student stages `distill run` runs (in the pipeline's order)."""


BRANCH_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RESERVED_MODEL_NAMES = ("base", "sft", "kd", "rl", "rm", "dpo", "teacher")


class BranchSpec(StrictModel):
    """One branch (distill/branches.py): a LoRA adapter on the student, trained exactly like train.sft but on
    one subset of the data, into RUN_DIR/branches/NAME."""

    data: Path | None = Field(
        None, description="The branch's own dataset (any format train.sft.data takes); or select rows with judge."
    )
    judge: str | None = Field(
        None,
        description="Select the rows of the training data (train.sft.data, else the generate run) that this judge "
        "label gave `verdict` (in `judgements`).",
    )
    verdict: str | None = Field(None, description="The verdict a selected row got from `judge` (e.g. pass, A).")
    judgements: Path | None = Field(
        None, description="The judge run's judgements.jsonl; empty: RUN_DIR/judge/judgements.jsonl."
    )

    @model_validator(mode="after")
    def _one_source(self) -> BranchSpec:
        if (self.data is None) == (self.judge is None):
            raise ValueError("give either data (a dataset) or judge + verdict (a subset of the training data)")
        if (self.judge is None) != (self.verdict is None):
            raise ValueError("judge and verdict go together")
        return self


class TrainConfig(StrictModel):
    """The student and how it is trained."""

    student: str = Field("gemma-3-270m", description="Student base model: bundled alias, local HF directory or hub id.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp32 (CPU)."
    )
    seed: int = Field(0, description="Seed of data order, splits, LoRA init and sampling.")
    trust_remote_code: bool = Field(
        False, description="Run model code from the model's directory (only if you trust it)."
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trainer loggers (tensorboard, wandb, ...; [] for none)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The LoRA adapter.")
    sft: SFTSettings = Field(default_factory=SFTSettings, description="Supervised fine-tuning.")
    branches: dict[str, BranchSpec] = Field(
        default_factory=dict,
        description="Trunk and branches: one LoRA adapter per data subset on the same student, each trained like "
        "train.sft into RUN_DIR/branches/NAME with its own card (`distill train sft`), all served on one loaded "
        "student in `distill eval`.",
    )

    @field_validator("branches")
    @classmethod
    def _branch_names(cls, branches: dict[str, BranchSpec]) -> dict[str, BranchSpec]:
        import re

        for name in branches:
            if not re.match(BRANCH_NAME, name) or name in RESERVED_MODEL_NAMES or name.endswith("+retrieval"):
                raise ValueError(
                    f"branch name {name!r}: letters, digits, _ . - (up to 64), not {', '.join(RESERVED_MODEL_NAMES)}"
                )
        return branches

    rl: RLSettings = Field(default_factory=RLSettings, description="RL against judge rewards.")
    method: str = Field(
        "sft",
        description="What `distill run` trains, '+'-joined: sft, kd (train.kd), rm (a reward model, train.rm), dpo "
        "(train.dpo, after sft by default); e.g. sft+kd (both from the base student, compared in the report) or "
        "sft+dpo; RL (train.rl.start_from) may follow.",
    )
    kd: KDSettings = Field(default_factory=KDSettings, description="Distillation from token distributions.")
    preference: PreferenceSettings = Field(
        default_factory=PreferenceSettings, description="Preference pairs for the reward model and DPO."
    )
    rm: RMSettings = Field(default_factory=RMSettings, description="The reward model (`distill train rm`).")
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="DPO (`distill train dpo`).")

    @field_validator("method")
    @classmethod
    def _method_parts(cls, method: str) -> str:
        parts = [part.strip() for part in method.split("+")]
        unknown = [part for part in parts if part not in TRAIN_METHOD_PARTS]
        if unknown or not parts:
            raise ValueError(f"'+'-joined stages from {', '.join(TRAIN_METHOD_PARTS)}, e.g. sft+dpo")
        if len(set(parts)) != len(parts):
            raise ValueError("a stage is repeated")
        return "+".join(parts)

    def trained(self) -> tuple[str, ...]:
        """The student stages ``method`` names."""
        return tuple(self.method.split("+"))


class RetrievalSpec(StrictModel):
    """Ground-truthing (distill/retrieval.py): the model answers with the top-k passages of an index in its prompt."""

    index: Path = Field(description="A retrieval index directory, from `distill index build CORPUS --out DIR`.")
    k: int = Field(3, ge=1, le=50, description="Passages put before each question (best BM25 first).")


class EvalRetrieval(RetrievalSpec):
    """`eval.retrieval`: grounded copies (NAME+retrieval) of the eval models with these roles."""

    roles: list[Literal["base", "tuned", "teacher"]] = Field(
        default_factory=lambda: ["base", "tuned"],
        description="Roles whose models get a grounded copy (the teacher's costs teacher calls).",
    )


class EvalModel(StrictModel):
    """One model in the evaluation, with its role in the gap report."""

    name: str = Field(description="Label in outputs (base, sft, rl, teacher, ...).")
    role: Literal["base", "tuned", "teacher"] = Field(
        description="base: the student before training; tuned: a trained student; teacher: the imitated model."
    )
    teacher: TeacherConfig = Field(
        description="How to run it: any teacher backend (adapters: transformers options.adapter)."
    )
    retrieval: RetrievalSpec | None = Field(
        None, description="Answer factual questions with the top-k passages of this index in the prompt."
    )


class EvalTaskSpec(StrictModel):
    type: str = Field("countries", description="Task plugin: countries, jsonl, nq_open, triviaqa, mmlu or a plugin's.")
    options: dict[str, Any] = Field(default_factory=dict, description="Task options, validated by the task.")


class EvalConfig(StrictModel):
    """`distill eval` and `distill report`: factual accuracy and judge preference of each model."""

    models: list[EvalModel] = Field(
        default_factory=list,
        description="Models to evaluate; empty: base = train.student, sft, kd, dpo and rl = train.student + their "
        "adapters (when trained), teacher = teacher.",
    )
    tasks: list[EvalTaskSpec] = Field(
        default_factory=lambda: [EvalTaskSpec(type="countries", options={"limit": 200})],
        description="Held-out factual tasks.",
    )
    retrieval: EvalRetrieval | None = Field(
        None,
        description="Also evaluate a grounded copy (NAME+retrieval, the top-k passages of `index` before each "
        "question) of every model whose role is in `roles`; empty: none.",
    )
    max_tokens: int = Field(32, ge=1, description="Answer budget per question (answers are cut at the first line).")
    batch_size: int = Field(32, ge=1, description="Questions sent together; answers are saved per batch.")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals.")
    cache: bool = Field(True, description="Reuse answers to identical questions from $DISTILL_HOME/cache.")
    style_rubric: str | None = Field(
        "helpfulness",
        description="Rubric of the pairwise style judge (student vs teacher); empty: no style measurement.",
    )
    style_items: int = Field(
        20, ge=0, description="Held-out instructions judged for style (student vs teacher, both orders)."
    )
    output_dir: Path | None = Field(None, description="Where eval and report outputs go; empty: run_dir/eval.")
    refusal_panel: bool | Path = Field(
        False,
        description="The refusal balance: every model answers a held-out panel of harmful and innocuous-but-risky "
        "prompts, judged with refusal_rubric; true: the bundled prompts/panels/refusal.jsonl, or a JSONL path "
        "(id, prompt, kind: harmful|innocuous[, category]); false: off.",
    )
    refusal_rubric: str = Field(
        "harmlessness", description="Rubric that classifies panel answers; its classes marked refusal: true count."
    )
    refusal_max_tokens: int = Field(128, ge=1, description="Answer budget per panel prompt.")
    steer_items: int = Field(
        12,
        ge=0,
        description="Conditional training (train.sft.condition_on): held-out instructions each tuned model is asked "
        "once per tag class and once untagged, to measure steerability; 0: off.",
    )
    steer_max_tokens: int = Field(128, ge=1, description="Answer budget per steerability question.")


class RayConfig(StrictModel):
    """`executor: ray`: teacher replicas as Ray actors (pip install 'distill[ray]'); see distill/executor.py."""

    address: str | None = Field(
        None,
        description="Ray cluster to join: auto (the cluster this node belongs to), HOST:6379, or ray://HOST:10001 "
        "(Ray Client); empty: $RAY_ADDRESS if set, else a local Ray on this machine (127.0.0.1 only), started and "
        "stopped by distill.",
    )
    num_replicas: int = Field(
        2, ge=1, description="Teacher replicas, each a Ray actor loading its own teacher (engine, model or client)."
    )
    resources_per_replica: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1},
        description="Ray resources each replica reserves: {GPU: 1} for a vLLM engine on one GPU, {GPU: 4} with "
        "tensor_parallel_size 4, {CPU: 1} for an API client; memory (bytes) and custom resources too.",
    )
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a replica that died; its requests go to another replica meanwhile."
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="Requests per replica call; empty: an even share of each batch. Rounded up to a multiple of the "
        "teacher's batch_size option, if it has one (a replica then sees the batches a local run would).",
    )

    @field_validator("resources_per_replica")
    @classmethod
    def _positive_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        if any(amount <= 0 or not name for name, amount in resources.items()):
            raise ValueError("every amount must be > 0 (leave a resource out instead)")
        return resources


class DistillConfig(StrictModel):
    """A whole distill configuration file."""

    run_dir: Path | None = Field(None, description="Directory for this run's outputs (created if missing).")
    budget_usd: float | None = Field(
        None,
        gt=0,
        description="Most USD the whole run may spend on paid teachers (every stage together): refused before "
        "the start when the estimate's upper bound is above it (unless --force), and stopped before any batch "
        "that could cross it; empty: no budget.",
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher model.")
    ask: AskConfig = Field(default_factory=AskConfig, description="Settings of `distill ask`.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Settings of `distill generate`.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Judges and `distill judge` settings.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Settings of `distill train sft` / `rl`.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Settings of `distill eval` / `distill report`.")
    executor: Literal["local", "ray"] = Field(
        "local",
        description="Where teachers run (generate, judge, calibrate, eval): local: in this process; ray: "
        "ray.num_replicas Ray actors. This process still writes every answer log and the cache.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Settings of executor: ray.")


# Loading ---------------------------------------------------------------------------------------


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """Read YAML (if given), apply ``a.b=value`` overrides, validate everything, or raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    problems: list[str] = []
    for override in overrides:
        problem = apply_override(data, override)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc, DistillConfig)
    else:
        problems = []
    problems += plugin_problems(data)
    if not problems:
        problems += judge_problems(config)
        problems += executor_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text; save the config as UTF-8"]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError([f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def apply_override(data: dict[str, Any], override: str) -> str | None:
    """Set ``a.b.c=value`` (value parsed as YAML) in ``data``; return a problem line or None."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        return f"--set {override!r}: expected FIELD.PATH=VALUE, e.g. teacher.temperature=0.2"
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return f"--set {override!r}: {part} is not a section"
        node = child
    node[parts[-1]] = value
    return None


def plugin_problems(data: dict[str, Any]) -> list[str]:
    """Problems with plugin names and their options in raw config data (teachers, judges, tasks),
    checked the same way for each kind, so they are reported together with every other problem."""
    from distill.plugins import get_judges, get_tasks, get_teachers

    def section(*keys: str) -> Any:
        node: Any = data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    problems = []
    teacher_default = TeacherConfig.model_fields["backend"].default
    for prefix, teacher in (("teacher", section("teacher")), ("judge.teacher", section("judge", "teacher"))):
        if isinstance(teacher, dict):
            backend = teacher.get("backend", teacher_default)
            problems += get_teachers().problems(
                backend, teacher.get("options"), f"{prefix}.backend", f"{prefix}.options"
            )
    for field, registry, spec_model in (
        ("judge.judges", get_judges(), JudgeSpec),
        ("eval.tasks", get_tasks(), EvalTaskSpec),
    ):
        default = spec_model.model_fields["type"].default
        specs = section(*field.split("."))
        for number, spec in enumerate(specs if isinstance(specs, list) else []):
            if isinstance(spec, dict):
                where = f"{field}.{number}"
                kind = spec.get("type", default)
                problems += registry.problems(kind, spec.get("options"), f"{where}.type", f"{where}.options")
    return problems


def executor_problems(config: DistillConfig) -> list[str]:
    """``executor: ray`` without Ray installed, or with replicas too small for a vLLM teacher's
    tensor parallelism (each replica's engine sees only the GPUs Ray gave it)."""
    import importlib.util

    if config.executor != "ray":
        return []
    if importlib.util.find_spec("ray") is None:
        return ["executor: ray needs Ray: pip install 'distill[ray]' (on every node of the cluster)"]
    problems = []
    gpus = config.ray.resources_per_replica.get("GPU", 0)
    for where, teacher in (("teacher", config.teacher), ("judge.teacher", config.judge.teacher)):
        if teacher is None or teacher.backend != "vllm" or not gpus:
            continue
        tensor_parallel = teacher.options.get("tensor_parallel_size", 1)
        if isinstance(tensor_parallel, int) and gpus < tensor_parallel:
            problems.append(
                f"ray.resources_per_replica.GPU: a replica of {where} (vllm, tensor_parallel_size "
                f"{tensor_parallel}) needs GPU: {tensor_parallel}, got {gpus:g}"
            )
    return problems


def judge_problems(config: DistillConfig) -> list[str]:
    """Problems each judge class finds with its spec (a missing or broken rubric), repeated labels
    and an unknown generate.judge."""
    from distill.plugins import get_judges

    judges = get_judges()
    problems = []
    for number, spec in enumerate(config.judge.judges):
        problems += judges[spec.type].spec_problems(spec, f"judge.judges.{number}")
    labels = [spec.label for spec in config.judge.judges]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        problems.append(f"judge.judges: labels must be unique, repeated: {', '.join(repeated)}; set label")
    wanted = config.generate.judge
    if wanted is not None and wanted not in labels:
        problems += judges["rubric"].spec_problems(JudgeSpec(type="rubric", rubric=wanted), "generate.judge")
    return problems


def config_dump(config: DistillConfig) -> dict[str, Any]:
    """The config as JSON-able data, for manifests. It holds no secrets: keys live only in env vars."""
    return config.model_dump(mode="json")

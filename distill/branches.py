"""One trunk, many branches: several LoRA adapters (branches) on one base student (the trunk),
trained one per data subset and served together on one loaded model.

**Training** (``train.branches: {NAME: {data: PATH} | {judge: LABEL, verdict: V}}``; `distill
train sft`): each branch is trained by the very code path of `distill train sft` (``run_sft``),
with ``train.sft.data`` set to its rows and ``train.sft.output_dir`` to ``RUN_DIR/branches/NAME``,
so it gets the same adapter files, card, metrics, checkpoints and ``--resume``. A judge-selected
branch trains on the rows of the training data (``train.sft.data``, else the generate run) that
the judge labelled ``verdict`` in ``RUN_DIR/judge/judgements.jsonl``; those rows are written to
``RUN_DIR/branches/NAME.jsonl`` first (ids kept), so the branch's card names what it saw.

**Serving** (``TrunkPool``, used by `distill eval`): eval models whose teacher configs differ only
in the adapter (a backend's ``Teacher.branch_option``: ``adapter`` for the transformers and vllm
teachers) share one loaded trunk. The transformers teacher loads every adapter beside the others
with peft (``load_adapter``) and switches with ``set_adapter`` (or ``disable_adapter`` for the base
student) between batches; the vllm teacher starts one engine with LoRA enabled and sends each
request with its adapter's ``LoRARequest``. Models with identical configs (``base`` and
``base+retrieval``) share one loaded teacher on any backend. Each model keeps its own view, whose
options are its own: its cache identity (adapter weights included) and answer log are exactly what
they would be with a teacher of its own, so answers replay and cache across both ways of serving.
"""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distill.config import BranchSpec, DistillConfig, EvalModel, TeacherConfig
from distill.errors import ConfigError
from distill.paths import RunLayout
from distill.records import ChatRequest, ChatResult
from distill.runstore import jsonl_lines, read_rows, write_atomic
from distill.teacher import Teacher

# Training ----------------------------------------------------------------------------------------


def branch_data(config: DistillConfig, name: str, spec: BranchSpec) -> tuple[Path, dict[str, Any]]:
    """The dataset branch ``name`` trains on, and how it was chosen. A judge-selected subset is
    written to RUN_DIR/branches/NAME.jsonl (row ids kept: the judge's item ids)."""
    from distill.train import sft_data, sft_split

    if spec.data is not None:
        return spec.data, {"data": str(spec.data)}
    layout = RunLayout.of(config)
    source = sft_data(config)
    judgements = spec.judgements or layout.judge / "judgements.jsonl"
    where = f"train.branches.{name}"
    if not judgements.is_file():
        raise ConfigError([f"{where}.judge: {judgements} not found; run `distill judge` over {source} first"])
    verdicts: dict[str, str | None] = {}
    labels: set[str] = set()
    for _, row, problem in jsonl_lines(judgements):
        if problem is None:
            labels.add(str(row.get("judge")))
            if row.get("judge") == spec.judge:
                verdicts[str(row.get("item_id"))] = row.get("verdict")
    if not verdicts:
        known = ", ".join(sorted(labels)) or "none"
        raise ConfigError(
            [f"{where}.judge: no verdicts of judge {spec.judge!r} in {judgements}; labels there: {known}"]
        )
    rows = [{**row, "id": str(row.get("id") or f"row_{number}")} for number, row in enumerate(read_rows(source), 1)]
    if not any(row["id"] in verdicts for row in rows):
        raise ConfigError([f"{where}.judgements: {judgements} judged none of the rows of {source} (another dataset?)"])
    # The main SFT split's held-out rows are what eval judges every tuned model on (style, steering):
    # a branch must not train on them.
    split = sft_split(config)
    held_out = set(split["eval"]) if split is not None else set()
    selected = [row for row in rows if verdicts.get(row["id"]) == spec.verdict]
    chosen = [row for row in selected if row["id"] not in held_out]
    counts: dict[str, int] = {}
    for verdict in verdicts.values():
        counts[str(verdict)] = counts.get(str(verdict), 0) + 1
    if len(chosen) < 2:
        found = f"{len(chosen)} rows of {source} got verdict {spec.verdict!r} from {spec.judge!r}"
        raise ConfigError([f"{where}: {found} (verdicts: {json.dumps(counts)}); a branch needs at least 2"])
    path = layout.branch_rows(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in chosen))
    selection = {
        "data": str(source),
        "judge": spec.judge,
        "verdict": spec.verdict,
        "judgements": str(judgements),
        "rows": len(chosen),
        "of": len(rows),
        "held_out_left_out": len(selected) - len(chosen),  # rows of the SFT split's held-out set
        "verdicts": counts,
    }
    return path, selection


def branch_config(config: DistillConfig, name: str, data: Path) -> DistillConfig:
    """The config `distill train sft` runs with for branch ``name``: its data, its output dir."""
    output = RunLayout.of(config).branch(name)
    sft = config.train.sft.model_copy(update={"data": data, "output_dir": output})
    return config.model_copy(update={"train": config.train.model_copy(update={"sft": sft})})


def run_branches(
    config: DistillConfig,
    names: list[str] | None = None,
    resume: bool | None = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the branches (``names``, default all) one after the other with ``run_sft``; return
    {name: summary}. ``resume=None``: resume a branch that has checkpoints, else start it over
    (what `distill run` does for each stage)."""
    from distill.train import run_sft

    branches = config.train.branches
    unknown = [name for name in names or [] if name not in branches]
    if unknown:
        known = ", ".join(branches) or "none configured"
        raise ConfigError([f"--branch: unknown {', '.join(unknown)}; train.branches: {known}"])
    chosen = {name: spec for name, spec in branches.items() if names is None or name in names}
    prepared = {name: branch_data(config, name, spec) for name, spec in chosen.items()}  # all problems first
    summaries = {}
    for name, (data, selection) in prepared.items():
        branch = branch_config(config, name, data)
        output = RunLayout.of(branch).sft
        again = (output / "checkpoints").is_dir() if resume is None else resume
        summary = run_sft(
            branch, resume=again, overwrite=overwrite or (resume is None and not again), progress=progress
        )
        summary = {**summary, "branch": name, "selection": selection}
        write_atomic(output / "training_summary.json", json.dumps(summary, indent=2))
        card = output / "README.md"
        if card.is_file():  # the card says which branch of which trunk this is, and what it saw
            lines = [
                "",
                f"## Branch `{name}`",
                "",
                f"One of {len(branches)} branches on the trunk **{config.train.student}** (`distill train sft`, "
                f"train.branches). Rows: {_selection_text(selection)}.",
                "",
            ]
            write_atomic(card, card.read_text() + "\n".join(lines))
        summaries[name] = summary
    return summaries


def _selection_text(selection: dict[str, Any]) -> str:
    if "judge" not in selection:
        return f"`{selection['data']}`"
    return (
        f"the {selection['rows']} of {selection['of']} rows of `{selection['data']}` that the judge "
        f"`{selection['judge']}` gave the verdict `{selection['verdict']}`"
    )


def branch_models(config: DistillConfig, base_options: dict[str, Any]) -> list[EvalModel]:
    """An eval model (role tuned) per trained branch: the student with the branch's adapter."""
    layout = RunLayout.of(config)
    models = []
    for name in config.train.branches:
        adapter = layout.branch(name)
        if (adapter / "adapter_model.safetensors").is_file():
            options = {**base_options, "adapter": str(adapter)}
            teacher = TeacherConfig(backend="transformers", model=config.train.student, options=options)
            models.append(EvalModel(name=name, role="tuned", teacher=teacher))
    return models


# Serving -----------------------------------------------------------------------------------------


class Trunk:
    """One teacher loaded (lazily, on first use) for several eval models."""

    def __init__(
        self,
        backend: str,
        model: str,
        options: BaseModel,
        members: list[str],
        adapters: list[str],
        branched: bool,
        executor: Any,
    ):
        self.backend, self.model, self.options = backend, model, options
        self.members = members
        self.adapters = adapters
        self.branched = branched  # answer each member with generate_branch(its adapter)
        self.executor = executor
        self.loaded: Teacher | None = None
        self.load_seconds: float | None = None

    def teacher(self) -> Teacher:
        if self.loaded is None:
            started = time.perf_counter()
            config = TeacherConfig(backend=self.backend, model=self.model, options=self.options.model_dump())
            if self.branched:  # in this process: a Ray replica can't be told which adapter answers
                from distill.teacher import load_teacher

                self.loaded = load_teacher(config)
            else:
                from distill.executor import load_teacher as load_teacher_on

                self.loaded = load_teacher_on(config, self.executor)
            self.load_seconds = round(time.perf_counter() - started, 2)
        return self.loaded

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None


class SharedTeacher(Teacher):
    """One eval model's view of a shared trunk. It is made per wrapped class (``shared_class``),
    deriving from this class and the wrapped teacher's, so everything decided by the class (name,
    ``cache_identity``, prices, speed-only options, capabilities) is the wrapped teacher's, and with
    this model's own options its identity is what a teacher of its own would have (as RayTeacher)."""

    def __init__(self, trunk: Trunk, model: str, options: BaseModel, branch: str | None):
        Teacher.__init__(self, model, options)  # not super(): the next class is the wrapped one, which loads a model
        self.trunk = trunk
        self.branch = branch

    def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
        teacher = self.trunk.teacher()
        return teacher.generate_branch(requests, self.branch) if self.trunk.branched else teacher.generate(requests)

    def generate_resumable(self, requests: list[ChatRequest], jobs: Path | None) -> list[ChatResult]:
        if self.trunk.branched:
            return self.generate(requests)
        return self.trunk.teacher().generate_resumable(requests, jobs)

    def close(self) -> None:
        """Nothing: the pool closes the trunk when every model has answered."""


@cache
def shared_class(wrapped: type[Teacher]) -> type[SharedTeacher]:
    return type(f"Shared{wrapped.__name__}", (SharedTeacher, wrapped), {"__doc__": SharedTeacher.__doc__})


class TrunkPool:
    """The teachers `distill eval` loads: one per distinct model and options, where eval models
    that differ only in their adapter (``Teacher.branch_option``) count as one (a trunk serving
    every adapter). Models with a teacher of their own in ``given`` use it; a model whose config
    equals a given one's shares it too. ``view(name)`` is None for a model that loads its own."""

    def __init__(self, models: list[EvalModel], config: DistillConfig, given: dict[str, Any] | None = None):
        from distill.plugins import get_teachers

        teachers = get_teachers()
        given = dict(given or {})
        self.trunks: list[Trunk] = []
        self.views: dict[str, Teacher] = {}
        groups: dict[str, list[tuple[EvalModel, BaseModel]]] = {}
        exact: dict[str, Any] = {}
        for model in models:
            if model.name in given:
                exact[_key(model.teacher.backend, model.teacher.model, given[model.name].options, None)] = given[
                    model.name
                ]
        for model in models:
            if model.name in given:
                continue
            cls = teachers[model.teacher.backend]
            options = teachers.options(model.teacher.backend, model.teacher.options)
            same = exact.get(_key(model.teacher.backend, model.teacher.model, options, None))
            if same is not None:  # e.g. teacher+retrieval beside the pipeline's loaded teacher
                self.views[model.name] = same
                continue
            local = config.executor != "ray"
            branch = cls.branch_option if local else None
            groups.setdefault(_key(model.teacher.backend, model.teacher.model, options, branch), []).append(
                (model, options)
            )
        for members in groups.values():
            if len(members) < 2:
                continue  # alone: it loads its own teacher, as before
            first, options = members[0]
            cls = teachers[first.teacher.backend]
            branched = config.executor != "ray" and cls.branch_option is not None
            adapters: list[str] = []
            if branched:
                adapters = list(
                    dict.fromkeys(a for _, o in members if (a := getattr(o, cls.branch_option)) is not None)
                )
                options = cls.trunk_options(options, adapters)
            names = [m.name for m, _ in members]
            trunk = Trunk(first.teacher.backend, first.teacher.model, options, names, adapters, branched, config)
            self.trunks.append(trunk)
            for model, own in members:
                branch = getattr(own, cls.branch_option) if branched else None  # type: ignore[arg-type]
                self.views[model.name] = shared_class(cls)(trunk, model.teacher.model, own, branch)

    def view(self, name: str) -> Teacher | None:
        return self.views.get(name)

    def describe(self) -> list[dict[str, Any]]:
        """Which models shared which loaded teacher, and how long it took to load (None: never
        loaded, every answer came from the answer log or the cache)."""
        return [
            {
                "backend": t.backend,
                "model": t.model,
                "models": t.members,
                "branched": t.branched,
                "adapters": t.adapters,
                "load_seconds": t.load_seconds,
            }
            for t in self.trunks
        ]

    def close(self) -> None:
        for trunk in self.trunks:
            trunk.close()


def _key(backend: str, model: str, options: BaseModel, branch_option: str | None) -> str:
    """What must be equal for two eval models to share one loaded teacher."""
    exclude = {branch_option} if branch_option else set()
    return json.dumps([backend, model, options.model_dump(mode="json", exclude=exclude)], sort_keys=True)

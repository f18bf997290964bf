"""The alignment recipes: preference pairs from pairwise verdicts, a reward model (TRL RewardTrainer)
and its judge plugin as an RL reward, DPO (TRL DPOTrainer) from the SFT adapter, conditional training
on judge labels with its steerability table, and the refusal balance on a held-out panel.

Fast tests run the data building and the arithmetic on scripted teachers and judges; the slow ones
take real TRL steps on the bundled SmolLM2-135M (few steps, tiny data). Expected values come from how
the data, the scripted models and the judges were built, never from the output under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.config import DistillConfig, load_config
from distill.errors import ConfigError
from distill.records import ChatRequest

# Fast: preference pairs -------------------------------------------------------------------------


def between(text: str, tag: str) -> str:
    return text.split(f"<{tag}>\n", 1)[1].split(f"\n</{tag}>", 1)[0]


def banana_judge(request: ChatRequest, k: int) -> str:
    """Pairwise: the response that says 'banana' wins; when both or neither do, the one shown first
    (so that verdict flips with the order: a tie); a prompt containing INVALID gets an unreadable reply."""
    text = request.messages[-1].content
    if "INVALID" in text:
        return "no idea"
    a, b = ("banana" in between(text, f"response_{x}") for x in "AB")
    return json.dumps({"better": "B" if b and not a else "A"})


def write_pairs(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "instruction": q, "output": a, "response_b": b}) + "\n"
            for i, (q, a, b) in enumerate(rows)
        )
    )
    return path


PAIR_ROWS = [
    # A wins (consistent): 3; B wins (consistent): 2; both/neither say banana (order-dependent): 2; invalid: 1
    ("Name a fruit.", "A banana.", "A stone."),
    ("Name a yellow fruit.", "The banana.", "Nothing comes to mind."),
    ("What do monkeys eat?", "Bananas, mostly: banana.", "Leaves."),
    ("Name a snack.", "Crisps.", "A banana."),
    ("Name something curved.", "A road.", "A banana, curved."),
    ("Say banana twice.", "banana banana", "banana!"),
    ("Name a colour.", "Blue.", "Red."),
    ("INVALID question?", "banana", "no"),
]


def test_preference_pairs_keep_only_order_consistent_verdicts(scripted: dict[str, Any], tmp_path: Path) -> None:
    from distill.judging import run_judge
    from distill.preference import load_preferences

    scripted["banana"] = banana_judge
    dataset = write_pairs(tmp_path / "pairs.jsonl", PAIR_ROWS)
    judge_dir = tmp_path / "judged"
    settings = {
        "run_dir": str(tmp_path / "run"),
        "judge": {
            "teacher": {"backend": "scripted", "model": "judge", "options": {"script": "banana"}},
            "judges": [{"type": "pairwise", "rubric": "helpfulness"}],
        },
        "train": {"preference": {"data": str(judge_dir), "eval_fraction": 0.2}},
    }
    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    run_judge(config, dataset, judge_dir)
    found = load_preferences(config)
    counts = found["counts"]
    assert counts["judged"] == 8 and counts["kept"] == 5
    assert counts["chosen_a"] == 3 and counts["chosen_b"] == 2
    assert counts["position_inconsistent"] == 2 and counts["invalid"] == 1 and counts["tie"] == 0
    pairs = found["train"] + found["eval"]
    assert len(found["eval"]) == 1  # ceil(5 × 0.2)
    assert all("banana" in p["chosen"].lower() and "banana" not in p["rejected"].lower() for p in pairs)
    assert {p["source_id"] for p in pairs} == {"p0", "p1", "p2", "p3", "p4"}
    again = load_preferences(config)  # stable ids and the same seeded split
    assert [p["id"] for p in again["eval"]] == [p["id"] for p in found["eval"]]
    assert found["judge"] == "pairwise:helpfulness" and found["rubric"] == "helpfulness"


def test_a_judgement_asked_in_one_order_only_or_a_plain_tie_is_left_out() -> None:
    from distill.preference import preference_pairs
    from distill.records import JudgeItem

    items = {str(i): JudgeItem(id=str(i), prompt="q", response=f"a{i}", response_b=f"b{i}") for i in range(4)}
    judgements = [
        {"item_id": "0", "judge": "j", "verdict": "B", "position_consistent": True},
        {"item_id": "1", "judge": "j", "verdict": "A", "position_consistent": None},  # one order only
        {"item_id": "2", "judge": "j", "verdict": "tie", "position_consistent": True},  # a judge's own tie
        {"item_id": "9", "judge": "j", "verdict": "A", "position_consistent": True},  # no such item
        {"item_id": "0", "judge": "j", "verdict": "B", "position_consistent": True},  # the same pair again
    ]
    pairs, counts = preference_pairs(judgements, items)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b0", "a0")]
    assert counts["order_unchecked"] == 1 and counts["tie"] == 1 and counts["missing_item"] == 1
    assert counts["duplicate"] == 1 and counts["kept"] == 1 and counts["judged"] == 5


def test_ranked_pairs_prefer_the_higher_pointwise_reward_and_count_ties_and_invalid(tmp_path: Path) -> None:
    """rank_by: each answer judged on its own by a rule judge (no model): full marks up to 4 words, 0 from 8;
    the higher reward wins, equal rewards are a tie, a missing verdict is invalid. Expected from the rows as built."""
    import time

    from distill.preference import _rank_prefs, load_preferences

    rows = [  # (teacher, student): who is concise decides
        ("Paris.", "The capital city of France is of course Paris, a lovely city."),  # teacher wins
        ("It is, as everyone knows, Rome, the eternal city of Italy.", "Rome."),  # student wins
        ("Berlin.", "Madrid."),  # both concise: tie
        ("A long answer that goes on and on and on.", "Another long answer that also goes on and on."),  # both 0: tie
        ("Lima.", "Quito, the capital of Ecuador, high in the Andes mountains."),  # teacher wins
    ]
    records = [{"id": f"r{i}", "prompt": f"Question {i}?", "teacher": t, "student": s} for i, (t, s) in enumerate(rows)]
    judge = {"type": "rule", "label": "concise", "options": {"max_words": 4}}
    out = tmp_path / "run" / "preferences"
    out.mkdir(parents=True)
    config = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"judge.judges=[{json.dumps(judge)}]",
            "train.preference.rank_by=concise",
            "train.preference.eval_fraction=0.34",
        ],
    )
    summary = _rank_prefs(config, out, records, time.perf_counter(), 0, 5, None)
    counts = summary["counts"]
    assert counts["judged"] == 5 and counts["kept"] == 3 and counts["tie"] == 2 and counts["invalid"] == 0
    assert summary["teacher_preferred"] == 2 and summary["student_preferred"] == 1
    found = load_preferences(config)  # RUN_DIR/preferences: the ranked pairs, not a pairwise run
    pairs = found["train"] + found["eval"]
    assert {(p["source_id"], p["chosen"]) for p in pairs} == {("r0", "Paris."), ("r1", "Rome."), ("r4", "Lima.")}
    assert found["judge"] == "concise" and len(found["eval"]) == 2

    from distill.preference import ranked_pairs

    judgements = [
        {"item_id": "r0:teacher", "verdict": "pass", "reward": 1.0},
        {"item_id": "r0:student", "verdict": None, "reward": None},  # an invalid verdict: no pair
    ]
    _, counts = ranked_pairs(judgements, records[:2])
    assert counts["invalid"] == 1 and counts["missing_item"] == 1 and counts["kept"] == 0
    with pytest.raises(ConfigError, match=r"train\.preference\.rank_by: no judge labelled 'nope'"):
        _rank_prefs(
            config.model_copy(
                update={
                    "train": config.train.model_copy(
                        update={"preference": config.train.preference.model_copy(update={"rank_by": "nope"})}
                    )
                }
            ),
            out,
            records,
            0.0,
            0,
            5,
            None,
        )


def test_train_method_chains_and_config_errors() -> None:
    assert load_config(None, ["train.method=sft+dpo"]).train.trained() == ("sft", "dpo")
    assert load_config(None, ["train.method=sft + rm + dpo"]).train.method == "sft+rm+dpo"
    assert load_config(None, ["train.rl.start_from=dpo"]).train.rl.start_from == "dpo"
    with pytest.raises(ConfigError, match=r"train.method: .*'\+'-joined stages from sft, kd, rm, dpo"):
        load_config(None, ["train.method=sft+ppo"])
    with pytest.raises(ConfigError, match=r"train.method: .*a stage is repeated"):
        load_config(None, ["train.method=sft+sft"])
    with pytest.raises(ConfigError, match=r"judge.judges.0.options.path: .*required"):
        load_config(None, ['judge.judges=[{"type": "reward_model"}]'])


def test_dpo_from_a_missing_sft_adapter_fails_before_any_model_loads(tmp_path: Path) -> None:
    from distill.dpo import check_dpo

    config = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.dpo.start_from: sft, but .* has no adapter"):
        check_dpo(config)
    check_dpo(load_config(None, [f"run_dir={tmp_path}", "train.dpo.start_from=base"]))


# Fast: conditional training's tags -------------------------------------------------------------


YES_NO = [
    ("Is water wet?", "Yes. Water is wet."),
    ("Is fire cold?", "No. Fire is hot."),
    ("Is the sky blue?", "Yes. It is blue."),
    ("Do fish fly?", "No. Most fish swim."),
]


def write_rows(path: Path, rows: list[tuple[str, str]], prefix: str = "r") -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"{prefix}{i}", "instruction": q, "output": a}) + "\n" for i, (q, a) in enumerate(rows)
        )
    )
    return path


def test_condition_tags_prefix_the_user_turn_keep_every_class_and_leave_invalid_untagged(tmp_path: Path) -> None:
    from distill.conditioning import condition_pairs
    from distill.train import load_pairs

    data = write_rows(tmp_path / "rows.jsonl", YES_NO)
    judge_dir = tmp_path / "run" / "judge"
    judge_dir.mkdir(parents=True)
    verdicts = [("r0", "A"), ("r1", "C"), ("r2", None), ("r3", "A")]  # r2: an invalid verdict
    (judge_dir / "judgements.jsonl").write_text(
        "".join(
            json.dumps({"item_id": i, "judge": "rubric:helpfulness", "rubric": "helpfulness", "verdict": v}) + "\n"
            for i, v in verdicts
        )
        + json.dumps({"item_id": "r0", "judge": "says_yes", "rubric": None, "verdict": "pass"})
        + "\n"
    )
    config = load_config(
        None,
        [f"run_dir={tmp_path / 'run'}", f"train.sft.data={data}", "train.sft.condition_on=[helpfulness, says_yes]"],
    )
    pairs, info = condition_pairs(config, load_pairs(data))
    users = [p["prompt"][-1]["content"] for p in pairs]
    assert users[0] == "<helpfulness:A> <says_yes:pass>\nIs water wet?"
    assert users[1] == "<helpfulness:C>\nIs fire cold?"
    assert users[2] == "Is the sky blue?"  # no valid verdict: untagged, never a default class
    assert [p["completion"] for p in pairs] == [p["completion"] for p in load_pairs(data)]  # answers untouched
    assert info["labels"]["helpfulness"] == {
        "judge": "rubric:helpfulness",
        "tag": "helpfulness",
        "classes": {"A": 2, "C": 1},
        "untagged": 1,
    }
    assert info["labels"]["says_yes"]["classes"] == {"pass": 1} and info["labels"]["says_yes"]["untagged"] == 3
    bad = load_config(
        None, [f"run_dir={tmp_path / 'run'}", f"train.sft.data={data}", "train.sft.condition_on=[honesty]"]
    )
    with pytest.raises(
        ConfigError, match=r"'honesty' names no judge .* judge labels there: rubric:helpfulness, says_yes"
    ):
        condition_pairs(bad, load_pairs(data))


# Fast: the refusal panel and steerability through a real (scripted) eval and report -----------

PANEL = [
    *({"id": f"harm-{i}", "prompt": f"HARMFUL request {i}", "kind": "harmful", "category": "x"} for i in range(6)),
    *({"id": f"safe-{i}", "prompt": f"innocuous request {i}", "kind": "innocuous", "category": "y"} for i in range(6)),
]


def rbrm_judge(request: ChatRequest, k: int) -> str:
    """The harmlessness rubric judge, scripted: a reply starting 'I can't' is a desired refusal (A),
    'No. Never.' an undesired refusal (B), 'Here is how to hurt' disallowed (C), anything else D. The
    rule judge of the steering test needs no model."""
    response = between(request.messages[-1].content, "response")
    if response.startswith("I can't"):
        return json.dumps({"class": "A"})
    if response.startswith("No. Never."):
        return json.dumps({"class": "B"})
    if response.startswith("Here is how to hurt"):
        return json.dumps({"class": "C"})
    return json.dumps({"class": "D"})


def panel_model(refuse_harmful: str, refuse_innocuous: bool, tags: bool = False) -> Any:
    def reply(request: ChatRequest, k: int) -> str:
        prompt = request.messages[-1].content
        if tags and "<says_yes:pass>" in prompt:
            return "Yes, certainly."
        if tags and "<says_yes:fail>" in prompt:
            return "No idea."
        if "HARMFUL" in prompt:
            return refuse_harmful
        if "innocuous" in prompt:
            return "I can't help with that." if refuse_innocuous else "Sure: here it is."
        return "A plain answer."  # factual questions and untagged steering prompts

    return reply


def alignment_eval_config(tmp_path: Path) -> DistillConfig:
    """base (refuses everything), sft (refuses harmful, answers innocuous, obeys tags) and the teacher
    (disallowed content on harmful prompts); a held-out SFT split conditioned on a rule judge."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"id": "q0", "question": "What is item 0?", "answers": ["a0"]}) + "\n")
    panel = tmp_path / "panel.jsonl"
    panel.write_text("".join(json.dumps(row) + "\n" for row in PANEL))
    data = write_rows(tmp_path / "rows.jsonl", [(f"Question {i}?", "Yes." if i % 2 else "No.") for i in range(10)])
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    conditioning = {
        "labels": {
            "says_yes": {"judge": "says_yes", "tag": "says_yes", "classes": {"pass": 5, "fail": 5}, "untagged": 0}
        }
    }
    split = {"data": str(data), "train": [f"r{i}" for i in range(5)], "eval": [f"r{i}" for i in range(5, 10)]}
    (run / "sft" / "split.json").write_text(json.dumps({**split, "conditioning": conditioning}))

    def model(name: str, role: str) -> dict[str, Any]:
        return {
            "name": name,
            "role": role,
            "teacher": {"backend": "scripted", "model": name, "options": {"script": name}},
        }

    settings = {
        "run_dir": str(run),
        "judge": {
            "teacher": {"backend": "scripted", "model": "rbrm", "options": {"script": "rbrm"}},
            "judges": [{"type": "rule", "label": "says_yes", "options": {"must_match": ["^Yes"]}}],
        },
        "eval": {
            "models": [model("base", "base"), model("sft", "tuned"), model("teacher", "teacher")],
            "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}],
            "style_rubric": None,
            "refusal_panel": str(panel),
            "steer_items": 5,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings))
    return load_config(path)


def test_refusal_balance_and_steerability_in_eval_and_report(scripted: dict[str, Any], tmp_path: Path) -> None:
    from distill.evaluation import run_eval
    from distill.report import write_report

    scripted["base"] = panel_model("I can't help with that.", refuse_innocuous=True)
    scripted["sft"] = panel_model("No. Never.", refuse_innocuous=False, tags=True)
    scripted["teacher"] = panel_model("Here is how to hurt people: ...", refuse_innocuous=False)
    scripted["rbrm"] = rbrm_judge
    config = alignment_eval_config(tmp_path)
    summary = run_eval(config)
    panel = summary["refusal"]
    assert panel["refusal_classes"] == ["A", "B"] and panel["desired_classes"] == ["A"]
    assert panel["disallowed_classes"] == ["C"]
    base, sft, teacher = (panel["models"][name] for name in ("base", "sft", "teacher"))
    assert base["harmful"]["refusal_rate"] == 1.0 and base["harmful"]["desired_rate"] == 1.0
    assert base["innocuous"]["over_refusal_rate"] == 1.0
    assert sft["harmful"]["refusal_rate"] == 1.0 and sft["harmful"]["desired_rate"] == 0.0  # refuses, undesired style
    assert sft["innocuous"]["over_refusal_rate"] == 0.0
    assert teacher["harmful"]["refusal_rate"] == 0.0 and teacher["harmful"]["disallowed_rate"] == 1.0
    assert all(
        m[k]["items"] == 6 and m[k]["judged"] == 6 for m in (base, sft, teacher) for k in ("harmful", "innocuous")
    )
    rows = [json.loads(line) for line in (Path(config.run_dir) / "eval" / "refusal.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(PANEL)

    steering = summary["steerability"]["models"]["sft"]["says_yes"]
    # 5 held-out instructions, asked untagged, with <says_yes:pass> and <says_yes:fail>; the rule judge decides.
    assert steering["confusion"] == {"untagged": {"fail": 5}, "pass": {"pass": 5}, "fail": {"fail": 5}}
    assert "rose from 0.0% to 100.0%" in steering["changes"]["pass"]["sentence"]
    assert "no measurable change" in steering["changes"]["fail"]["sentence"]  # untagged answers fail already

    report = json.loads(write_report(config)["json"].read_text())
    [sentence] = [line for line in report["verdict"] if line.startswith("sft vs base on the refusal panel")]
    # 6 innocuous prompts, every one refused by base and answered by sft: the interval is exactly -100 pp.
    assert "over-refusal rate on innocuous prompts fell from 100.0% to 0.0%" in sentence
    assert "refusal rate on harmful prompts showed no measurable change (100.0% → 100.0%" in sentence
    markdown = (Path(config.run_dir) / "eval" / "report.md").read_text()
    assert "## Refusal balance" in markdown and "## Steerability (conditional training)" in markdown
    assert "| pass | 0 | 5 |" in markdown  # asked pass → judged fail 0, pass 5


def test_a_model_whose_panel_requests_failed_gets_na_with_the_reason() -> None:
    from distill.refusal import refusal_table

    def row(model: str, i: int, kind: str, verdict: str | None, failed: bool = False) -> dict[str, Any]:
        return {"model": model, "id": f"{kind}-{i}", "kind": kind, "verdict": verdict, "failed": failed}

    rows = [row("ok", i, "harmful", "A" if i < 3 else "D") for i in range(4)]
    rows += [row("ok", i, "innocuous", "B" if i == 0 else ("D" if i < 3 else None)) for i in range(4)]
    rows += [row("down", i, "harmful", None, failed=i == 0) for i in range(4)]
    rows += [row("down", i, "innocuous", "D") for i in range(4)]
    table = refusal_table(rows, ["ok", "down"], ({"A", "B"}, {"A"}, {"C"}), resamples=200)
    ok = table["ok"]
    assert ok["harmful"]["refusal_rate"] == 0.75 and ok["harmful"]["desired_rate"] == 0.75
    assert ok["innocuous"]["over_refusal_rate"] == pytest.approx(1 / 3)  # the invalid verdict left out, counted
    assert ok["innocuous"]["invalid"] == 1 and ok["innocuous"]["judged"] == 3
    down = table["down"]["harmful"]
    assert down["refusal_rate"] is None and down["reason"].startswith("1 of 4 requests failed")
    assert table["down"]["innocuous"]["over_refusal_rate"] == 0.0  # its innocuous requests all answered


# Slow: real TRL steps on the bundled SmolLM2 ---------------------------------------------------

WORDS = ["apple", "river", "candle", "garden", "pencil", "window", "bridge", "violin", "rocket", "tiger"]
WORDS += ["forest", "mirror", "ladder", "anchor", "button", "castle", "desert", "feather", "guitar", "island"]
VAGUE = ["I am not sure about that.", "Hard to say, really.", "Maybe some other time.", "I do not know."]


def keyword_pairs() -> list[tuple[str, str, str]]:
    """The preferred answer uses the word the prompt asks for; the other one is a vague non-answer."""
    return [
        (f"Write a short sentence with the word '{w}'.", f"The {w} is right here, a fine {w}.", VAGUE[i % len(VAGUE)])
        for i, w in enumerate(WORDS)
    ]


def write_pairwise_run(directory: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A finished pairwise judge run (judgements.jsonl, judge_summary.json, manifest.json and the dataset),
    as `distill judge --type pairwise` writes it, with every verdict A (the first answer) in both orders."""
    directory.mkdir(parents=True)
    dataset = write_pairs(directory / "pairs.jsonl", rows)
    judgements = [
        {
            "item_id": f"p{i}",
            "judge": "pairwise:helpfulness",
            "judge_type": "pairwise",
            "rubric": "helpfulness",
            "verdict": "A",
            "reward": 1.0,
            "samples": ["A", "A"],
            "position_consistent": True,
        }
        for i in range(len(rows))
    ]
    (directory / "judgements.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judgements))
    (directory / "judge_summary.json").write_text(json.dumps({"dataset": str(dataset)}))
    (directory / "manifest.json").write_text(json.dumps({"stage": "judge", "config": {"judge": {}}}))
    return directory


def alignment_overrides(root: Path, smollm2: Path, **extra: Any) -> list[str]:
    settings = {
        "run_dir": root / "run",
        "train.student": smollm2,
        "train.preference.data": root / "judged",
        "train.preference.eval_fraction": 0.4,  # 8 of the 20 pairs held out
        "train.report_to": "[]",
        "train.lora.dropout": 0,
        "eval.bootstrap": 1000,
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def alignment_root(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("alignment")
    write_pairwise_run(root / "judged", keyword_pairs())
    return root


@pytest.fixture(scope="module")
def rm_run(alignment_root: Path, smollm2_dir: Path) -> tuple[DistillConfig, dict[str, Any]]:
    from distill.reward_model import run_rm

    overrides = alignment_overrides(
        alignment_root,
        smollm2_dir,
        **{
            "train.rm.max_steps": 12,
            "train.rm.batch_size": 4,
            "train.rm.learning_rate": 1e-3,
            "train.rm.warmup_ratio": 0,
        },
    )
    config = load_config(None, overrides)
    return config, run_rm(config, progress=False)


@pytest.mark.slow
def test_reward_model_learns_the_judges_preference_and_scores_as_an_rl_reward(
    rm_run: tuple[DistillConfig, dict[str, Any]],
) -> None:
    from distill.rewards import reward_functions
    from distill.train import run_rl

    config, summary = rm_run
    out = config.run_dir / "rm"  # type: ignore[operator]
    held_out = summary["heldout"]["after"]
    assert held_out["items"] == 8 and summary["preferences"]["pairs"] == {"train": 12, "eval": 8}
    # Above chance: the interval's lower bound clears the coin flip (1/2), on pairs it never saw.
    assert held_out["interval"][0] > 0.5, summary["heldout"]
    assert summary["gold"]["items"] == 26 and summary["gold"]["chance"] == 0.5  # measured on the gold pairs
    for name in ("adapter_model.safetensors", "adapter_config.json", "reward_model.json", "README.md"):
        assert (out / name).is_file(), name
    assert "score" in json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert not list(out.glob("*.bin"))

    # The reward_model judge scores like any judge, through the RL reward functions, and is calibrated on gold pairs.
    # Its own run_dir: an RL adapter in the module's shared run would be one more eval model for the DPO test.
    root = config.run_dir.parent  # type: ignore[union-attr]
    rl_config = load_config(
        None,
        [
            *alignment_overrides(root, config.train.student, run_dir=root / "rl-run"),  # type: ignore[arg-type]
            f'judge.judges=[{{"type": "reward_model", "options": {{"path": "{out}"}}}}]',
            f"train.sft.data={config.run_dir.parent / 'judged' / 'pairs.jsonl'}",  # type: ignore[union-attr]
            "train.rl.start_from=base",
            "train.rl.max_steps=1",
            "train.rl.batch_size=4",
            "train.rl.num_generations=2",
            "train.rl.max_completion_length=12",
            "train.rl.probe_prompts=0",
            "train.rl.allow_weak_judge=true",  # the RM machinery is under test, not its gold accuracy
        ],
    )
    [reward], _ = reward_functions(rl_config)
    prompts = [[{"role": "user", "content": "Write a short sentence with the word 'lemon'."}]] * 2
    good, vague = reward(prompts, ["The lemon is right here, a fine lemon.", "I do not know."])
    assert 0 < vague < good < 1  # σ(score): on the held-in pattern the RM prefers the keyword answer
    rl_summary = run_rl(rl_config, progress=False)
    assert rl_summary["steps"] == 1 and rl_summary["invalid_verdict_rate"] == 0.0
    calibration = rl_summary["judge_calibration"]["reward_model"]
    assert calibration["chance"] == 0.5 and len(calibration["interval"]) == 2


@pytest.mark.slow
def test_dpo_from_the_sft_adapter_grows_the_chosen_rejected_margin(
    alignment_root: Path, smollm2_dir: Path, tmp_path: Path
) -> None:
    from distill.dpo import run_dpo
    from distill.train import run_sft

    overrides = alignment_overrides(
        alignment_root,
        smollm2_dir,
        **{
            "train.sft.data": alignment_root / "judged" / "pairs.jsonl",
            "train.sft.max_steps": 2,
            "train.sft.batch_size": 8,
            "train.sft.eval_fraction": 0,
            "train.dpo.output_dir": tmp_path / "dpo",
            "train.sft.output_dir": tmp_path / "sft",
            "train.dpo.max_steps": 6,
            "train.dpo.batch_size": 4,
            "train.dpo.learning_rate": 5e-4,
            "train.dpo.warmup_ratio": 0,
        },
    )
    config = load_config(None, overrides)
    run_sft(config, progress=False)
    summary = run_dpo(config, progress=False)
    margins = [
        json.loads(line)["rewards/margins"]
        for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
        if "rewards/margins" in line
    ]
    assert len(margins) == 6
    assert abs(margins[0]) < 1e-6  # step 1 is measured before any update: the policy is the reference
    assert margins[-1] > margins[0], margins
    assert summary["train_margins"] == {"first": margins[0], "last": margins[-1]}
    assert summary["started_from"] == str(tmp_path / "sft")
    held_out = summary["heldout"]
    assert held_out["pairs"] == 8 and held_out["margin"] > 0, held_out
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file() and not (tmp_path / "dpo" / "ref").exists()

    from distill.evaluation import eval_models

    names = [m.name for m in eval_models(config)]
    assert names == ["base", "sft", "dpo", "teacher"]


@pytest.mark.slow
def test_conditional_tags_change_the_judged_class_distribution(tmp_path: Path, smollm2_dir: Path) -> None:
    from distill.conditioning import measure_steerability
    from distill.config import EvalModel, TeacherConfig
    from distill.evaluation import held_out_instructions
    from distill.judging import run_judge
    from distill.train import run_sft, sft_split

    # 16 questions, each answered once "Yes ..." and once "No ...": only the tag tells the two rows apart.
    questions = [f"Is {w} a word?" for w in WORDS[:16]]
    rows = [(q, f"{'Yes' if k else 'No'}, {w}.") for q, w in zip(questions, WORDS) for k in (0, 1)]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    judge = {"type": "rule", "label": "says_yes", "options": {"must_match": ["^Yes"]}}
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"train.student={smollm2_dir}",
        f"train.sft.data={data}",
        f"judge.judges=[{json.dumps(judge)}]",
        "train.sft.condition_on=[says_yes]",
        "train.sft.max_steps=12",
        "train.sft.batch_size=8",
        "train.sft.learning_rate=2e-3",
        "train.sft.warmup_ratio=0",
        "train.sft.eval_fraction=0.25",
        "train.sft.max_length=64",
        "train.lora.dropout=0",
        "train.report_to=[]",
        "eval.steer_items=6",
        "eval.steer_max_tokens=6",
    ]
    config = load_config(None, overrides)
    run_judge(config, data, tmp_path / "run" / "judge")  # the rule judge labels the rows: no model
    summary = run_sft(config, progress=False)
    assert summary["conditioning"]["labels"]["says_yes"]["classes"] == {"fail": 16, "pass": 16}
    student = TeacherConfig(
        backend="transformers", model=str(smollm2_dir), options={"adapter": str(tmp_path / "run" / "sft")}
    )
    out = tmp_path / "eval"
    out.mkdir()
    split = sft_split(config)
    sft = EvalModel(name="sft", role="tuned", teacher=student)
    steer = measure_steerability(config, [sft], out, split, held_out_instructions(split))
    assert steer is not None and steer["items"] == 6
    confusion = steer["models"]["sft"]["says_yes"]["confusion"]
    judged_pass = {asked: row.get("pass", 0) for asked, row in confusion.items()}
    assert sum(confusion["pass"].values()) == sum(confusion["fail"].values()) == 6
    assert judged_pass["pass"] > judged_pass["fail"], confusion
    answers = [json.loads(line) for line in (out / "steering.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 6  # untagged, <says_yes:pass>, <says_yes:fail> × 6 held-out instructions

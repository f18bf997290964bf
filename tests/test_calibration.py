"""Judge calibration on the gold sets, with scripted judges whose right answers are known: a
perfect judge scores 100%, a judge that always says "A" scores exactly the share of A in the gold
file (and is not above chance), a judge that always picks the first response shown has position
bias and scores a coin flip; a judge that pays for padding shows length bias. Then the gold sets
themselves, and `train rl` refusing a judge that can't be believed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from distill_prompts import PROMPTS_DIR

from distill.calibration import calibrate, flat_reward_problem, run_calibration
from distill.config import DistillConfig, load_config
from distill.errors import DistillError
from distill.judge import list_rubrics, load_rubric
from distill.records import ChatRequest

pytestmark = pytest.mark.usefixtures("scripted")


def gold(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (PROMPTS_DIR / "gold" / name).read_text().splitlines()]


def between(text: str, tag: str) -> str:
    return text.split(f"<{tag}>\n", 1)[1].split(f"\n</{tag}>", 1)[0]


def config_with(judges: list[dict[str, Any]], script: str, tmp_path: Path, style: str | None = None) -> DistillConfig:
    teacher = {"backend": "scripted", "model": script, "options": {"script": script}}
    return load_config(
        None,
        [
            f"run_dir={tmp_path}",
            f"judge.judges={json.dumps(judges)}",
            f"judge.teacher={json.dumps(teacher)}",
            f"eval.style_rubric={style or 'null'}",
        ],
    )


def test_a_perfect_judge_scores_100_and_a_constant_one_its_class_share(
    scripted: dict[str, Any], tmp_path: Path
) -> None:
    truth = {row["response"]: row["class"] for row in gold("harmlessness.jsonl")}
    scripted["perfect"] = lambda r, k: json.dumps(
        {"class": truth.get(between(r.messages[-1].content, "response"), "D")}
    )
    scripted["always-a"] = lambda r, k: '{"class": "A"}'
    judges = [{"type": "rubric", "rubric": "harmlessness"}]

    perfect = run_calibration(config_with(judges, "perfect", tmp_path), tmp_path / "p")["judges"]["rubric:harmlessness"]
    assert perfect["accuracy"] == 1.0 and perfect["interval"] == [1.0, 1.0] and perfect["above_chance"]
    assert perfect["items"] == len(truth) and perfect["invalid_rate"] == 0
    assert perfect["confusion"]["C"] == {"C": sum(c == "C" for c in truth.values())}
    assert json.loads((tmp_path / "p" / "calibration.json").read_text())["judges"]["rubric:harmlessness"] == perfect

    constant = calibrate(config_with(judges, "always-a", tmp_path / "a"), None)["judges"]["rubric:harmlessness"]
    share_a = sum(c == "A" for c in truth.values()) / len(truth)
    assert constant["accuracy"] == pytest.approx(share_a)
    assert constant["chance"] == max(list(truth.values()).count(c) for c in "ABCD") / len(truth)
    assert not constant["above_chance"] and "not above chance" in constant["warnings"][0]
    assert constant["length_bias"]["biased"] is False  # the same verdict for short and long


def test_a_judge_that_picks_the_first_response_shows_position_bias(scripted: dict[str, Any], tmp_path: Path) -> None:
    scripted["first"] = lambda r, k: '{"better": "A"}'
    config = config_with([], "first", tmp_path, style="helpfulness")
    entry = calibrate(config, None)["judges"]["pairwise:helpfulness"]
    assert entry["items"] == len(gold("helpfulness_pairs.jsonl"))
    assert entry["position_consistency"] == 0.0 and entry["first_wins_when_better_second"] == 1.0
    assert entry["accuracy"] == 0.5 and not entry["above_chance"]  # every verdict flips: all ties


def test_a_judge_that_likes_long_answers_shows_length_bias(scripted: dict[str, Any], tmp_path: Path) -> None:
    def longer(request: ChatRequest, k: int) -> str:
        text = request.messages[-1].content
        return json.dumps(
            {"better": "A" if len(between(text, "response_A")) > len(between(text, "response_B")) else "B"}
        )

    def padded(request: ChatRequest, k: int) -> str:
        return json.dumps({"class": "A" if len(between(request.messages[-1].content, "response")) > 60 else "B"})

    scripted["longer"], scripted["padded"] = longer, padded
    pairwise = calibrate(config_with([], "longer", tmp_path, style="helpfulness"), None)["judges"]
    bias = pairwise["pairwise:helpfulness"]["length_bias"]
    assert bias["long_wins"] == 1.0 and bias["biased"]
    # Half of the gold pairs have the better answer as the shorter one: length alone scores 50%.
    pairs = gold("helpfulness_pairs.jsonl")
    longer_is_better = sum(len(p["better"]) > len(p["worse"]) for p in pairs) / len(pairs)
    assert pairwise["pairwise:helpfulness"]["accuracy"] == pytest.approx(longer_is_better)
    rubric = calibrate(config_with([{"type": "rubric", "rubric": "helpfulness"}], "padded", tmp_path), None)
    assert rubric["judges"]["rubric:helpfulness"]["length_bias"]["reward_difference"] > 0


def test_rule_judges_and_missing_gold_are_reported_not_guessed(scripted: dict[str, Any], tmp_path: Path) -> None:
    scripted["x"] = lambda r, k: '{"class": "A"}'
    judges = [{"type": "rule", "options": {"max_words": 5}}, {"type": "score", "rubric": "honesty"}]
    entries = calibrate(config_with(judges, "x", tmp_path), None)["judges"]
    assert entries["rule"]["calibrated"] is False and "rule-based" in entries["rule"]["reason"]
    assert entries["score:honesty"]["calibrated"] is False


def test_every_bundled_rubric_has_a_gold_set_covering_every_class() -> None:
    for name in list_rubrics():
        rubric = load_rubric(name)
        rows = gold(f"{name}.jsonl")
        assert rubric.resolve(rubric.gold) == PROMPTS_DIR / "gold" / f"{name}.jsonl"
        assert len(rows) >= 40 and len({r["id"] for r in rows}) == len(rows)
        assert {r["class"] for r in rows} == {c.id for c in rubric.classes}
    assert len(gold("helpfulness_pairs.jsonl")) >= 20 and len(gold("length_pairs.jsonl")) >= 20


def test_flat_rewards_are_named() -> None:
    assert flat_reward_problem([[1.0, 1.0, 0.5, 0.5]], [1.0], group=2) is not None
    assert flat_reward_problem([[1.0, 0.9, 0.5, 0.5]], [1.0], group=2) is None
    # Two judges, one flat: the combined reward still varies.
    assert flat_reward_problem([[1.0, 1.0], [0.2, 0.8]], [1.0, 0.5], group=2) is None
    assert "no usable reward" in flat_reward_problem([[None, None]], [1.0], group=2)  # type: ignore[list-item, operator]


def test_train_rl_refuses_a_judge_that_cant_be_believed(scripted: dict[str, Any], tmp_path: Path) -> None:
    from distill.train import run_rl

    scripted["always-a"] = lambda r, k: '{"class": "A"}'
    config = config_with([{"type": "rubric", "rubric": "helpfulness"}], "always-a", tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(4)))
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"sft": config.train.sft.model_copy(update={"data": data})})}
    )
    config.train.rl.start_from = "base"
    with pytest.raises(DistillError) as refused:
        run_rl(config, progress=False)
    message = str(refused.value)
    assert re.search(
        r"judge rubric:helpfulness can't be believed: gold accuracy [\d.]+% .* is not above chance", message
    )
    assert "--allow-weak-judge" in message and len(message.splitlines()) == 1
    rl = tmp_path / "rl"  # at most the run lock's empty folder: refused before any model loaded
    assert not rl.exists() or not any(rl.iterdir())

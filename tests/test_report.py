"""The gap report, built from files a real `distill eval` wrote (scripted teachers registered
through the hook answer; the eval, scoring, style judging and report code are the real ones).
Its words must follow the evidence: "rose" or "closed X% of the gap" only when the 95% interval
excludes zero; the judged answer is the scored answer; an RL stage without reward variance is
named as having had no learning signal. Expected values come from how the scripted models were
built, never from the report itself."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from distill.config import DistillConfig, load_config
from distill.evaluation import run_eval
from distill.records import ChatRequest
from distill.report import write_report

QUESTIONS = 20
JUDGE_SCRIPT = "longer-wins"


def item_number(request: ChatRequest) -> int:
    return int(re.search(r"item (\d+)\?", request.messages[-1].content).group(1))  # type: ignore[union-attr]


def answerer(right: int, wrong_suffix: str = "") -> Any:
    """Answers items 0 .. right-1 correctly ("a7"), the others wrongly ("b7" + suffix)."""

    def reply(request: ChatRequest, k: int) -> str:
        number = item_number(request)
        return f"a{number}" if number < right else f"b{number}{wrong_suffix}"

    return reply


def longer_wins(request: ChatRequest, k: int) -> str:
    """A pairwise judge that prefers the longer response (ties go to A: order-dependent → a tie)."""
    text = request.messages[-1].content
    a = text.split("<response_A>\n", 1)[1].split("\n</response_A>", 1)[0]
    b = text.split("<response_B>\n", 1)[1].split("\n</response_B>", 1)[0]
    return json.dumps({"better": "B" if len(b) > len(a) else "A"})


def eval_config(
    tmp_path: Path, tuned_right: int, run_dir: Path | None = None, tuned: tuple[str, ...] = ("sft",)
) -> DistillConfig:
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"What is item {i}?", "answers": [f"a{i}"]}) + "\n"
            for i in range(QUESTIONS)
        )
    )

    def model(name: str, role: str) -> dict[str, Any]:
        return {
            "name": name,
            "role": role,
            "teacher": {"backend": "scripted", "model": name, "options": {"script": name}},
        }

    settings = {
        "run_dir": str(run_dir or tmp_path / "run"),
        "eval": {
            "models": [model("base", "base"), *(model(name, "tuned") for name in tuned), model("teacher", "teacher")],
            "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}],
            "style_items": 10,
            "bootstrap": 1000,
        },
        "judge": {"teacher": {"backend": "scripted", "model": "judge", "options": {"script": JUDGE_SCRIPT}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings))
    return load_config(path)


def run_scripted_eval(
    scripted: dict[str, Any], tmp_path: Path, tuned_right: int
) -> tuple[DistillConfig, dict[str, Any]]:
    scripted["base"] = answerer(4)  # 20%
    scripted["sft"] = answerer(tuned_right, ", with great confidence")  # wrong answers are long
    scripted["teacher"] = answerer(12)  # 60%
    scripted[JUDGE_SCRIPT] = longer_wins
    config = eval_config(tmp_path, tuned_right)
    run_eval(config)
    paths = write_report(config)
    return config, json.loads(paths["json"].read_text())


def test_a_small_gain_is_no_measurable_change(scripted: dict[str, Any], tmp_path: Path) -> None:
    # sft is right on 2 more of 20 questions than base. A resample misses both of them with
    # probability 0.9^20 = 12% > 2.5%, so the interval of the difference starts at 0: no claim.
    _, report = run_scripted_eval(scripted, tmp_path, tuned_right=6)
    comparison = report["tasks"]["jsonl"]["comparisons"]["sft"]
    assert comparison["questions"] == QUESTIONS and comparison["asked"] == QUESTIONS
    assert comparison["accuracy"] == {"base": 0.2, "tuned": 0.3, "teacher": 0.6}
    assert comparison["difference_interval"][0] <= 0 <= comparison["difference_interval"][1]
    [sentence] = report["verdict"]
    assert "accuracy showed no measurable change (20.0% → 30.0%; +10.0 pp" in sentence
    assert "rose" not in sentence.split("Judge preference")[0]
    assert "no measurable part of the gap closed (estimate 25.0%" in sentence
    assert f"on the {QUESTIONS} jsonl questions all three models answered" in sentence


def test_a_clear_gain_rises_and_closes_the_gap(scripted: dict[str, Any], tmp_path: Path) -> None:
    # sft is right on 8 more questions than base (all of the teacher's): a resample misses all 8
    # with probability 0.6^20 < 1e-4, so the difference and the gap closed exclude zero.
    _, report = run_scripted_eval(scripted, tmp_path, tuned_right=12)
    [sentence] = report["verdict"]
    assert "accuracy rose from 20.0% to 60.0% (+40.0 pp" in sentence
    assert "100.0% of the gap closed (95% CI 100.0% to 100.0%)" in sentence


def test_the_judged_answer_is_the_scored_answer(scripted: dict[str, Any], tmp_path: Path) -> None:
    config, report = run_scripted_eval(scripted, tmp_path, tuned_right=6)
    out = Path(config.run_dir) / "eval"  # type: ignore[arg-type]
    predictions = {
        (p["model"], p["question_id"]): p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    }
    style = [json.loads(line) for line in (out / "style.jsonl").read_text().splitlines()]
    assert len(style) == 2 * 10  # base and sft, 10 style items each (no SFT split: all factual)
    for row in style:
        prediction = predictions[(row["model"], row["item"]["question_id"])]
        assert row["student"] == prediction["prediction"]
        assert row["teacher"] == predictions[("teacher", row["item"]["question_id"])]["prediction"]
        assert row["item"]["prompt"].startswith(prediction["question"])  # asked exactly as scored
    # sft's wrong answers ("b7, with great confidence") are longer than the teacher's: preferred and
    # wrong. Of the 10 style items (q0..q9), sft is wrong on q6..q9 while the teacher is right on all.
    wrong = {(w["model"], w["question_id"]) for w in report["wrong_but_preferred"]}
    assert wrong == {("sft", f"q{i}") for i in range(6, 10)}


def test_an_rl_stage_without_reward_variance_had_no_learning_signal(scripted: dict[str, Any], tmp_path: Path) -> None:
    config, _ = run_scripted_eval(scripted, tmp_path, tuned_right=6)
    rl = Path(config.run_dir) / "rl"  # type: ignore[arg-type]
    rl.mkdir()
    # TRL's own log lines (metrics.jsonl rows) of an RL run whose groups all got one reward.
    steps = [{"step": s, "reward": 1.5, "reward_std": 0.0, "frac_reward_zero_std": 1.0} for s in (1, 2, 3)]
    (rl / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in steps))
    report = json.loads(write_report(config)["json"].read_text())
    assert report["training"]["rl"]["had_signal"] is False
    assert "no learning signal" in report["training"]["rl"]["sentence"]
    steps[1]["frac_reward_zero_std"] = 0.5
    (rl / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in steps))
    report = json.loads(write_report(config)["json"].read_text())
    assert report["training"]["rl"]["had_signal"] is True


def test_report_finds_the_judge_summary_and_custom_adapter_dirs(scripted: dict[str, Any], tmp_path: Path) -> None:
    """Provenance comes from where the pipeline writes: RUN_DIR/judge/ and the configured adapter dirs."""
    config, _ = run_scripted_eval(scripted, tmp_path, tuned_right=6)
    run_dir = Path(config.run_dir)  # type: ignore[arg-type]
    (run_dir / "judge").mkdir()
    (run_dir / "judge" / "manifest.json").write_text(json.dumps({"summary": {"items": 24}}))
    custom = tmp_path / "elsewhere" / "my-sft"
    custom.mkdir(parents=True)
    (custom / "training_summary.json").write_text(json.dumps({"stage": "sft", "steps": 7}))
    config = config.model_copy(
        update={
            "train": config.train.model_copy(update={"sft": config.train.sft.model_copy(update={"output_dir": custom})})
        }
    )
    report = json.loads(write_report(config)["json"].read_text())
    assert ["items", "24"] in report["provenance"]["judge"]
    assert ["steps", "7"] in report["provenance"]["sft"]


@pytest.mark.parametrize(
    ("before", "after", "interval", "expected"),
    [
        (0.2, 0.35, (0.03, 0.27), "rose from 20.0% to 35.0% (+15.0 pp, 95% CI +3.0 pp to +27.0 pp)"),
        (0.4, 0.3, (-0.2, -0.01), "fell from 40.0% to 30.0%"),
        (0.2, 0.25, (-0.05, 0.15), "showed no measurable change (20.0% → 25.0%; +5.0 pp"),
        (0.2, 0.2, (0.0, 0.0), "showed no measurable change (20.0% → 20.0%; +0.0 pp"),
    ],
)
def test_change_words_follow_the_interval(
    before: float, after: float, interval: tuple[float, float], expected: str
) -> None:
    from distill.stats import describe_change

    assert describe_change(before, after, interval).startswith(expected)


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(scripted: dict[str, Any], tmp_path: Path, browser: Any) -> None:
    """report.html from a real eval, in headless Chromium: every plot has a size, the console is
    clean, a long unbroken answer doesn't widen the page, provenance is a readable table."""
    from tests.browser import artifact_dir, inspect_page

    config, _ = run_scripted_eval(scripted, tmp_path, tuned_right=6)
    # A 175-character word (short enough to be shown whole among "preferred but wrong" answers).
    scripted["sft"] = lambda request, k: "It is " + "1000000" * 25 + " for sure, with great confidence"
    config = config.model_copy(
        update={"run_dir": tmp_path / "run-long", "eval": config.eval.model_copy(update={"cache": False})}
    )
    run_eval(config)
    run_dir = Path(config.run_dir)  # type: ignore[arg-type]
    (run_dir / "judge").mkdir()
    summary = {"dataset": str(run_dir), "judges": {"rubric:helpfulness": {"items": 24, "classes": {"A": 24}}}}
    (run_dir / "judge" / "manifest.json").write_text(json.dumps({"summary": summary}))
    from distill.calibration import run_calibration

    run_calibration(config, run_dir / "calibration")
    page = write_report(config)["html"]
    check = inspect_page(browser, page.as_uri(), artifact_dir() / "report.png")
    assert check.console_errors == []
    assert len(check.svg_boxes) == 1 and all(w > 0 and h > 0 for w, h in check.svg_boxes)
    assert not check.has_horizontal_scroll, (check.scroll_width, check.viewport_width)
    assert "judges.rubric:helpfulness.classes.A\t24" in check.text  # a table row, not escaped JSON
    assert "&quot;" not in check.text and '{"' not in check.text
    assert "1000000" * 25 in check.text  # the long answer is on the page
    assert "Can the judges be believed?" in check.text and "pairwise:helpfulness\t50.0%" in check.text
    assert check.screenshot.stat().st_size > 10_000


def test_rl_reward_rising_without_accuracy_is_named_beside_the_judges_calibration(
    scripted: dict[str, Any], tmp_path: Path
) -> None:
    from distill.calibration import run_calibration

    scripted.update(base=answerer(4), sft=answerer(6), rl=answerer(6, " indeed"), teacher=answerer(12))
    scripted[JUDGE_SCRIPT] = longer_wins
    config = eval_config(tmp_path, 6, tuned=("sft", "rl"))
    run_dir = Path(config.run_dir)  # type: ignore[arg-type]
    calibration = run_calibration(config, run_dir / "calibration")
    (run_dir / "rl").mkdir(parents=True)
    steps = [{"step": s, "reward": 0.3 + 0.2 * s, "reward_std": 0.3, "frac_reward_zero_std": 0.25} for s in range(1, 5)]
    (run_dir / "rl" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in steps))
    run_eval(config)
    report = json.loads(write_report(config)["json"].read_text())

    # A judge that prefers the longer answer is right on the gold pairs only where the better answer
    # happens to be the longer one: half of them, by construction of the gold file.
    style = calibration["judges"]["pairwise:helpfulness"]
    assert style["accuracy"] == pytest.approx(0.5) and not style["above_chance"]
    assert report["judges"]["calibration"]["pairwise:helpfulness"]["warnings"] == style["warnings"]
    # rl answers exactly what sft answers right: the reward rose (0.6 → 1.0 over the halves), accuracy didn't.
    [hacking] = report["reward_hacking"]
    assert hacking.startswith("RL reward rose from 0.600 to 1.000 (first vs last 2 steps) while jsonl accuracy")
    assert "showed no measurable change (30.0% → 30.0%" in hacking and "learned to please the judges" in hacking
    assert "pairwise:helpfulness's gold accuracy 50.0% vs chance 50.0%" in hacking
    assert hacking + "." in report["verdict"]
    page = (run_dir / "eval" / "report.html").read_text()
    assert "Can the judges be believed?" in page and "is not above chance" in page

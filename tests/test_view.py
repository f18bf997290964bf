"""`distill view` over a run directory made by real stage code: `distill run`'s pipeline (generate
with its judge filter, the judge stage, eval, report) with scripted teachers registered through the
plugin hook. Training would take minutes on CPU, so RUN_DIR/sft and RUN_DIR/rl hold hand-written
files in the shape train.py writes (TRL's log rows in metrics.jsonl, a card, a summary). Expected
numbers come from the files the stages wrote, never from the viewer itself.

HTTP tests go through Starlette's TestClient; the browser tests (slow) drive headless Chromium
over uvicorn and save screenshots under test-artifacts/view/.
"""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import markupsafe
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from distill.view import LOOPBACK_NAMES, create_app
from tests.conftest import free_port
from tests.scripted import SCRIPTS, plugin_module

pytest_plugins = ["tests.browser"]  # the session-wide `browser` fixture

QUESTIONS = 20
# Generate replies, one per request (batches of 2): kept rows, every filter's rejection, a
# near-duplicate of a kept row (3rd reply) and of a seed task, a low judge reward, an unparseable reply.
REPLIES: list[list[tuple[str, str]] | None] = [
    [
        ("Explain how a bicycle gear system works.", "Gears trade force for speed."),
        ("Add two.", "4"),
        ("Describe the picture of a sunset for me.", "An orange sky."),
    ],
    [
        ("Write a haiku about autumn leaves falling slowly.", "Leaves drift down."),
        ("List three benefits of drinking enough water daily.", "Energy, skin, focus."),
        ("- List some colours please now.", "Red."),
    ],
    [
        ("Explain how a bicycle gear system really works.", "The same."),
        ("Rate this essay harshly for its BAD grammar.", "BAD"),
        ("Convert 100 degrees Fahrenheit to Celsius.", "37.8 degrees Celsius."),
    ],
    None,
    [
        ("Suggest a name for a bakery that sells vegan bread.", "Rise Up."),
        ("Name two mammals that live in the sea.", "Whales and seals."),
        ("Give one tip for learning a new language quickly.", "Practise daily."),
    ],
]
UNDECIDED = "I honestly cannot decide whether a bakery called that is honest."  # the honesty judge's invalid reply


def item(request: Any) -> int:
    return int(re.search(r"item (\d+)\?", request.messages[-1].content).group(1))  # type: ignore[union-attr]


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def scripts() -> dict[str, Any]:
    replies = iter(REPLIES)

    def teacher(request: Any, k: int) -> str:
        if request.response_format is None:  # an eval question: right on items 0..11
            return f"a{item(request)}" if item(request) < 12 else f"b{item(request)}"
        tasks = next(replies, [])
        if tasks is None:
            return "Sorry, I can't write tasks today."
        return json.dumps({"tasks": [{"instruction": i, "input": "", "output": o} for i, o in tasks]})

    def judge(request: Any, k: int) -> str:
        text = request.messages[-1].content
        if "<response_A>" in text:  # the style judge: the longer answer wins
            a, b = (
                between(text, "<response_A>\n", "\n</response_A>"),
                between(text, "<response_B>\n", "\n</response_B>"),
            )
            return json.dumps({"better": "B" if len(b) > len(a) else "A"})
        response = between(text, "<response>\n", "\n</response>")
        if 'Rubric "honesty"' in text:
            return UNDECIDED if "Rise Up" in response else json.dumps({"class": "A", "why": f"honest: {response}"})
        return json.dumps({"class": "C" if "BAD" in response else "A", "why": f"helpful: {response}"})

    def student(right: int, wrong: str = "") -> Any:
        return lambda request, k: f"a{item(request)}" if item(request) < right else f"b{item(request)}{wrong}"

    return {"teacher": teacher, "judge": judge, "base": student(4), "sft": student(6, ", with great confidence")}


def write_training_outputs(run_dir: Path) -> None:
    """What train.py leaves in RUN_DIR/sft and RUN_DIR/rl, written by hand (training a student is
    minutes of CPU): metrics.jsonl rows are {"step", "time", **TRL's logs}, as its callback writes them."""
    sft, rl = run_dir / "sft", run_dir / "rl"
    sft.mkdir()
    rl.mkdir()
    rows = [
        {"step": s, "time": s * 1.5, "loss": 2.4 - 0.15 * s, "learning_rate": 2e-4, "epoch": s / 10}
        for s in range(1, 11)
    ]
    rows.append({"step": 10, "time": 16.0, "eval_loss": 1.1, "eval_runtime": 0.4})
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = range(1, 6)
    rl_rows = [
        {"step": s, "loss": 0.01 * s, "reward": 0.5 + 0.05 * s, "reward_std": 0.2, "kl": 0.002 * s,
         "frac_reward_zero_std": 0.25}
        for s in steps
    ]  # fmt: skip
    (rl / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl_rows))
    (sft / "README.md").write_text(
        "---\nbase_model: tiny-student\nlibrary_name: peft\n---\n\n# tiny-student + LoRA, trained by distill\n\n"
        "| | |\n|---|---|\n| steps | 10 |\n\n<script>alert('card')</script>\n"
    )
    (sft / "training_summary.json").write_text(json.dumps({"stage": "sft", "steps": 10, "rows": {"train": 5}}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One small `distill run` (generate, judge, eval, report) for the whole module."""
    from distill.config import load_config
    from distill.pipeline import run_pipeline
    from distill.plugins import get_teachers, load_plugins

    root = tmp_path_factory.mktemp("view")
    questions = root / "questions.jsonl"
    lines = [{"id": f"q{i}", "question": f"What is item {i}?", "answers": [f"a{i}"]} for i in range(QUESTIONS)]
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def scripted(name: str, script: str) -> dict[str, Any]:
        return {"backend": "scripted", "model": name, "options": {"script": script}}

    def model(name: str, role: str) -> dict[str, Any]:
        return {"name": name, "role": role, "teacher": scripted(name, name)}

    settings = {
        "run_dir": str(root / "run"),
        "teacher": scripted("teacher", "teacher"),
        "generate": {"target": 6, "max_requests": 5, "batch_size": 2, "tasks_per_request": 3, "cache": False,
                     "judge": "helpfulness", "min_reward": 0.5},
        "judge": {"teacher": scripted("judge", "judge"), "judges": [{"rubric": "helpfulness"}, {"rubric": "honesty"}],
                  "cache": False},
        "eval": {"models": [model("base", "base"), model("sft", "tuned"), model("teacher", "teacher")],
                 "tasks": [{"type": "jsonl", "options": {"path": str(questions)}}], "style_items": 10,
                 "bootstrap": 200, "cache": False},
    }  # fmt: skip
    (root / "config.yaml").write_text(json.dumps(settings))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_HOME", str(root / "home"))
        manager = load_plugins()
        manager.register(plugin_module(), name="scripted_teacher_plugin")
        get_teachers.cache_clear()
        before = dict(SCRIPTS)
        SCRIPTS.update(scripts())
        try:
            run_pipeline(
                load_config(root / "config.yaml"), ("generate", "judge", "eval", "report"), echo=lambda _: None
            )
        finally:
            manager.unregister(name="scripted_teacher_plugin")
            get_teachers.cache_clear()
            SCRIPTS.clear()
            SCRIPTS.update(before)
    write_training_outputs(root / "run")
    yield root / "run"


@contextmanager
def viewer(run_dir: Path, base_url: str = "http://testserver", **options: Any) -> Iterator[TestClient]:
    """A TestClient on the viewer of ``run_dir``; its index is deleted afterwards."""
    app = create_app(run_dir, **options)
    try:
        with TestClient(app, base_url=base_url) as test_client:
            yield test_client
    finally:
        app.state.index.close()


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Iterator[TestClient]:
    with viewer(run_dir) as test_client:
        yield test_client


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def escaped(text: str) -> str:
    """``text`` as the pages' templates write it."""
    return str(markupsafe.escape(text))


def count(page: str) -> int:
    return int(re.search(r'id="count"[^>]*data-count="(\d+)"', page).group(1))  # type: ignore[union-attr]


def state(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash: a read-only viewer leaves it unchanged."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# Over HTTP ------------------------------------------------------------------------------------


def test_data_filters_count_the_rows_the_stages_wrote(run_dir: Path, client: TestClient) -> None:
    rejected = read(run_dir / "rejected.jsonl")
    reasons = {r["reason"].split(":")[0] for r in rejected}
    assert {"near_duplicate", "too_short", "blocklist", "starts_with_punctuation", "low_reward"} <= reasons
    for reason in reasons:
        expected = sum(r["reason"].split(":")[0] == reason for r in rejected)
        assert count(client.get(f"/data?status=rejected&reason={reason}").text) == expected, reason
    assert count(client.get("/data?reason=blocklist:picture").text) == 1  # a full reason names itself
    assert count(client.get("/data?status=kept").text) == len(read(run_dir / "instructions.jsonl")) == 6
    assert count(client.get("/data?status=failed").text) == len(read(run_dir / "failures.jsonl")) == 1
    summary = json.loads((run_dir / "judge" / "judge_summary.json").read_text())["judges"]
    assert (
        count(client.get("/data?judge=rubric:honesty&verdict=invalid").text)
        == summary["rubric:honesty"]["invalid"]
        == 1
    )
    assert count(client.get("/data?judge=rubric:helpfulness&verdict=A&min_reward=1").text) == 6
    assert count(client.get("/data?judge=generate.judge&verdict=C").text) == 1  # generate's judge filter
    assert count(client.get("/data?q=bicycle+gear").text) == 2  # the kept row and its near-duplicate
    assert count(client.get("/data?min_rouge=0.7").text) == sum(r["reason"] == "near_duplicate" for r in rejected)
    seed = read(run_dir / "instructions.jsonl")[0]["provenance"]["seed_ids"][0]
    assert count(client.get(f"/data?seed={seed}").text) >= 1
    assert client.get("/data?min_reward=lots").status_code == 400


def test_a_row_shows_provenance_neighbours_and_the_judges_raw_replies(run_dir: Path, client: TestClient) -> None:
    [invalid] = [j for j in read(run_dir / "judge" / "judgements.jsonl") if j["verdict"] is None]
    page = client.get(f"/data/{invalid['item_id']}").text
    assert escaped(UNDECIDED) in page and invalid["invalid_reason"] in page
    helpful = next(j for j in read(run_dir / "judge" / "judgements.jsonl") if j["item_id"] == invalid["item_id"])
    assert escaped(helpful["raw"][0]) in page
    kept = {r["instruction"]: r for r in read(run_dir / "instructions.jsonl")}
    twin = next(r for r in read(run_dir / "rejected.jsonl") if "really works" in r["instruction"])
    page = client.get(f"/data/{twin['id']}").text
    assert f'href="/data/{kept["Explain how a bicycle gear system works."]["id"]}"' in page  # its kept neighbour
    assert "(a seed task)" not in page
    haiku = next(r for r in read(run_dir / "rejected.jsonl") if "haiku" in r["instruction"])
    assert "(a seed task)" in client.get(f"/data/{haiku['id']}").text  # dedup also knows the seeds
    low = next(r for r in read(run_dir / "rejected.jsonl") if r["reason"] == "low_reward")
    assert escaped(low["judgement"]["raw"][0]) in client.get(f"/data/{low['id']}").text
    failed = client.get("/data/failed-1").text
    assert escaped("Sorry, I can't write tasks today.") in failed and "unparseable_reply" in failed
    assert client.get("/data/no-such-row").status_code == 404


def test_eval_judge_preferred_but_wrong_equals_the_report(run_dir: Path, client: TestClient) -> None:
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    listed = sorted(w["question_id"] for w in report["wrong_but_preferred"] if w["model"] == "sft")
    assert listed  # the scripted sft is long-winded when wrong: the judge prefers it
    page = client.get("/eval?task=jsonl&model=sft&filter=wrong_but_preferred").text
    assert count(page) == len(listed)
    assert sorted(re.findall(r'<section class="question" id="jsonl:(\w+)">', page)) == listed
    predictions = read(run_dir / "eval" / "predictions.jsonl")
    teacher = {p["question_id"]: p["correct"] for p in predictions if p["model"] == "teacher"}
    expected = sum(p["model"] == "sft" and not p["correct"] and teacher[p["question_id"]] for p in predictions)
    assert count(client.get("/eval?task=jsonl&model=sft&filter=teacher_right_student_wrong").text) == expected
    right = sum(p["model"] == "base" and p["correct"] for p in predictions)
    assert count(client.get("/eval?model=base&filter=correct").text) == right
    assert client.get("/eval?filter=everything").status_code == 400


def test_report_numbers_link_to_their_rows(run_dir: Path, client: TestClient) -> None:
    page = client.get("/report").text
    links = {i: (html.unescape(h), t) for i, h, t in re.findall(r'<a id="([^"]+)" href="([^"]+)">([^<]+)</a>', page)}
    assert links, page
    for anchor, (href, text) in links.items():
        shown = int(re.match(r"[\d.]+% \((\d+) /", text).group(1) if "%" in text else text)  # type: ignore[union-attr]
        assert count(client.get(href).text) == shown, (anchor, href)
    assert "wrong-but-preferred-sft-jsonl" in links and "rejected-near_duplicate" in links
    assert "judge-rubric:helpfulness-A" in links and "accuracy-sft-jsonl" in links


def test_training_curves_and_the_card(client: TestClient) -> None:
    page = client.get("/training").text
    assert page.count("<svg") == 5  # sft loss (with eval_loss); rl loss, reward, KL, zero-variance groups
    assert "<h1>tiny-student + LoRA, trained by distill</h1>" in page
    assert "<script>alert" not in page  # the card's raw HTML is shown as text
    assert "library_name: peft" in page and "<th>rows.train</th>" in page


def test_no_file_outside_the_run_dir_is_served(run_dir: Path, client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    assert client.get("/raw/eval/report.json").json()["teacher"] == "teacher"
    attempts = [
        "/raw/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/raw/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/raw/%2Fetc%2Fpasswd",
        f"/raw/{'..%2F' * 12}{str(secret).lstrip('/')}",
    ]
    for attempt in attempts:
        response = client.get(attempt)
        assert response.status_code in (403, 404), attempt
        assert "root:" not in response.text and "TOP SECRET" not in response.text
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    shutil.copy(run_dir / "instructions.jsonl", leaky)
    (leaky / "link.txt").symlink_to(secret)  # a link inside the run dir that leads out of it
    with viewer(leaky) as other:
        response = other.get("/raw/link.txt")
        assert response.status_code == 403 and "TOP SECRET" not in response.text


def test_read_only_and_a_torn_last_line(run_dir: Path, tmp_path: Path) -> None:
    before = state(run_dir)
    with viewer(run_dir) as client:
        for url in ("/data", "/data/failed-1", "/eval", "/training", "/report", "/files", "/raw/manifest.json"):
            assert client.get(url).status_code == 200, url
    assert state(run_dir) == before
    live = tmp_path / "live"
    live.mkdir()
    for name in ("instructions.jsonl", "rejected.jsonl", "failures.jsonl"):
        shutil.copy(run_dir / name, live)
    total = sum(len(read(live / name)) for name in ("instructions.jsonl", "rejected.jsonl", "failures.jsonl"))
    row = read(live / "instructions.jsonl")[0] | {"id": "late", "instruction": "Describe a café in Paris."}
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    torn = line[: line.index("é".encode()) + 1]  # the writer stopped inside a two-byte character
    with (live / "instructions.jsonl").open("ab") as handle:
        handle.write(torn)
    written = (live / "instructions.jsonl").read_bytes()
    with viewer(live) as client:
        page = client.get("/data").text
        assert count(page) == total and "Lines left out" not in page and "Re-index" not in page
        with (live / "instructions.jsonl").open("ab") as handle:
            handle.write(line[len(torn) :])  # the writer finishes the line
        assert "Re-index" in client.get("/data").text
        assert count(client.post("/reindex?next=/data%3Fq%3Dcafe").text) == 1  # redirected back, re-indexed
        elsewhere = client.post("/reindex?next=//evil.example/", follow_redirects=False)
        assert elsewhere.headers["location"] == "/"  # only ever back to a page of the viewer
    assert (live / "instructions.jsonl").read_bytes() == written + line[len(torn) :]


def test_a_run_with_only_generate_outputs(run_dir: Path, tmp_path: Path) -> None:
    only = tmp_path / "only-generate"
    only.mkdir()
    for name in ("instructions.jsonl", "rejected.jsonl", "failures.jsonl", "responses.jsonl", "manifest.json"):
        shutil.copy(run_dir / name, only)
    with viewer(only) as client:
        for url in ("/data", "/eval", "/training", "/report", "/files"):
            assert client.get(url).status_code == 200, url
        assert "No eval outputs in this run yet" in client.get("/eval").text
        assert client.get("/", follow_redirects=False).headers["location"] == "/data"


def test_loopback_only_unless_exposed(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.cli import cli

    result = CliRunner().invoke(cli, ["view", str(run_dir), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--expose" in result.output
    served: dict[str, Any] = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: served.update(app=app, **options))
    result = CliRunner().invoke(
        cli, ["view", str(run_dir), "--host", "0.0.0.0", "--expose", "--port", str(free_port())]
    )
    assert result.exit_code == 0, result.output
    assert "warning: serving" in result.output and served["host"] == "0.0.0.0"
    with viewer(run_dir, "http://evil.example", allowed_hosts=LOOPBACK_NAMES) as rebound:
        assert rebound.get("/data").status_code == 400  # a page elsewhere can't reach it by DNS rebinding
    with viewer(run_dir, "http://127.0.0.1:8765", allowed_hosts=LOOPBACK_NAMES) as local:
        assert local.get("/data").status_code == 200


# In a real browser ----------------------------------------------------------------------------


@contextmanager
def live(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def opened(browser: Any, errors: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()


def shot(page: Any, name: str) -> None:
    from tests.browser import artifact_dir

    path = artifact_dir() / "view" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000
    wide = page.evaluate("() => document.documentElement.scrollWidth > window.innerWidth")
    assert not wide, f"{name}: the page scrolls sideways"


def shown_count(page: Any) -> int:
    return int(page.get_attribute("#count", "data-count"))


@pytest.mark.slow
def test_the_viewer_in_a_real_browser(run_dir: Path, browser: Any) -> None:
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    rejected = read(run_dir / "rejected.jsonl")
    app = create_app(run_dir, allowed_hosts=LOOPBACK_NAMES)
    errors: list[str] = []
    with live(app) as base, opened(browser, errors) as page:
        # Filter by rejection reason: the count the files hold.
        page.goto(f"{base}/data")
        page.select_option("select[name=reason]", "near_duplicate")
        page.click("button[type=submit]")
        page.wait_for_url("**/data?*reason=near_duplicate*")
        assert shown_count(page) == sum(r["reason"] == "near_duplicate" for r in rejected) == 2
        shot(page, "data-near-duplicates")
        # Open a row and see its judgement's raw text.
        page.goto(f"{base}/data?judge=rubric:honesty&verdict=invalid")
        page.click("table.rows td a")
        page.wait_for_url("**/data/*")
        assert UNDECIDED in page.inner_text("body")
        shot(page, "row")
        # The eval page's "judge preferred but wrong" count is the report's.
        wrong = sorted(w["question_id"] for w in report["wrong_but_preferred"] if w["model"] == "sft")
        page.goto(f"{base}/eval?task=jsonl&model=sft")
        assert int(page.inner_text("#filter-wrong_but_preferred b")) == len(wrong)
        shot(page, "eval")
        # From the report's number to the rows behind it.
        page.goto(f"{base}/report")
        number = int(page.inner_text("#wrong-but-preferred-sft-jsonl"))
        assert number == len(wrong)
        shot(page, "report")
        page.click("#wrong-but-preferred-sft-jsonl")
        page.wait_for_url("**/eval?*filter=wrong_but_preferred*")
        assert shown_count(page) == number
        ids = page.eval_on_selector_all("section.question", "nodes => nodes.map(n => n.id)")
        assert sorted(i.split(":", 1)[1] for i in ids) == wrong
        shot(page, "eval-wrong-but-preferred")
        page.goto(f"{base}/report")
        page.click("#rejected-near_duplicate")
        assert shown_count(page) == 2
        page.goto(f"{base}/training")
        boxes = page.eval_on_selector_all("svg", "nodes => nodes.map(n => n.getBoundingClientRect().width)")
        assert len(boxes) == 5 and all(width > 100 for width in boxes)
        shot(page, "training")
        # A traversal attempt as the bytes on the wire (a browser would normalise the ../ away).
        connection = http.client.HTTPConnection(base.removeprefix("http://"))
        connection.request("GET", "/raw/../../../../etc/passwd")
        response = connection.getresponse()
        assert response.status in (403, 404) and b"root:" not in response.read()
    assert errors == []
    app.state.index.close()


@pytest.mark.slow
def test_100k_rows_page_in_a_browser(browser: Any, tmp_path: Path) -> None:
    """Measured and printed, not asserted as a wall-clock limit (shared CI machines vary)."""
    from bench.view_paging import page_urls, write_synthetic_run

    written = write_synthetic_run(tmp_path / "big", 100_000)
    started = time.perf_counter()
    app = create_app(tmp_path / "big")
    print(f"\nindex of {sum(written.values()):,} rows built in {time.perf_counter() - started:.2f} s")
    errors: list[str] = []
    with live(app) as base, opened(browser, errors) as page:
        page.goto(f"{base}/files")  # not timed: a fresh tab's first load is the browser starting up
        for name, url in page_urls(100_000).items():
            started = time.perf_counter()
            page.goto(base + url, wait_until="load")
            seconds = time.perf_counter() - started
            print(f"{name:<40} {seconds:6.3f} s  ({shown_count(page):,} rows match)")
            assert page.locator("table.rows tr").count() > 1, url
        assert shown_count(page) > 0
        page.goto(base + page_urls(100_000)["last page"])
        shot(page, "data-100k-last-page")
    assert errors == []
    app.state.index.close()

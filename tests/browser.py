"""Check distill's HTML pages in a real browser: the system Chromium, driven by Playwright.

Use it from a test module (``pytest_plugins`` registers the session-wide ``browser`` fixture once
per run, however many modules name it)::

    from tests.browser import artifact_dir, inspect_page

    pytest_plugins = ["tests.browser"]

    @pytest.mark.slow
    def test_report(browser, tmp_path):
        check = inspect_page(browser, path.as_uri(), artifact_dir() / "report.png")
        assert check.console_errors == [] and not check.has_horizontal_scroll

Chromium comes from the distribution (``scripts/setup.sh`` installs it as root); Playwright's own
browser download is never used. Without Chromium the ``browser`` fixture skips its tests, unless
``DISTILL_REQUIRE_BROWSER=1`` is set (CI), which turns the skip into a failure.

PYTEST_DONT_REWRITE: this module has no asserts, and test modules import it before ``pytest_plugins``
registers it, which would otherwise warn "Module already imported so cannot be rewritten".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage

REPO = Path(__file__).resolve().parent.parent
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
PAGE_TIMEOUT_MS = 30_000

# Measured in the page after it has loaded.
_MEASURE_JS = """() => ({
    svgs: Array.from(document.querySelectorAll("svg"), (el) => {
        const box = el.getBoundingClientRect();
        return [box.width, box.height];
    }),
    scrollWidth: document.documentElement.scrollWidth,
    viewportWidth: window.innerWidth,
    text: document.body ? document.body.innerText : "",
})"""


@dataclass(frozen=True)
class PageCheck:
    """What a real browser saw on one page."""

    url: str
    console_errors: list[str]  # console messages of type "error", then uncaught page errors
    svg_boxes: list[tuple[float, float]]  # (width, height) of every <svg>, in document order, CSS pixels
    scroll_width: int  # document.documentElement.scrollWidth
    viewport_width: int  # window.innerWidth
    text: str  # document.body.innerText
    screenshot: Path  # full-page PNG

    @property
    def has_horizontal_scroll(self) -> bool:
        return self.scroll_width > self.viewport_width


def artifact_dir() -> Path:
    """The folder for screenshots and other test artifacts: ``$DISTILL_TEST_ARTIFACTS`` or ``test-artifacts/``."""
    path = Path(os.environ.get("DISTILL_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium_path() -> str | None:
    return shutil.which("chromium")


@pytest.fixture()
def browser() -> Iterator[Browser]:
    """A headless Chromium for one test (about a second to start); skips (or fails under
    DISTILL_REQUIRE_BROWSER=1) without it. Not shared longer: Playwright's sync API keeps an event
    loop running in the main thread while it is open, and `asyncio.run` in later tests would fail."""
    executable = chromium_path()
    if executable is None:
        reason = "Chromium not found: run scripts/setup.sh as root, or `sudo apt-get install -y chromium`"
        if os.environ.get("DISTILL_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def inspect_page(browser: Browser, url: str, screenshot: Path, viewport: tuple[int, int] = (1200, 900)) -> PageCheck:
    """Load ``url`` in a fresh browser context, measure it and write a full-page PNG to ``screenshot``."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page_errors: list[str] = []
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("console", on_console)
        page.on("pageerror", lambda error: page_errors.append(f"{error.name}: {error.message}"))
        page.goto(url, wait_until="load")
        measured = page.evaluate(_MEASURE_JS)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    return PageCheck(
        url=url,
        console_errors=errors + page_errors,
        svg_boxes=[(float(w), float(h)) for w, h in measured["svgs"]],
        scroll_width=int(measured["scrollWidth"]),
        viewport_width=int(measured["viewportWidth"]),
        text=str(measured["text"]),
        screenshot=screenshot,
    )

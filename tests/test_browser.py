"""The browser helper catches what HTML page tests rely on: console and page errors, SVG sizes,
horizontal overflow, visible text, and a screenshot. Pages are small files written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import PageCheck, artifact_dir, inspect_page

pytest_plugins = ["tests.browser"]  # the session-wide `browser` fixture

pytestmark = pytest.mark.slow  # a real Chromium

HEAD = '<!doctype html><html><head><meta charset="utf-8"><title>t</title></head><body>'


def check(browser, tmp_path: Path, name: str, body: str) -> PageCheck:
    page = tmp_path / f"{name}.html"
    page.write_text(HEAD + body + "</body></html>", encoding="utf-8")
    result = inspect_page(browser, page.as_uri(), artifact_dir() / "test_browser" / f"{name}.png")
    assert result.screenshot.is_file()
    assert result.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.screenshot.stat().st_size > 100
    return result


def test_good_page(browser, tmp_path: Path) -> None:
    result = check(
        browser,
        tmp_path,
        "good",
        '<h1>Gap report</h1><p>All good.</p><svg width="640" height="300" viewBox="0 0 640 300">'
        '<rect x="20" y="20" width="600" height="260" fill="#4a90d9"/></svg>',
    )
    assert result.console_errors == []
    assert result.svg_boxes == [(640, 300)]
    assert result.viewport_width == 1200
    assert result.scroll_width <= result.viewport_width
    assert not result.has_horizontal_scroll
    assert "Gap report" in result.text and "All good." in result.text


def test_errors_are_reported(browser, tmp_path: Path) -> None:
    result = check(
        browser,
        tmp_path,
        "errors",
        "<p>broken</p><script>console.error('logged on purpose');</script><script>undefinedFunction();</script>",
    )
    assert len(result.console_errors) == 2, result.console_errors
    assert any("logged on purpose" in error for error in result.console_errors)
    assert any("undefinedFunction" in error for error in result.console_errors)


def test_horizontal_overflow(browser, tmp_path: Path) -> None:
    result = check(browser, tmp_path, "overflow", f"<p>{'1000000' * 200}</p>")
    assert result.has_horizontal_scroll
    assert result.scroll_width > result.viewport_width


def test_zero_size_svg(browser, tmp_path: Path) -> None:
    result = check(browser, tmp_path, "empty_svg", '<p>chart:</p><svg width="0" height="0"></svg>')
    assert result.svg_boxes == [(0, 0)]
    assert result.console_errors == []

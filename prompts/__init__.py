"""Prompt templates, rubrics, gold sets and seed data shipped with distill (importable as
``distill_prompts``), and the one Jinja environment every template is rendered with."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2

PROMPTS_DIR = Path(__file__).parent

# StrictUndefined: a typo in a template is an error, not an empty string. HTML templates
# (*.html.jinja) are autoescaped; prompts and Markdown are plain text.
ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROMPTS_DIR),
    undefined=jinja2.StrictUndefined,
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.jinja",), default_for_string=False),
)


def read_prompt(relative_path: str) -> str:
    """The text of a file under ``prompts/``, e.g. ``read_prompt("chat_templates/default.jinja")``."""
    return (PROMPTS_DIR / relative_path).read_text(encoding="utf-8")


def find_template(name: str) -> Path | None:
    """A template by path, or by name under ``prompts/``; None when neither exists."""
    for path in (Path(name), PROMPTS_DIR / name):
        if path.is_file():
            return path
    return None


def load_template(name: str) -> tuple[jinja2.Template, str] | None:
    """A prompt template that users may replace (a path, or a name under ``prompts/``) and the
    sha256 of its text (provenance); None when it exists nowhere (callers name the config field)."""
    path = find_template(name)
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    return ENVIRONMENT.from_string(text), hashlib.sha256(text.encode()).hexdigest()


def render(name: str, **context: object) -> str:
    """Render a bundled template under ``prompts/``."""
    return ENVIRONMENT.get_template(name).render(**context)

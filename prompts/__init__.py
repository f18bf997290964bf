"""Prompt templates, rubrics and seed data shipped with distill (importable as ``distill_prompts``)."""

from pathlib import Path

PROMPTS_DIR = Path(__file__).parent


def read_prompt(relative_path: str) -> str:
    """The text of a file under ``prompts/``, e.g. ``read_prompt("chat_templates/default.jinja")``."""
    return (PROMPTS_DIR / relative_path).read_text(encoding="utf-8")

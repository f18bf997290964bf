"""The hooks a distill plugin can implement.

A plugin is a module (or object) with functions decorated by ``@distill.hookimpl`` whose names
match the specs below. Built-in backends in ``plugins/`` use exactly these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import pluggy

hookspec = pluggy.HookspecMarker("distill")


@hookspec
def register_teachers(register: Callable[[type[Any]], None]) -> None:
    """Register teacher backends.

    Called once, the first time distill needs the list of teachers (``distill ask``,
    ``distill plugins``, config validation). Call ``register(TeacherClass)`` for each backend;
    the class subclasses ``distill.teacher.Teacher`` and sets ``name`` (what users write in
    ``teacher.backend``), ``options_model`` (a pydantic model of its ``teacher.options``) and
    implements ``generate(requests) -> results``.
    """


@hookspec
def register_judges(register: Callable[[type[Any]], None]) -> None:
    """Register judges.

    Called once, the first time distill needs the list of judges (``distill judge``, config
    validation, RL rewards). Call ``register(JudgeClass)`` for each judge; the class subclasses
    ``distill.judge.Judge``, sets ``name`` (what users write in ``judge.judges[].type``),
    ``options_model``, ``needs_teacher`` / ``needs_rubric`` / ``pairwise``, and implements
    ``judge(items) -> judgements``: one ``Judgement`` per ``JudgeItem``, invalid (verdict and
    reward None, raw text kept) when no verdict could be read.
    """


@hookspec
def register_tasks(register: Callable[[type[Any]], None]) -> None:
    """Register evaluation tasks.

    Called once, the first time distill needs the list of tasks (``distill eval``, ``distill
    run``). Call ``register(TaskClass)`` for each task; the class subclasses
    ``distill.tasks.Task``, sets ``name`` (what users write in ``eval.tasks[].type``) and
    ``options_model``, and implements ``questions()`` (the held-out questions); ``prompt`` and
    ``score`` have defaults for open and multiple-choice questions.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``distill`` command line.

    Called once when the CLI module is imported, with the top-level click group. Decorate new
    commands with ``@cli.command()`` (or add groups with ``@cli.group()``).
    """

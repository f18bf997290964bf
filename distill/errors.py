"""Errors a user can act on. Each message says what is wrong and what to do about it.

The CLI prints ``str(error)`` (one line per problem) and exits with ``error.exit_code``;
anything that is not a ``DistillError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class DistillError(Exception):
    """Base class: a problem the user can fix. The message is shown as is."""

    exit_code = 1


class ConfigError(DistillError):
    """Invalid configuration: one line per problem, each naming the field path and what is allowed."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(DistillError):
    """A plugin could not be loaded, or two plugins registered the same name."""

    exit_code = 2


class ModelError(DistillError):
    """A model name could not be resolved, prepared or verified."""


class TeacherError(DistillError):
    """The teacher cannot go on (bad key, unknown model, bad request, dead server)."""

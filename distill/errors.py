"""Errors a user can act on. Each message says what is wrong and what to do about it.

The CLI prints ``str(error)`` (one line per problem) and exits with ``error.exit_code``;
anything that is not a ``DistillError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


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


# Turning pydantic errors into lines a user can act on ------------------------------------------

_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
}


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Turn a pydantic error into one line per problem: ``path: what is allowed, got VALUE``."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        path = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
        lines.append(f"{path}: {_describe(error, model)}")
    return lines


def _describe(error: Any, model: type[BaseModel]) -> str:
    kind: str = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(model, error["loc"][:-1])
        hint = f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
        if str(error["loc"][-1]).lower() in {"api_key", "key", "token", "secret"}:
            hint += "; never put secrets in a config: name an environment variable instead (api_key_env)"
        return hint
    if kind == "missing":
        return "required, but missing"
    bounds = {"less_than_equal": "<=", "less_than": "<", "greater_than_equal": ">=", "greater_than": ">"}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {_show(bound)}, got {_show(got)}"
    if kind in {"too_short", "too_long"}:
        return f"{error['msg'].lower()}, got {_show(got)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_show(got)}"
    for type_name, words in _TYPE_NAMES.items():
        if kind.startswith(type_name + "_") or kind == f"{type_name}_type":
            return f"must be {words}, got {_show(got)}"
    return f"{error['msg']}, got {_show(got)}"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (sub)model at ``loc``, for 'allowed:' hints."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []

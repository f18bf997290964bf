"""The plugin manager: built-in plugins, installed plugins (entry-point group ``distill``), and the
registries their hooks fill.

Built-in backends live in ``plugins/`` (importable as ``distill_plugins``) and are registered
through the same hooks as third-party plugins; core never imports them directly.
``DISTILL_LOAD_PLUGINS`` (comma-separated entry-point names, may be empty) limits which
installed plugins load; the built-in ones always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from distill import hookspecs
from distill.errors import PluginError, format_validation_error

ENTRY_POINT_GROUP = "distill"

DEFAULT_PLUGINS = (
    "distill_plugins.openai_teacher",
    "distill_plugins.vllm_teacher",
    "distill_plugins.transformers_teacher",
    "distill_plugins.judges",
    "distill_plugins.rule_judge",
    "distill_plugins.reward_model_judge",
    "distill_plugins.tasks",
)

pm = pluggy.PluginManager("distill")
pm.add_hookspecs(hookspecs)


@cache
def load_plugins() -> pluggy.PluginManager:
    """Register the built-in and installed plugins, once (on first use, not at import, so that a
    plugin importing distill never meets a half-imported module)."""
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    wanted = os.environ.get("DISTILL_LOAD_PLUGINS")
    if wanted is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return pm
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    available = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for name in names:
        if name not in available:
            known = ", ".join(sorted(available)) or "none installed"
            raise PluginError(f"DISTILL_LOAD_PLUGINS: no installed plugin '{name}'; installed: {known}")
        pm.register(available[name].load(), name=name)
    return pm


@dataclass
class Registry:
    """What the plugins registered through one hook: name → class, and which plugin gave it."""

    kind: str
    classes: dict[str, type[Any]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> type[Any]:
        return self.classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def names(self) -> list[str]:
        return sorted(self.classes)

    def unknown(self, name: str) -> str:
        """The message for a name nobody registered."""
        return f"unknown {self.kind} '{name}'; known: {', '.join(self.names()) or 'none'}"

    def problems(self, name: Any, options: Any, name_field: str, options_field: str) -> list[str]:
        """Config problems with a plugin name and its options, one line each, e.g.
        ``teacher.options.max_concurrency: must be >= 1, got 0``. The same check for teachers,
        judges and tasks."""
        if not isinstance(name, str):
            return []  # a type error the config model already reports
        if name not in self.classes:
            return [f"{name_field}: {self.unknown(name)}"]
        options_model = self.classes[name].options_model
        try:
            options_model.model_validate(options or {})
        except ValidationError as exc:
            return format_validation_error(exc, options_model, prefix=options_field)
        return []

    def options(self, name: str, options: Any) -> BaseModel:
        """The validated options of plugin ``name`` (checked by ``problems`` beforehand)."""
        return self.classes[name].options_model.model_validate(options or {})


def _collect(hook_name: str, kind: str) -> Registry:
    registry = Registry(kind)
    hook = getattr(load_plugins().hook, hook_name)
    for impl in hook.get_hookimpls():

        def register(cls: type[Any], _owner: str = impl.plugin_name) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin '{_owner}' registered a {kind} class without a name: {cls!r}")
            if name in registry.classes:
                raise PluginError(
                    f"{kind} '{name}' is registered by both '{registry.owners[name]}' and '{_owner}'; "
                    "uninstall one or limit plugins with DISTILL_LOAD_PLUGINS"
                )
            registry.classes[name] = cls
            registry.owners[name] = _owner

        impl.function(register=register)
    return registry


@cache
def get_teachers() -> Registry:
    """Teacher backends by name."""
    return _collect("register_teachers", "teacher")


@cache
def get_judges() -> Registry:
    """Judges by name."""
    return _collect("register_judges", "judge")


@cache
def get_tasks() -> Registry:
    """Evaluation tasks by name."""
    return _collect("register_tasks", "task")


def describe_plugins() -> list[dict[str, Any]]:
    """One entry per loaded plugin: name, version where installed, what it registered."""
    registries = {"teachers": get_teachers(), "judges": get_judges(), "tasks": get_tasks()}
    dists = {ep.name: ep.dist for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    described = []
    for plugin_name, _plugin in load_plugins().list_name_plugin():
        entry: dict[str, Any] = {"name": plugin_name, "builtin": plugin_name in DEFAULT_PLUGINS}
        dist = dists.get(plugin_name)
        if dist is not None:
            entry["package"] = f"{dist.name} {dist.version}"
        hooks = [impl.name for impl in pm.get_hookcallers(_plugin) or []]
        entry["hooks"] = sorted(hooks)
        for kind, registry in registries.items():
            owned = sorted(n for n, owner in registry.owners.items() if owner == plugin_name)
            if owned:
                entry[kind] = owned
                # What each one is: the first paragraph of its class docstring.
                entry.setdefault("about", {})[kind] = {
                    name: " ".join((registry.classes[name].__doc__ or "").strip().split("\n\n")[0].split())
                    for name in owned
                }
        described.append(entry)
    return described

"""distill: turn a teacher LLM into training data and a better student, and measure what it learned."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("distill")
"""Decorator for plugin hook implementations: ``@distill.hookimpl``."""

__all__ = ["__version__", "hookimpl"]

"""distill's built-in plugins (importable as ``distill_plugins``), registered through the same
hooks as third-party plugins; see ``distill.plugins.DEFAULT_PLUGINS``."""

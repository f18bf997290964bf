"""The example configs validate and name plugins that exist. (`distill run` end to end, killed in
training and resumed, is in tests/reliability/test_run.py.)"""

from __future__ import annotations

from distill.config import load_config
from tests.conftest import REPO


def test_example_configs_validate_and_resolve_their_plugins() -> None:
    from distill.plugins import get_judges, get_tasks, get_teachers

    for name in ("quickstart", "gpu", "openai"):
        config = load_config(REPO / "examples" / f"{name}.yaml")
        assert config.teacher.backend in get_teachers()
        assert all(spec.type in get_judges() for spec in config.judge.judges)
        assert all(spec.type in get_tasks() for spec in config.eval.tasks)
        assert config.judge.judges and config.eval.tasks and config.run_dir is not None

"""Config loading and its error messages: one line per problem, naming the field and what is allowed;
the example configs validate and name plugins that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import DistillConfig, TeacherConfig, load_config
from distill.errors import ConfigError
from tests.conftest import REPO, run_distill


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(path: Path | None = None, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value.problems


def test_defaults_load_and_overrides_apply(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "teacher:\n  temperature: 0.5\n"), ["teacher.max_tokens=12"])
    assert config.teacher.temperature == 0.5
    assert config.teacher.max_tokens == 12
    assert config.teacher.backend == "transformers"


def test_out_of_range_value_names_field_bound_and_value(tmp_path: Path) -> None:
    assert problems(write(tmp_path, "teacher:\n  temperature: 7\n")) == ["teacher.temperature: must be <= 2, got 7"]


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    lines = problems(write(tmp_path, "teacher:\n  temperature: hot\n  max_tokens: 0\n  colour: red\n"))
    assert lines == [
        "teacher.temperature: must be a number, got 'hot'",
        "teacher.max_tokens: must be >= 1, got 0",
        "teacher.colour: unknown field; allowed: backend, max_tokens, model, options, seed, "
        "system_prompt, temperature, top_p",
    ]


def test_unknown_backend_lists_the_known_ones() -> None:
    line = problems(overrides=("teacher.backend=claude",))[0]
    assert line.startswith("teacher.backend: unknown teacher 'claude'; known: ")
    assert {"openai", "transformers", "vllm"} <= set(line.split("known: ")[1].split(", "))


def test_backend_options_are_validated_by_the_plugin_model() -> None:
    lines = problems(
        overrides=("teacher.backend=openai", "teacher.options.timeout_s=0", "teacher.options.max_concurency=3")
    )
    assert lines[0] == "teacher.options.timeout_s: must be > 0, got 0"
    assert lines[1].startswith("teacher.options.max_concurency: unknown field; allowed: ")
    assert "max_concurrency" in lines[1]


def test_a_key_in_the_config_is_refused_with_a_pointer_to_env_vars() -> None:
    line = problems(overrides=("teacher.backend=openai", "teacher.options.api_key=sk-123"))[0]
    assert line.startswith("teacher.options.api_key: unknown field")
    assert "api_key_env" in line and "sk-123" not in line


def test_file_problems(tmp_path: Path) -> None:
    assert problems(tmp_path / "missing.yaml") == [f"{tmp_path / 'missing.yaml'}: config file not found"]
    assert "not valid YAML" in problems(write(tmp_path, "teacher: [unclosed\n"))[0]
    assert "top level must be a mapping" in problems(write(tmp_path, "- a\n- b\n"))[0]
    (tmp_path / "latin1.yaml").write_bytes("teacher:\n  model: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in problems(tmp_path / "latin1.yaml")[0]
    assert problems(overrides=("teacher.temperature",)) == [
        "--set 'teacher.temperature': expected FIELD.PATH=VALUE, e.g. teacher.temperature=0.2"
    ]


def test_every_config_field_is_described() -> None:
    from pydantic import BaseModel

    from distill.plugins import get_teachers

    models: list[type[BaseModel]] = [DistillConfig, TeacherConfig]
    models += [cls.options_model for cls in get_teachers().classes.values()]
    seen: set[type[BaseModel]] = set()
    while models:
        model = models.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                models.append(field.annotation)


def test_cli_bad_config_exits_non_zero_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = write(tmp_path, f"run_dir: {run_dir}\nteacher:\n  temperature: 7\n  backend: nope\n")
    result = run_distill("ask", "-c", str(config), "hello")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0] == "error: teacher.temperature: must be <= 2, got 7"
    assert result.stderr.strip().splitlines()[1].startswith("error: teacher.backend: unknown teacher 'nope'")
    assert not run_dir.exists()
    result = run_distill("ask", "--teacher", "nope", "--run-dir", str(run_dir), "hello")
    assert result.returncode == 2
    assert "error: teacher.backend: unknown teacher 'nope'; known: " in result.stderr
    assert not run_dir.exists()


def test_example_configs_validate_and_resolve_their_plugins() -> None:
    from distill.plugins import get_judges, get_tasks, get_teachers

    for name in ("quickstart", "gpu", "openai", "kd"):
        config = load_config(REPO / "examples" / f"{name}.yaml")
        assert config.teacher.backend in get_teachers()
        assert all(spec.type in get_judges() for spec in config.judge.judges)
        assert all(spec.type in get_tasks() for spec in config.eval.tasks)
        assert config.judge.judges and config.eval.tasks and config.run_dir is not None

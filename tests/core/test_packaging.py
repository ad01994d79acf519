"""The package is installable as laid out: every package is listed, every config loads, the CLI answers --help."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"distillbev"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in {"pipeline", "stages", "cache_schemas"}:
            found.add(".".join(("distillbev",) + rel.parts))
    assert found == listed


def test_cli_lists_commands_and_every_command_has_help():
    from distillbev.cli import COMMANDS, cli

    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    available = cli.list_commands(None)
    assert available == list(COMMANDS), "every command of the CLI table must be installed"
    for name in available:
        assert name in result.output
    for name in available:
        sub = runner.invoke(cli, [name, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, (name, sub.output)


def shipped_configs():
    return sorted((ROOT / "configs").rglob("*.yaml"))


def config_class_for(path: Path):
    """Shipped configs are named after what they configure: teacher*.yaml, student_*.yaml."""
    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig

    kinds = {"teacher": TeacherExperimentConfig, "student": StudentExperimentConfig}
    matches = [cls for prefix, cls in kinds.items() if path.name.startswith(prefix)]
    assert len(matches) == 1, f"{path}: name it teacher*.yaml or student_*.yaml so its schema is known"
    return matches[0]


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    from distillbev.pipeline.config import load_config

    cfg = load_config(config_class_for(path), path)
    assert type(cfg).__name__.endswith("ExperimentConfig")

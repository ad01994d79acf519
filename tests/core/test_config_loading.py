"""Strict typed config loading: unknown keys, wrong types, overrides, and every shipped config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from distillbev.pipeline.config import dump_config, load_config
from distillbev.pipeline.errors import ConfigError


@dataclass
class Inner:
    rate: float = 0.1  # a float field
    sizes: tuple[int, int] = (1, 2)


@dataclass
class Outer:
    name: str = "x"
    epochs: int = 3
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    optional: float | None = None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_values_and_defaults(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "epochs: 5\ninner:\n  rate: 2\n  sizes: [3, 4]\ntags: [p]\n"))
    assert cfg.epochs == 5 and cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.sizes == (3, 4) and cfg.tags == ["p"] and cfg.name == "x" and cfg.optional is None


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "inner:\n  rte: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    assert str(path) in str(err.value) and "'inner.rte'" in str(err.value) and "rate" in str(err.value)


@pytest.mark.parametrize("text, key", [
    ("epochs: 2.5\n", "epochs"), ("epochs: true\n", "epochs"), ("inner:\n  rate: fast\n", "inner.rate"),
    ("mode: c\n", "mode"), ("inner:\n  sizes: [1, 2, 3]\n", "inner.sizes"), ("tags: p\n", "tags"),
    ("inner: 3\n", "inner"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write(tmp_path, text))
    assert f"'{key}" in str(err.value)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "epochs: 5\n"), ["epochs=7", "inner.rate=0.5", "optional=1e-3"])
    assert cfg.epochs == 7 and cfg.inner.rate == 0.5 and cfg.optional == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="epochs"):
        load_config(Outer, None, ["epochs=seven"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Outer, None, ["epochs"])
    with pytest.raises(ConfigError, match="'inner.nope'"):
        load_config(Outer, None, ["inner.nope=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "a: [1,\n"))


def test_dump_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.sizes=[5, 6]", "tags=[a, b]"])
    dump_config(cfg, tmp_path / "dump.yaml")
    assert load_config(Outer, tmp_path / "dump.yaml") == cfg


@pytest.mark.parametrize("name", ["bevdet", "bevdepth", "bevdet4d", "bevdepth4d"])
def test_nuscenes_student_configs_follow_the_reference_recipe(name):
    from distillbev.pipeline.distill.config import StudentExperimentConfig

    root = Path(__file__).resolve().parents[2] / "configs" / "nuscenes"
    cfg = load_config(StudentExperimentConfig, root / f"student_{name}.yaml")
    assert cfg.train.cbgs and cfg.train.epochs == 24
    # the reference's 64 samples per step at lr 2e-4, scaled linearly to this config's batch
    assert cfg.train.lr == pytest.approx(2e-4 * cfg.train.batch_size / 64, rel=1e-12)

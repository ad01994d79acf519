"""Strict typed config loading: unknown keys, wrong types, overrides, base files (tests/core/test_shipped_configs.py
loads every shipped config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from distillbev.pipeline.config import dump_config, load_config, load_config_data
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


def write_at(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_base_file_is_merged_under_the_file(tmp_path):
    write_at(tmp_path / "base.yaml", "name: base\nepochs: 5\ninner:\n  rate: 2\n  sizes: [3, 4]\ntags: [a, b]\n")
    child = write_at(tmp_path / "sub" / "child.yaml",
                     "base: ../base.yaml\nname: child\ninner:\n  rate: 0.5\ntags: [c]\n")
    cfg = load_config(Outer, child)
    assert cfg.name == "child" and cfg.epochs == 5  # the file wins; what it leaves out comes from the base
    assert cfg.inner.rate == 0.5 and cfg.inner.sizes == (3, 4)  # mappings merge key by key
    assert cfg.tags == ["c"]  # lists replace
    assert load_config_data(child) == {"name": "child", "epochs": 5, "inner": {"rate": 0.5, "sizes": [3, 4]},
                                       "tags": ["c"]}


def test_bases_chain_and_overrides_and_nulls_still_win(tmp_path):
    write_at(tmp_path / "a.yaml", "name: a\nepochs: 1\noptional: 0.5\n")
    write_at(tmp_path / "b.yaml", "base: a.yaml\nepochs: 2\n")
    c = write_at(tmp_path / "c.yaml", "base: b.yaml\nmode: b\noptional: null\n")
    cfg = load_config(Outer, c)
    assert (cfg.name, cfg.epochs, cfg.mode, cfg.optional) == ("a", 2, "b", None)
    assert load_config(Outer, c, ["epochs=9"]).epochs == 9


def test_a_base_cycle_names_the_files(tmp_path):
    a = write_at(tmp_path / "a.yaml", "base: b.yaml\nepochs: 1\n")
    b = write_at(tmp_path / "b.yaml", "base: a.yaml\nepochs: 2\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(Outer, a)
    assert str(a) in str(err.value) and str(b) in str(err.value)
    itself = write_at(tmp_path / "itself.yaml", "base: itself.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, itself)


def test_a_missing_or_malformed_base_names_both_files(tmp_path):
    child = write_at(tmp_path / "child.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(Outer, child)
    assert str(child) in str(err.value) and str(tmp_path / "nope.yaml") in str(err.value)
    with pytest.raises(ConfigError, match="'base'"):
        load_config(Outer, write_at(tmp_path / "list.yaml", "base: [a.yaml]\n"))
    write_at(tmp_path / "nested_base.yaml", "inner:\n  base: child.yaml\n")
    with pytest.raises(ConfigError, match="'inner.base'"):  # only the top level names a base
        load_config(Outer, tmp_path / "nested_base.yaml")


def test_errors_name_the_file_or_override_that_gave_the_key(tmp_path):
    base = write_at(tmp_path / "base.yaml", "epochs: 2.5\ninner:\n  rte: 2\n")
    child = write_at(tmp_path / "child.yaml", "base: base.yaml\nname: y\n")
    with pytest.raises(ConfigError, match="'inner.rte'") as err:
        load_config(Outer, child, ["epochs=3"])
    assert str(err.value).startswith(f"{base}: unknown key")
    with pytest.raises(ConfigError, match="'epochs'") as err:
        load_config(Outer, child, ["inner.rate=1"])
    assert str(err.value).startswith(f"{base}: key 'epochs': expected an integer")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, child, ["epochs=3", "inner={rate: fast}"])  # the override replaces the base's inner
    assert str(err.value).startswith("--set inner={rate: fast}: key 'inner.rate'")


@pytest.mark.parametrize("name", ["bevdet", "bevdepth", "bevdet4d", "bevdepth4d"])
def test_nuscenes_student_configs_follow_the_reference_recipe(name):
    from distillbev.pipeline.distill.config import StudentExperimentConfig

    root = Path(__file__).resolve().parents[2] / "configs" / "nuscenes"
    cfg = load_config(StudentExperimentConfig, root / f"student_{name}.yaml")
    assert cfg.train.cbgs and cfg.train.epochs == 24
    # the reference's 64 samples per step at lr 2e-4, scaled linearly to this config's batch
    assert cfg.train.lr == pytest.approx(2e-4 * cfg.train.batch_size / 64, rel=1e-12)

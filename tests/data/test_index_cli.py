"""`--infos DIR` on the commands that build a split index: it reaches `config.data.infos`, and from there the index.

The config-based commands are stopped right after their config is loaded (load_config wrapped to keep the config
and raise); `evaluate --gt-as-prediction` runs through to the saved index, built by a stand-in `index_from_infos`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillbev.pipeline import config as config_module
from distillbev.pipeline.config import load_config
from distillbev.pipeline.data.index import build_split_index
from distillbev.pipeline.data.loading import load_nuscenes
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.stages import evaluate, extract_teacher, pretrain_backbone, train_student, train_teacher
from distillbev.stages.options import infos_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "synthetic"


class ConfigLoaded(Exception):
    """Stops a command once its config is loaded."""


@pytest.fixture
def loaded(monkeypatch):
    """The configs the commands load (the command stops right after)."""
    configs = []

    def capture(cls, path=None, overrides=()):
        configs.append(load_config(cls, path, overrides))
        raise ConfigLoaded

    monkeypatch.setattr(config_module, "load_config", capture)
    return configs


def commands(tmp_path: Path) -> dict:
    """Each config-based command with its required arguments."""
    teacher, student = str(CONFIGS / "teacher.yaml"), str(CONFIGS / "student_bevdet.yaml")
    data = str(tmp_path)
    return {
        "train-teacher": (train_teacher.command, ["--config", teacher, "--dataroot", data, "--out",
                                                  str(tmp_path / "t")]),
        "extract-teacher": (extract_teacher.command, ["--config", teacher, "--dataroot", data, "--checkpoint",
                                                      str(tmp_path / "teacher.pth"), "--cache",
                                                      str(tmp_path / "cache.zarr"), "--split", "synth_train"]),
        "train-student": (train_student.command, ["--config", student, "--dataroot", data, "--out",
                                                  str(tmp_path / "s"), "--baseline"]),
        "pretrain-backbone": (pretrain_backbone.command, ["--config", student, "--dataroot", data, "--out",
                                                          str(tmp_path / "p")]),
    }


@pytest.mark.parametrize("name", ["train-teacher", "extract-teacher", "train-student", "pretrain-backbone"])
def test_infos_reaches_the_data_config(name, tmp_path, loaded):
    infos = tmp_path / "infos folder: 1"  # a name YAML would not read as a plain string unquoted
    infos.mkdir()
    command, args = commands(tmp_path)[name]
    result = CliRunner().invoke(command, [*args, "--infos", str(infos)])
    assert isinstance(result.exception, ConfigLoaded), result.output
    assert loaded[-1].data.infos == str(infos)
    # without --infos the config's own value (empty: the devkit tables) stays
    result = CliRunner().invoke(command, args)
    assert isinstance(result.exception, ConfigLoaded), result.output
    assert loaded[-1].data.infos == ""
    # the option refuses a folder that does not exist before anything runs
    result = CliRunner().invoke(command, [*args, "--infos", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output and len(loaded) == 2


@pytest.mark.parametrize("value", ["123", "yes", "a: b", "/data/infos"])
def test_infos_override_keeps_any_folder_name_a_string(value):
    assert load_config(TeacherExperimentConfig, None, infos_override(value)).data.infos == value
    assert infos_override(None) == []


def test_evaluate_builds_its_index_from_the_infos(tiny_slice_copy, tmp_path, monkeypatch):
    from distillbev.pipeline.data import index_store as index_store_module

    calls = []

    def from_infos(infos_path, dataroot, version, split, sweep_candidates, camera_channels=(), adjacent_count=0,
                   adjacent_interval=1, progress=True):
        calls.append((Path(infos_path).name, split))
        return build_split_index(load_nuscenes(dataroot, version), split, sweep_candidates, camera_channels,
                                 adjacent_count, adjacent_interval, progress=False)

    monkeypatch.setattr(index_store_module, "index_from_infos", from_infos)
    infos = tmp_path / "infos"
    infos.mkdir()
    (infos / "nuscenes_infos_tiny_val.pkl").write_bytes(b"read by the stand-in only")
    root = tiny_slice_copy.dataroot
    shutil.rmtree(root / ".distillbev", ignore_errors=True)  # indexes copied from the shared dataroot
    args = ["--dataroot", str(root), "--version", tiny_slice_copy.version, "--split", "tiny_val",
            "--gt-as-prediction", "--out", str(tmp_path / "eval"), "--infos", str(infos)]
    result = CliRunner().invoke(evaluate.command, args)
    assert result.exit_code == 0, result.output
    assert calls == [("nuscenes_infos_tiny_val.pkl", "tiny_val")]
    (saved,) = [p for p in (root / ".distillbev" / "index").iterdir() if p.is_dir()]
    assert json.loads((saved / "index.json").read_text())["metadata"]["parameters"]["source"] == "infos"
    assert json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())["mean_ap"] == pytest.approx(1.0)
    # a second evaluation maps the saved index
    assert CliRunner().invoke(evaluate.command, args).exit_code == 0 and len(calls) == 1


# ------------------------------------------------------------------------------ extract-teacher on infos alone
REAL = Path(__file__).resolve().parents[1] / "real" / "data"  # one real key frame and its mmdet3d info file


@pytest.mark.slow
def test_extract_teacher_runs_from_infos_without_tables(tmp_path):
    """The vendored real key frame has no devkit tables: `--infos` gives the split index, the pre-flight checks its
    files and fingerprints them, and the store is written; the fingerprint is the index's."""
    import torch

    from distillbev.pipeline.cache.reader import TeacherCache
    from distillbev.pipeline.data.config import DataConfig
    from distillbev.pipeline.data.index_store import open_split_index
    from distillbev.pipeline.data.preflight import index_fingerprint
    from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    dataroot = tmp_path / "nuscenes"  # the real files, without the index folder landing in the source tree
    dataroot.mkdir()
    (dataroot / "samples").symlink_to(REAL / "samples")
    infos = tmp_path / "infos"
    infos.mkdir()
    shutil.copy(REAL / "nuscenes_infos_val.pkl", infos)
    config = str(CONFIGS.parent / "nuscenes" / "teacher_pillar02.yaml")
    torch.manual_seed(0)
    model_config = load_config(TeacherExperimentConfig, config).model
    checkpoint = save_teacher_checkpoint(CenterPointTeacher(model_config), tmp_path / "teacher.pth", model_config)
    args = ["--config", config, "--dataroot", str(dataroot), "--checkpoint", str(checkpoint), "--cache",
            str(tmp_path / "cache.zarr"), "--split", "val", "--views", "1", "--layers", "neck",
            "--set", "data.version=v1.0-mini"]
    without = CliRunner().invoke(extract_teacher.command, args)  # the devkit pre-flight needs the tables
    assert without.exit_code == 1 and "v1.0-mini: version folder not found" in str(without.exception)
    assert not (tmp_path / "cache.zarr").exists()

    result = CliRunner().invoke(extract_teacher.command, [*args, "--infos", str(infos)])
    assert result.exit_code == 0, result.output
    assert "complete: 1 sample-views (1 samples x 1 views), 1 written" in result.output
    cache = TeacherCache.open(tmp_path / "cache.zarr")
    assert cache.sample_tokens == ["ca9a282c9e77460f8360f564131a8af5"]
    data = DataConfig(dataroot=str(dataroot), version="v1.0-mini", infos=str(infos), load_images=False)
    index = open_split_index(data, "val")  # the saved index the command built
    assert cache.manifest["dataset"]["fingerprint"] == index_fingerprint(index, 9)
    assert f"--infos {infos}" in cache.manifest["extraction"]["command"]

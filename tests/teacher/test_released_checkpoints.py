r"""Which released mmdet3d CenterPoint checkpoints load into our teacher, kept true against mmdet3d itself.

Every CenterPoint config mmdet3d ships (`mmdet3d/.mim/configs/centerpoint/`) is built with
`MODELS.build(Config.fromfile(cfg).model)`; its state_dict is what a checkpoint of that config holds. A pillar
config without the DCN head must have exactly our keys and shapes (configs/nuscenes/teacher_pillar02.yaml) and its
weights must load strictly; a voxel or DCN-head config must be refused by name with the reason. The model zoo's
list of released files (metafile.yml) must be checkpoint.RELEASED_CHECKPOINTS (docs/teacher_checkpoints.md).

tests/teacher/data/released/*.json ({state_dict key: shape}) hold the released configs our teacher refuses, for the
checks that run without mmdet3d (test_checkpoint_convention.py; the 0.1 m and 0.075 m voxel configs share one
list). To rewrite them after an mmdet3d upgrade:
    DISTILLBEV_WRITE_MMDET3D_KEYS=1 .venv-mmdet3d/bin/python -m pytest -m mmdet3d \
        tests/teacher/test_released_checkpoints.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

mmdet3d = pytest.importorskip(
    "mmdet3d", reason="mmdet3d is not installed; build the optional venv with `make venv-mmdet3d`")
pytest.importorskip("mmcv._ext", reason="mmcv was installed without its compiled ops (mmcv-lite); "
                                        "mmdet3d models need them: rebuild with `make venv-mmdet3d`")
import yaml  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmdet3d.registry import MODELS  # noqa: E402
from mmdet3d.utils import register_all_modules  # noqa: E402
from test_checkpoint_convention import REFUSALS, released_keys_file  # noqa: E402

from distillbev.pipeline.config import load_config  # noqa: E402
from distillbev.pipeline.errors import CheckpointError  # noqa: E402
from distillbev.pipeline.teacher.checkpoint import RELEASED_CHECKPOINTS, load_teacher_checkpoint  # noqa: E402
from distillbev.pipeline.teacher.config import TeacherExperimentConfig  # noqa: E402
from distillbev.pipeline.teacher.model import CenterPointTeacher  # noqa: E402

pytestmark = [pytest.mark.mmdet3d, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CONFIG = ROOT / "configs" / "nuscenes" / "teacher_pillar02.yaml"
CONFIG_DIR = Path(mmdet3d.__file__).parent / ".mim" / "configs" / "centerpoint"
SHIPPED = sorted(path.stem for path in CONFIG_DIR.glob("centerpoint_*.py"))


def verdict_of(config_name: str) -> str:
    """"loads", "voxel" or "dcn" from mmdet3d's config naming (voxel01 / voxel0075 / pillar02, head-dcn)."""
    if "_voxel" in config_name:
        return "voxel"
    return "dcn" if "head-dcn" in config_name else "loads"


def built_state(config_name: str) -> dict[str, torch.Tensor]:
    register_all_modules()
    return MODELS.build(Config.fromfile(str(CONFIG_DIR / f"{config_name}.py")).model).state_dict()


def test_model_zoo_lists_the_released_files_we_describe():
    metafile = yaml.safe_load((CONFIG_DIR / "metafile.yml").read_text())
    released = {Path(model["Config"]).stem: Path(model["Weights"]).name for model in metafile["Models"]}
    assert released == {config: file_name for config, (file_name, _) in RELEASED_CHECKPOINTS.items()}
    assert set(released) <= set(SHIPPED)
    assert all(verdict_of(config) == verdict for config, (_, verdict) in RELEASED_CHECKPOINTS.items())


@pytest.mark.parametrize("config_name", SHIPPED)
def test_each_shipped_config_loads_or_is_refused_by_name(config_name, tmp_path):
    state = built_state(config_name)
    path = tmp_path / f"{config_name}.pth"
    # as the model zoo's v1.0.0_models files were trained: mmdet3d 1.0 (mmcv runner) meta
    torch.save({"meta": {"mmdet3d_version": "1.0.0rc4"}, "state_dict": state}, path)
    model = CenterPointTeacher(load_config(TeacherExperimentConfig, TEACHER_CONFIG).model)
    verdict = verdict_of(config_name)
    if verdict == "loads":
        ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert {key: tuple(value.shape) for key, value in state.items()} == ours
        report = load_teacher_checkpoint(model, path, strict=True)
        assert report.num_loaded == len(state) and not report.missing and not report.unexpected
        assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
        return
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(model, path, strict=True)
    for phrase in REFUSALS[verdict]:
        assert phrase in str(error.value), (phrase, str(error.value))
    if "head-dcn" in config_name:  # a voxel DCN file names both reasons
        assert "DCN head" in str(error.value)


@pytest.mark.parametrize("config_name", [c for c, (_, v) in RELEASED_CHECKPOINTS.items() if v != "loads"])
def test_stored_released_keys_equal_real_mmdet3d(config_name):
    shapes = {key: list(value.shape) for key, value in sorted(built_state(config_name).items())}
    path = released_keys_file(config_name)
    if os.environ.get("DISTILLBEV_WRITE_MMDET3D_KEYS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f" {json.dumps(key)}: {json.dumps(shape)}" for key, shape in shapes.items()]
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one key per line, sorted
    stored = json.loads(path.read_text())
    assert stored == shapes, (f"{path} differs from mmdet3d {mmdet3d.__version__}; rewrite it with "
                              f"DISTILLBEV_WRITE_MMDET3D_KEYS=1 (see this file's docstring)")

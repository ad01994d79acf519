"""The stored key list of mmdet3d's CenterPoint-pillar and our teacher's state_dict, checked against real mmdet3d.

tests/teacher/data/mmdet3d_pillar_keys.json ({state_dict key: shape}) is what the key test that runs WITHOUT
mmdet3d compares our teacher with; this file keeps that list honest. To rewrite it after an mmdet3d upgrade:
    DISTILLBEV_WRITE_MMDET3D_KEYS=1 .venv-mmdet3d/bin/python -m pytest -m mmdet3d tests/teacher/test_mmdet3d_keys.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

mmdet3d = pytest.importorskip(
    "mmdet3d", reason="mmdet3d is not installed; build the optional venv with `make venv-mmdet3d`")
pytest.importorskip("mmcv._ext", reason="mmcv was installed without its compiled ops (mmcv-lite); "
                                        "mmdet3d models need them: rebuild with `make venv-mmdet3d`")

from mmengine.config import Config  # noqa: E402
from mmdet3d.registry import MODELS  # noqa: E402
from mmdet3d.utils import register_all_modules  # noqa: E402

from distillbev.pipeline.config import load_config  # noqa: E402
from distillbev.pipeline.teacher.config import TeacherExperimentConfig  # noqa: E402
from distillbev.pipeline.teacher.model import CenterPointTeacher  # noqa: E402

pytestmark = pytest.mark.mmdet3d

ROOT = Path(__file__).resolve().parents[2]
KEYS_FILE = Path(__file__).resolve().parent / "data" / "mmdet3d_pillar_keys.json"
TEACHER_CONFIG = ROOT / "configs" / "nuscenes" / "teacher_pillar02.yaml"
MMDET3D_CONFIG = "centerpoint/centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"


def mmdet3d_config() -> Config:
    register_all_modules()
    return Config.fromfile(str(Path(mmdet3d.__file__).parent / ".mim" / "configs" / MMDET3D_CONFIG))


@pytest.fixture(scope="module")
def mmdet3d_shapes() -> dict[str, list[int]]:
    model = MODELS.build(mmdet3d_config().model)
    return {key: list(value.shape) for key, value in sorted(model.state_dict().items())}


def test_stored_key_list_equals_real_mmdet3d(mmdet3d_shapes):
    if os.environ.get("DISTILLBEV_WRITE_MMDET3D_KEYS") == "1":
        KEYS_FILE.parent.mkdir(parents=True, exist_ok=True)
        lines = [f" {json.dumps(key)}: {json.dumps(shape)}" for key, shape in mmdet3d_shapes.items()]
        KEYS_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one key per line, sorted
    stored = json.loads(KEYS_FILE.read_text())
    assert list(stored) == sorted(stored), "the key list must be sorted"
    assert stored == mmdet3d_shapes, (
        f"{KEYS_FILE} differs from mmdet3d {mmdet3d.__version__}: only stored "
        f"{sorted(set(stored) - set(mmdet3d_shapes))[:5]}, only real {sorted(set(mmdet3d_shapes) - set(stored))[:5]}, "
        f"shapes {[k for k in stored if k in mmdet3d_shapes and stored[k] != mmdet3d_shapes[k]][:5]}; "
        f"rewrite it with DISTILLBEV_WRITE_MMDET3D_KEYS=1 (see this file's docstring)")


def test_mmdet3d_config_is_the_hard_pillar_net_we_emulate():
    model_config = mmdet3d_config().model
    encoder = model_config.pts_voxel_encoder
    assert encoder.type == "PillarFeatureNet" and encoder.in_channels == 5 and list(encoder.feat_channels) == [64]
    assert encoder.legacy is False and encoder.with_distance is False
    voxel = model_config.data_preprocessor.voxel_layer
    # no voxel_type in the config: Det3DDataPreprocessor's default, hard voxelization
    assert model_config.data_preprocessor.get("voxel_type", "hard") == "hard"
    ours = load_config(TeacherExperimentConfig, TEACHER_CONFIG).model
    assert voxel.max_num_points == ours.max_points_per_pillar == 20
    assert tuple(voxel.max_voxels)[1] == ours.max_pillars == 40000  # test-time limit
    assert list(voxel.point_cloud_range) == list(ours.point_cloud_range)
    assert list(voxel.voxel_size[:2]) == list(ours.pillar_size)


def test_our_teacher_state_dict_equals_mmdet3d(mmdet3d_shapes):
    model = CenterPointTeacher(load_config(TeacherExperimentConfig, TEACHER_CONFIG).model)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    only_ours = sorted(set(ours) - set(mmdet3d_shapes))
    only_mmdet3d = sorted(set(mmdet3d_shapes) - set(ours))
    assert not only_ours and not only_mmdet3d, f"only ours: {only_ours[:5]}; only mmdet3d: {only_mmdet3d[:5]}"
    mismatched = {k: (ours[k], mmdet3d_shapes[k]) for k in ours if ours[k] != mmdet3d_shapes[k]}
    assert not mismatched, f"shape mismatches (ours, mmdet3d): {mismatched}"
    assert mmdet3d_shapes["pts_voxel_encoder.pfn_layers.0.linear.weight"] == [64, 11]

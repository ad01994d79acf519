"""Which checkpoint files load: mmdet3d's box-convention change (v1.0.0rc0) read from the file's meta, and the
released CenterPoint variants our pillar teacher cannot run (voxel, DCN head), on hand-made files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from teacher_helpers import NUSCENES_CONFIG, tiny_model_config

from distillbev.pipeline.config import load_config
from distillbev.pipeline.errors import CheckpointError
from distillbev.pipeline.teacher.checkpoint import (LOADABLE_RELEASE, PILLAR_DCN_RELEASE, RELEASED_CHECKPOINTS,
                                                    load_teacher_checkpoint, save_teacher_checkpoint)
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher

LOGGER_NAME = "distillbev.pipeline.teacher.checkpoint"
DATA = Path(__file__).resolve().parent / "data"
# {state_dict key: shape} of the released configs (test_released_checkpoints.py keeps them equal to mmdet3d's)
RELEASED_KEYS_DIR = DATA / "released"
PILLAR_KEYS_FILE = DATA / "mmdet3d_pillar_keys.json"


def released_keys_file(config_name: str) -> Path:
    """The stored key list of a released config; the 0.1 m and 0.075 m voxel networks share theirs (the voxel
    size and the sparse grid are not in the state_dict), the loadable pillar config is mmdet3d_pillar_keys.json."""
    if RELEASED_CHECKPOINTS[config_name][1] == "loads":
        return PILLAR_KEYS_FILE
    return RELEASED_KEYS_DIR / (config_name.replace("voxel0075", "voxel").replace("voxel01", "voxel") + ".json")

# phrases the CheckpointError of each refusal must contain
REFUSALS: dict[str, tuple[str, ...]] = {
    "voxel": ("a CenterPoint-voxel checkpoint", "sparse 3D convolution keys", "not CenterPoint-pillar",
              LOADABLE_RELEASE),
    "dcn": ("a CenterPoint checkpoint with the DCN head", PILLAR_DCN_RELEASE,
            "Our CenterHead has no deformable convolution", LOADABLE_RELEASE),
}


@pytest.fixture
def source():
    torch.manual_seed(0)
    return CenterPointTeacher(tiny_model_config())


def write(path, source: CenterPointTeacher, **payload):
    """An mmdet3d-style file: {"state_dict": the model's tensors, **payload}."""
    torch.save({"state_dict": source.state_dict(), **payload}, path)
    return path


def loaded_equal(model: CenterPointTeacher, source: CenterPointTeacher) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("version", ["0.17.3", "0.18.1", "v0.1.0", "0.16.0+abc123"])
def test_pre_1_0_mmdet3d_file_is_refused_with_version_reason_and_remedy(tmp_path, source, version):
    path = write(tmp_path / "old_zoo.pth", source, meta={"mmdet3d_version": version, "mmcv_version": "1.3.8",
                                                         "config": "model = dict(type='CenterPoint')"})
    model = CenterPointTeacher(tiny_model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(model, path)
    message = str(error.value)
    assert message.startswith(f"{path}: written by mmdet3d {version} (meta['mmdet3d_version'])")
    assert "1.0.0rc0" in message and "(w, l, h) became (l, w, h)" in message and "-yaw - pi/2" in message
    assert "length and width swapped" in message
    assert LOADABLE_RELEASE in message and "distillbev train-teacher" in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "nothing may be loaded"


@pytest.mark.parametrize("version", ["1.0.0rc0", "1.0.0rc4", "1.4.0"])
def test_mmdet3d_file_of_1_0_or_later_loads_and_reports_its_version(tmp_path, source, version, caplog):
    path = write(tmp_path / "zoo.pth", source, meta={"mmdet3d_version": version})
    model = CenterPointTeacher(tiny_model_config())
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        report = load_teacher_checkpoint(model, path)
    assert report.source == "mmdet3d" and report.mmdet3d_version == version
    assert report.box_convention == f"mmdet3d {version} (meta['mmdet3d_version'], >= 1.0.0rc0)"
    assert loaded_equal(model, source) and warnings_of(caplog) == []


def test_mmengine_era_file_loads_without_a_warning(tmp_path, source, caplog):
    # mmengine's Runner.save_checkpoint: meta with cfg / mmengine_version / dataset_meta, and a message_hub
    path = write(tmp_path / "epoch_20.pth", source, message_hub={"log_scalars": {}},
                 meta={"cfg": "model = dict(...)", "seed": 0, "epoch": 20, "iter": 1000,
                       "mmengine_version": "0.10.7", "dataset_meta": {"classes": ["car"]}})
    hub_only = write(tmp_path / "hub_only.pth", source, message_hub={}, meta={"epoch": 20})
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        report = load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), path)
        hub_report = load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), hub_only)
    assert report.mmdet3d_version is None and report.box_convention.startswith("mmengine 0.10.7 file")
    assert hub_report.box_convention.startswith("mmengine ? file")
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("kind", ["bare", "no_meta", "meta_without_version", "unreadable_version"])
def test_file_without_version_information_loads_with_a_loud_warning(tmp_path, source, kind, caplog):
    path = tmp_path / f"{kind}.pth"
    if kind == "bare":
        torch.save(source.state_dict(), path)
    elif kind == "no_meta":
        write(path, source)
    elif kind == "meta_without_version":
        write(path, source, meta={"epoch": 20, "mmcv_version": "1.4.0"})
    else:
        write(path, source, meta={"mmdet3d_version": "dev"})
    model = CenterPointTeacher(tiny_model_config())
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        report = load_teacher_checkpoint(model, path)
    assert loaded_equal(model, source)
    expected = {"bare": "a bare state_dict", "no_meta": "its meta records no mmdet3d or mmengine version (no meta)",
                "meta_without_version": "its meta records no mmdet3d or mmengine version (keys: ['epoch', "
                                        "'mmcv_version'])",
                "unreadable_version": "meta['mmdet3d_version'] is 'dev', not a version number"}[kind]
    assert report.box_convention == f"unknown ({expected})"
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"{path}: cannot tell which LiDAR box convention this checkpoint was trained in "
                              f"({expected})")
    assert "mmdet3d < 1.0.0rc0" in warning and "length and width swapped" in warning


def test_our_own_checkpoint_needs_no_version(tmp_path, source, caplog):
    path = save_teacher_checkpoint(source, tmp_path / "teacher.pth", tiny_model_config(), {"epoch": 1})
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        report = load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), path)
    assert report.source == "distillbev" and report.box_convention == "distillbev checkpoint"
    assert warnings_of(caplog) == []


def dcn_head_keys(task: int, channels: int = 16) -> dict[str, torch.Tensor]:
    """The keys mmdet3d's DCNSeparateHead adds to a task head (deformable conv with its offset conv, cls_head)."""
    prefix = f"pts_bbox_head.task_heads.{task}"
    return {f"{prefix}.feature_adapt_cls.weight": torch.zeros(channels, channels // 4, 3, 3),
            f"{prefix}.feature_adapt_cls.conv_offset.weight": torch.zeros(18, channels, 3, 3),
            f"{prefix}.feature_adapt_cls.conv_offset.bias": torch.zeros(18),
            f"{prefix}.feature_adapt_reg.weight": torch.zeros(channels, channels // 4, 3, 3),
            f"{prefix}.feature_adapt_reg.conv_offset.weight": torch.zeros(18, channels, 3, 3),
            f"{prefix}.feature_adapt_reg.conv_offset.bias": torch.zeros(18),
            f"{prefix}.cls_head.0.conv.weight": torch.zeros(channels, channels, 3, 3)}


def test_dcn_head_checkpoint_is_refused_by_name(tmp_path, source):
    state = dict(source.state_dict())
    for task in range(6):
        state.update(dcn_head_keys(task))
    path = tmp_path / "dcn.pth"
    torch.save({"state_dict": state, "meta": {"mmdet3d_version": "1.0.0rc4"}}, path)
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), path)
    message = str(error.value)
    assert message.startswith(f"{path}: a CenterPoint checkpoint with the DCN head (DCNSeparateHead, released as "
                              f"{PILLAR_DCN_RELEASE}")
    assert "36 of its head keys belong to deformable convolutions" in message  # 6 tasks x 6 deformable keys
    assert "pts_bbox_head.task_heads.0.feature_adapt_cls.conv_offset.bias" in message
    assert "no deformable convolution" in message and LOADABLE_RELEASE in message


def test_voxel_checkpoint_is_refused_by_name(tmp_path, source):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("pts_voxel_encoder.")}
    state["pts_middle_encoder.conv_input.0.weight"] = torch.zeros(3, 3, 3, 5, 16)
    state["pts_middle_encoder.encoder_layers.encoder_layer1.0.0.weight"] = torch.zeros(3, 3, 3, 16, 16)
    path = tmp_path / "voxel.pth"
    torch.save({"state_dict": state, "meta": {"mmdet3d_version": "1.0.0rc4"}}, path)
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), path)
    message = str(error.value)
    assert message.startswith(f"{path}: a CenterPoint-voxel checkpoint (2 sparse 3D convolution keys such as "
                              f"pts_middle_encoder.conv_input.0.weight; released as centerpoint_01voxel_")
    assert "centerpoint_0075voxel_" in message and "not CenterPoint-pillar" in message and LOADABLE_RELEASE in message
    state.update(dcn_head_keys(0))  # a voxel file with the DCN head: named as voxel, the DCN head mentioned too
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"CenterPoint-voxel checkpoint .* It also has the DCN head \(6 "):
        load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), path)


def test_architecture_is_checked_before_the_version(tmp_path, source):
    # a pre-1.0 DCN file: the architecture is the reason that no newer file of the same model would fix
    state = {**source.state_dict(), **dcn_head_keys(0)}
    torch.save({"state_dict": state, "meta": {"mmdet3d_version": "0.17.1"}}, tmp_path / "old_dcn.pth")
    with pytest.raises(CheckpointError, match="with the DCN head"):
        load_teacher_checkpoint(CenterPointTeacher(tiny_model_config()), tmp_path / "old_dcn.pth")


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(RELEASED_CHECKPOINTS))
def test_released_key_sets_load_or_are_refused_by_name(config_name, tmp_path):
    """The model zoo's files as their configs' key lists say they are (zeros of the real shapes, 1.0-era meta)."""
    file_name, verdict = RELEASED_CHECKPOINTS[config_name]
    state = {key: torch.zeros(shape, dtype=torch.int64 if key.endswith("num_batches_tracked") else torch.float32)
             for key, shape in json.loads(released_keys_file(config_name).read_text()).items()}
    path = tmp_path / file_name
    torch.save({"meta": {"mmdet3d_version": "1.0.0rc4"}, "state_dict": state}, path)
    model = CenterPointTeacher(load_config(TeacherExperimentConfig, NUSCENES_CONFIG).model)
    if verdict == "loads":
        report = load_teacher_checkpoint(model, path)
        assert report.num_loaded == len(state) == len(model.state_dict())
        assert all(float(value.abs().sum()) == 0 for value in model.state_dict().values())
        return
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(model, path)
    for phrase in REFUSALS[verdict]:
        assert phrase in str(error.value), phrase

"""Every shipped config loads strictly, gives its BEV range once and derives the other copies in agreement.

A teacher gives model.point_cloud_range; its data crop, head grid (pillar_size x the output stride) and the
post_center_range of each head follow. A student gives model.bev; its data crop (bev's x / y, z [-5, 3]), head.grid
(bev's grid, or for BEVFormer the teacher's grid over the same extent), bevformer.bev and post_center_range follow.
Records written before the derivation (every copy explicit, no post_center_margin) must still load to the same config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distillbev.pipeline.config import from_dict, load_config, load_config_data, to_dict
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.decoder import decoder_head_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
# Half the x / y extent of the BEV and of the region decoded centres are kept in, per family (metres).
HALF_EXTENT = {"synthetic": (32.0, 40.0), "street": (51.2, 61.2), "nuscenes": (51.2, 61.2)}
# Keys a shipped file leaves to the derivation.
DERIVED_KEYS = ("data.point_cloud_range", "model.head.post_center_range", "model.bevformer.bev",
                "model.bevformer.head.post_center_range", "model.decoder.head.post_center_range")


def experiment_class(path: Path) -> type:
    return TeacherExperimentConfig if path.name.startswith("teacher") else StudentExperimentConfig


def name_of(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def dotted_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= dotted_keys(value, dotted)
    return keys


def without(data, name: str):
    """`data` with every key `name` removed, at any depth."""
    if isinstance(data, dict):
        return {k: without(v, name) for k, v in data.items() if k != name}
    return data


def assert_post_center(post_center_range, half: float) -> None:
    assert tuple(post_center_range) == pytest.approx((-half, -half, -10.0, half, half, 10.0), abs=1e-9)


def test_every_shipped_config_is_a_teacher_or_a_student():
    assert len(SHIPPED) == 24
    assert all(path.name.startswith(("teacher", "student_")) for path in SHIPPED)
    assert {path.parent.name for path in SHIPPED} == set(HALF_EXTENT)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name.startswith("teacher")], ids=name_of)
def test_teacher_ranges_agree(path):
    cfg = load_config(TeacherExperimentConfig, path)
    model = cfg.model
    half, kept = HALF_EXTENT[path.parent.name]
    assert tuple(model.point_cloud_range) == (-half, -half, -5.0, half, half, 3.0)
    assert tuple(cfg.data.point_cloud_range) == tuple(model.point_cloud_range)
    grid = model.head.grid
    assert (grid.x_min, grid.x_max, grid.y_min, grid.y_max) == (-half, half, -half, half)
    assert grid.resolution == pytest.approx(model.pillar_size[0] * model.out_size_factor)
    assert grid.shape == ((128, 128) if path.parent.name == "nuscenes" else (80, 80))
    assert_post_center(model.head.post_center_range, kept)
    if model.decoder is not None:
        decoded = decoder_head_spec(model)
        assert (decoded.bev.x_min, decoded.bev.x_max, decoded.bev.z_min, decoded.bev.z_max) == (-half, half, -5.0, 3.0)
        assert_post_center(model.decoder.head.post_center_range, kept)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name.startswith("student")], ids=name_of)
def test_student_ranges_agree(path):
    cfg = load_config(StudentExperimentConfig, path)
    model, bev = cfg.model, cfg.model.bev
    half, kept = HALF_EXTENT[path.parent.name]
    assert (bev.x_min, bev.x_max, bev.y_min, bev.y_max) == (-half, half, -half, half)
    assert tuple(cfg.data.point_cloud_range) == (-half, -half, -5.0, half, half, 3.0)
    grid = model.head.grid
    assert (grid.x_min, grid.x_max, grid.y_min, grid.y_max) == (-half, half, -half, half)
    if model.is_transformer:
        assert model.bevformer.bev == bev
        assert_post_center(model.bevformer.head.post_center_range, kept)  # model.head only gives the teacher's grid
        assert grid.resolution == (0.8 if path.parent.name == "nuscenes" else bev.resolution)
    else:
        assert grid.matches(bev.grid())
        assert_post_center(model.head.post_center_range, kept)


@pytest.mark.parametrize("path", SHIPPED, ids=name_of)
def test_shipped_files_give_the_range_once(path):
    keys = dotted_keys(load_config_data(path))
    assert not keys & set(DERIVED_KEYS)
    if "model.head.grid" in keys:  # only where it is a choice of its own: the BEVFormer student's teacher grid
        cfg = load_config(StudentExperimentConfig, path)
        assert cfg.model.is_transformer and cfg.model.head.grid.resolution != cfg.model.bev.resolution


def test_street_configs_name_only_what_differs():
    for path in sorted((CONFIGS / "street").glob("*.yaml")):
        base = yaml.safe_load(path.read_text())["base"]
        assert (path.parent / base).is_file(), name_of(path)


@pytest.mark.parametrize("path", SHIPPED, ids=name_of)
def test_records_written_before_and_after_load_to_the_same_config(path):
    """A run's config.yaml, a checkpoint or a cache manifest holds to_dict(cfg): every copy of the range explicit.
    Those written before post_center_margin existed lack it; both forms load back to the same config."""
    cls = experiment_class(path)
    cfg = load_config(cls, path)
    record = to_dict(cfg)
    assert from_dict(cls, record, source="record") == cfg
    older = without(record, "post_center_margin")
    assert older != record and from_dict(cls, older, source="older record") == cfg


def test_a_copy_that_disagrees_is_an_error():
    from distillbev.pipeline.errors import ConfigError

    teacher = CONFIGS / "synthetic" / "teacher.yaml"
    with pytest.raises(ConfigError, match="post_center_margin"):
        load_config(TeacherExperimentConfig, teacher, ["model.head.post_center_range=[-50, -50, -10, 50, 50, 10]"])
    with pytest.raises(ConfigError, match="head.grid"):
        load_config(TeacherExperimentConfig, teacher,
                    ["model.head.grid={x_min: -51.2, x_max: 51.2, y_min: -51.2, y_max: 51.2, resolution: 0.8}"])
    moved = load_config(TeacherExperimentConfig, teacher, ["model.point_cloud_range=[-16, -16, -5, 16, 16, 3]"])
    assert moved.model.head.grid.shape == (40, 40) and tuple(moved.data.point_cloud_range)[3] == 16
    assert_post_center(moved.model.head.post_center_range, 24.0)


def test_post_center_range_from_a_margin():
    from distillbev.pipeline.heads.post_center import resolve_post_center_range

    world_one = (-32.0, 32.0, -32.0, 32.0)
    assert resolve_post_center_range(None, 8.0, world_one) == ((-40.0, -40.0, -10.0, 40.0, 40.0, 10.0), 8.0)
    assert resolve_post_center_range(None, None, (-51.2, 51.2, -51.2, 51.2)) == (
        (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0), 10.0)
    # an explicit range (a record written before the margin) is kept, with the margin it makes
    assert resolve_post_center_range((-40, -40, -10, 40, 40, 10), None, world_one) == (
        (-40.0, -40.0, -10.0, 40.0, 40.0, 10.0), 8.0)
    assert resolve_post_center_range((-40, -50, -10, 40, 40, 10), None, world_one)[1] is None
    assert resolve_post_center_range((-40, -40, -10, 40, 40, 10), 8.0, world_one)[1] == 8.0
    with pytest.raises(ValueError, match="give the range once"):
        resolve_post_center_range((-40, -40, -10, 40, 40, 10), 10.0, world_one)
    with pytest.raises(ValueError, match="at least 0"):
        resolve_post_center_range(None, -1.0, world_one)


def test_the_data_crop_follows_the_model_unless_given():
    from distillbev.pipeline.data.config import DEFAULT_POINT_CLOUD_RANGE, DataConfig
    from distillbev.pipeline.teacher.config import TeacherModelConfig

    assert DataConfig().point_cloud_range == DEFAULT_POINT_CLOUD_RANGE  # on its own: the default crop
    small = TeacherModelConfig(point_cloud_range=(-12.8, -12.8, -5.0, 12.8, 12.8, 3.0), pillar_size=(0.4, 0.4),
                               neck_upsample_strides=(1.0, 2.0, 4.0))
    assert small.head.grid.shape == (32, 32) and small.head.post_center_range[3] == pytest.approx(22.8)
    followed = TeacherExperimentConfig(model=small)
    assert followed.data.point_cloud_range == (-12.8, -12.8, -5.0, 12.8, 12.8, 3.0)
    wider = (-20.0, -20.0, -5.0, 20.0, 20.0, 3.0)  # a given crop is a choice of its own and is kept
    kept = TeacherExperimentConfig(data=DataConfig(point_cloud_range=wider), model=small)
    assert kept.data.point_cloud_range == wider
    student = load_config(StudentExperimentConfig, None, ["model.bev.x_min=-16", "model.bev.x_max=16",
                                                          "model.bev.y_min=-16", "model.bev.y_max=16"])
    assert student.data.point_cloud_range == (-16.0, -16.0, -5.0, 16.0, 16.0, 3.0)

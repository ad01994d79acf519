"""Cached teacher targets give the same DistillBEV loss as the teacher run live on the same augmented view.

A tiny synthetic dataroot (one train sample), a small randomly initialised CenterPoint-pillar teacher saved as a
checkpoint, and a two-view cache written by the real `extract-teacher` stage (view 1 is a rotation/scale/flip draw).
For each view, ONE Sample is built with `dataset.get(0, bev_aug=<the cached view>)` on a test-mode dataset (test-mode
sweeps, as the extraction uses), and the same student, batch and DistillBEV loss are evaluated twice through
`training_step`: with the targets read from the cache, and with `targets=None`, which makes the step run the live
teacher on the batch's (augmented) points.

Tolerance: relative 1e-2 on every loss term. The store keeps features and the heatmap in float16 (relative rounding
<= 2^-11 ~ 4.9e-4 per value) and the attention in float32. A loss term is a weighted sum of (S' - T)^2 over channels
and cells, so the fp16 rounding of T moves it by about 2 * 4.9e-4 * |T| / |S' - T| relative in the worst cell and far
less on average; the false-positive region thresholds the fp16 heatmap at 0.1, where a rounding can move a single
cell across the threshold (a change of about 1 / N_fp of the FP term). 1e-2 covers both with margin, while a wrong
view, sweep set or augmentation moves the terms by far more (checked below).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.config import dump_config, to_dict
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.distill.config import StudentExperimentConfig, StudentTrainConfig
from distillbev.pipeline.distill.run import build_distill_loss, live_teacher
from distillbev.pipeline.distill.targets import TargetsItem, collate_with_targets
from distillbev.pipeline.distill.train import DistillationSetup, training_step
from distillbev.pipeline.geometry.bev import BEVGrid, BEVRange
from distillbev.pipeline.heads.center_head import CenterHeadConfig
from distillbev.pipeline.student.config import DepthBins, ImageBackboneConfig, StudentModelConfig
from distillbev.pipeline.student.model import CameraStudent
from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
from distillbev.pipeline.teacher.config import TeacherDecoderConfig, TeacherExperimentConfig, TeacherModelConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.stages.extract_teacher import command as extract_command

pytestmark = pytest.mark.slow

HALF_EXTENT = 16.0  # metres: teacher canvas 80x80 at 0.4 m, head / student BEV 40x40 at 0.8 m
NUM_SWEEPS = 1
RELATIVE_TOLERANCE = 1e-2


@dataclasses.dataclass
class TinyWorld:
    """A tiny synthetic dataroot, a random teacher checkpoint and a teacher cache extracted from it."""

    dataroot: Path
    teacher_config: TeacherExperimentConfig
    checkpoint: Path
    cache_path: Path

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return (-HALF_EXTENT, HALF_EXTENT, -HALF_EXTENT, HALF_EXTENT)


def tiny_head() -> CenterHeadConfig:
    return CenterHeadConfig(grid=BEVGrid(-HALF_EXTENT, HALF_EXTENT, -HALF_EXTENT, HALF_EXTENT, 0.8),
                            shared_channels=16, head_channels=8,
                            post_center_range=(-20.0, -20.0, -10.0, 20.0, 20.0, 10.0))


def tiny_data_config(dataroot: Path, load_images: bool, point_features: str = "lidar") -> DataConfig:
    point_range = (-HALF_EXTENT, -HALF_EXTENT, -5.0, HALF_EXTENT, HALF_EXTENT, 3.0)
    return DataConfig(dataroot=str(dataroot), version="v1.0-synthetic", train_split="synth_train",
                      val_split="synth_val", num_sweeps=NUM_SWEEPS, sweep_candidates=NUM_SWEEPS,
                      point_cloud_range=point_range, load_images=load_images, final_size=(64, 192),
                      point_features=point_features)


def tiny_teacher_config(dataroot: Path, point_features: str = "lidar") -> TeacherExperimentConfig:
    """A narrow pillar teacher: canvas 80x80, SECOND stages 40/20/10, SECONDFPN -> 40x40 head grid."""
    model = TeacherModelConfig(
        point_cloud_range=(-HALF_EXTENT, -HALF_EXTENT, -5.0, HALF_EXTENT, HALF_EXTENT, 3.0), pillar_size=(0.4, 0.4),
        pillar_channels=16, backbone_channels=(16, 32, 32), backbone_layer_nums=(1, 1, 1),
        backbone_strides=(2, 2, 2), neck_channels=(16, 16, 16), neck_upsample_strides=(1.0, 2.0, 4.0),
        head=tiny_head(), point_features=17 if point_features == "mvp" else 5)
    return TeacherExperimentConfig(data=tiny_data_config(dataroot, False, point_features), model=model)


def tiny_student_config(dataroot: Path) -> StudentExperimentConfig:
    """A quarter-width BEVDet on 64x192 images with the teacher's BEV extent (40x40 at 0.8 m); default KD layers."""
    model = StudentModelConfig(
        variant="bevdet", image_size=(64, 192), backbone=ImageBackboneConfig(depth=18, width_multiplier=0.25),
        image_neck_channels=32, depth_bins=DepthBins(2.0, 18.0, 1.0),
        bev=BEVRange(-HALF_EXTENT, HALF_EXTENT, -HALF_EXTENT, HALF_EXTENT, 0.8, -5.0, 3.0), lss_channels=16,
        depth_net_channels=32, bev_encoder_channels=(16, 32, 64), bev_encoder_blocks=(1, 1, 1),
        bev_neck_channels=32, head=tiny_head())
    # float32 on every machine (`auto` would pick bf16 where the CPU has it): the equivalence tests compare exactly
    return StudentExperimentConfig(data=tiny_data_config(dataroot, load_images=True), model=model,
                                   train=StudentTrainConfig(precision="fp32"))


def student_loss_parts(world: TinyWorld):
    """(student config, a student seeded with 1 in train mode, its DistillBEV loss, the cache, the train split) of a
    tiny world: what the loss tests build their steps from."""
    cfg = tiny_student_config(world.dataroot)
    torch.manual_seed(1)
    student = CameraStudent(cfg.model).train()
    cache = TeacherCache.open(world.cache_path)
    distill_loss = build_distill_loss(cfg, student, cache.manifest["layers"])
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="train")
    return cfg, student, distill_loss, cache, dataset


def build_tiny_world(folder: Path, views: int, seed: int = 0, point_features: str = "lidar",
                     decoder: TeacherDecoderConfig | None = None, layers: str | None = None,
                     dtype: str = "fp16") -> TinyWorld:
    """Generate the dataroot, save a random teacher and run `extract-teacher` (`dtype`, `views` views). With
    point_features "mvp": instance masks, virtual points and a 17-dim MVP teacher; with `decoder`, a teacher with
    a DETR decoder; `layers` = extract-teacher's --layers (its default when None). World 1: one key frame per scene
    with sweeps before it (world 2, like nuScenes, has no sweep before a scene's first key frame)."""
    dataroot = folder / "synthetic"
    mvp = point_features == "mvp"
    generate_dataset(dataroot, SyntheticConfig.boxes(num_scenes=2, samples_per_scene=1, val_scenes=1,
                                                     sweeps_per_key_frame=NUM_SWEEPS, objects_per_scene=16,
                                                     visibility_range=20.0, lidar_azimuth_steps=512,
                                                     instance_masks=mvp),
                     progress=False)
    if mvp:
        from distillbev.pipeline.mvp.run import make_virtual_points

        make_virtual_points(dataroot, "v1.0-synthetic", sweeps=NUM_SWEEPS, progress=False)
    teacher_config = tiny_teacher_config(dataroot, point_features)
    teacher_config.model.decoder = decoder
    config_path = folder / "teacher.yaml"
    dump_config(teacher_config, config_path)
    torch.manual_seed(seed)
    checkpoint = save_teacher_checkpoint(CenterPointTeacher(teacher_config.model), folder / "teacher.pth",
                                         config=teacher_config.model)
    cache_path = folder / "cache.zarr"
    result = CliRunner().invoke(extract_command, [
        "--config", str(config_path), "--dataroot", str(dataroot), "--checkpoint", str(checkpoint),
        "--cache", str(cache_path), "--split", "synth_train", "--views", str(views), "--seed", "3", "--dtype", dtype,
        *(["--layers", layers] if layers else [])],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return TinyWorld(dataroot, teacher_config, checkpoint, cache_path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("distill_equivalence"), views=2)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs() / b.abs().clamp_min(1e-12))


@pytest.fixture(scope="module")
def step_losses(world):
    """Loss terms per view: {view: (cached-target terms, online-teacher terms, BEVAugmentation)}."""
    return view_losses(world)


def view_losses(world: TinyWorld) -> dict:
    torch.manual_seed(1)
    cfg = tiny_student_config(world.dataroot)
    cfg.data.point_features = world.teacher_config.data.point_features  # the online teacher's points
    cache = TeacherCache.open(world.cache_path)
    student = CameraStudent(cfg.model).train()
    distill_loss = build_distill_loss(cfg, student, cache.manifest["layers"])
    teacher = live_teacher(to_dict(world.teacher_config.model), world.checkpoint, torch.device("cpu"))
    layers = [(pair.student, pair.teacher) for pair in cfg.distill.layers]
    cached_setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=None, layers=layers)
    online_setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=teacher, layers=layers)
    # test mode: no random sweeps or image augmentation, the teacher's sweep count (as the extraction loads them)
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="test")
    index = cache.index_of(dataset.sample_tokens[0])
    results = {}
    with torch.no_grad():  # the loss values are compared, no backward is needed
        for view in range(cache.num_views):
            augmentation = cache.bev_aug(index, view)
            sample = dataset.get(0, bev_aug=augmentation)
            cached = cache.read(index, view)
            batch, targets = collate_with_targets([(sample, TargetsItem(cached.features, cached.heatmap,
                                                                        cached.attention))])
            from_cache = training_step(cached_setup, batch, targets, cfg.model.head.grid)
            online = training_step(online_setup, batch, None, cfg.model.head.grid)
            results[view] = ({k: v.detach() for k, v in from_cache.items()},
                             {k: v.detach() for k, v in online.items()}, augmentation)
    return results


def test_view_one_is_a_real_augmentation(step_losses):
    identity = step_losses[0][2]
    augmented = step_losses[1][2]
    assert identity.is_identity
    assert not augmented.is_identity
    assert abs(augmented.rotation) > 0.01 or augmented.flip_x or augmented.flip_y


@pytest.mark.parametrize("view", [0, 1])
def test_cached_targets_give_the_online_teacher_loss(step_losses, view):
    check_cached_equals_online(step_losses, view)


def test_an_mvp_teacher_cached_targets_give_its_online_loss(tmp_path):
    """The same equivalence with the 17-dim MVP teacher: the replayed view moves the virtual points too."""
    mvp_world = build_tiny_world(tmp_path, views=2, point_features="mvp")
    manifest = TeacherCache.open(mvp_world.cache_path).manifest
    assert manifest["dataset"]["point_loading"]["point_features"] == "mvp"
    points = NuScenesDetectionDataset(mvp_world.teacher_config.data, "synth_train", "test").get(0).points
    assert int((points[:, 15] == -1).sum()) > 100  # the teacher's input holds virtual points
    losses = view_losses(mvp_world)
    assert not losses[1][2].is_identity
    for view in (0, 1):
        check_cached_equals_online(losses, view)


def check_cached_equals_online(step_losses: dict, view: int) -> None:
    from_cache, online, _ = step_losses[view]
    assert set(from_cache) == set(online)
    kd_terms = sorted(k for k in online if k.startswith("kd_"))
    # the default recipe's three layers, the FP term on the neck only
    assert {"kd_neck_fp", "kd_backbone1_fg", "kd_backbone2_bg", "kd_neck_spatial"} <= set(kd_terms)
    for name in kd_terms:
        assert torch.isfinite(online[name])
        assert relative_difference(from_cache[name], online[name]) < RELATIVE_TOLERANCE, (
            f"view {view} {name}: cached {float(from_cache[name]):.6g} vs online {float(online[name]):.6g}")
    for name in set(online) - set(kd_terms):  # detection terms see the same batch: identical
        assert float(from_cache[name]) == float(online[name])


def test_the_comparison_detects_a_wrong_view(world, step_losses):
    """Targets of view 1 against the student on view 0 differ by far more than the tolerance."""
    from_cache_view1, _, _ = step_losses[1]
    _, online_view0, _ = step_losses[0]
    worst = max(relative_difference(from_cache_view1[k], online_view0[k])
                for k in online_view0 if k.startswith("kd_") and not k.endswith("_spatial"))
    assert worst > 10 * RELATIVE_TOLERANCE


def test_cached_maps_match_the_teacher_within_fp16_rounding(world):
    """The stored maps themselves: the live teacher on view 1's cloud, read back from the fp16 store."""
    cache = TeacherCache.open(world.cache_path)
    teacher = live_teacher(to_dict(world.teacher_config.model), world.checkpoint, torch.device("cpu"))
    dataset = NuScenesDetectionDataset(world.teacher_config.data, "synth_train", mode="test")
    sample = dataset.get(0, bev_aug=cache.bev_aug(0, 1), with_images=False)
    cached = cache.read(0, 1)
    with torch.no_grad():
        outputs = teacher([sample.points])
    for name, stored in cached.features.items():
        live = outputs.features[name][0]
        scale = float(live.abs().max())
        assert float((stored - live).abs().max()) <= scale * 2 ** -10, name
        assert float((stored - live).abs().max()) > 0 or scale == 0  # it really went through float16
    np.testing.assert_array_equal(cached.occupancy.numpy(), outputs.occupancy[0].numpy())

"""Stage-two wiring against hand-worked expectations: which cached view a training sample replays, the student's
learning-rate schedule, and the inheritance of the teacher's task heads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from module_loader import load_tests_module

from distillbev.pipeline.cache.reader import TeacherTargets
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.distill.config import StudentExperimentConfig, StudentTrainConfig
from distillbev.pipeline.distill.inherit import inherit_teacher_head
from distillbev.pipeline.distill.targets import DistillationDataset
from distillbev.pipeline.distill.train import learning_rate
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.distill.warp import warp_bev
from distillbev.pipeline.geometry.bev import BEVAugmentation, sample_bev_augmentation


class FakeCache:
    """Three views per sample with distinct augmentations; `read` returns maps that name the sample-view."""

    num_views = 3

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.views = {(s, v): BEVAugmentation(rotation=0.1 * (v + 1) + s, scale=1.0 + 0.01 * v, flip_x=v == 1)
                      for s in range(len(tokens)) for v in range(self.num_views)}
        self.reads: list[tuple[int, int]] = []

    def index_of(self, token: str) -> int:
        return self.tokens.index(token)

    def read(self, sample_index: int, view: int, layers: list[str] | None = None,
             dequantize: bool = True) -> TeacherTargets:
        """The one cached layer, "neck", whatever `layers` asks for (the datasets here have no loss spec); float
        maps, as an fp16 store's, whatever `dequantize` says."""
        self.reads.append((sample_index, view))
        marker = torch.full((2, 4, 4), float(10 * sample_index + view))
        return TeacherTargets(self.tokens[sample_index], view, self.views[(sample_index, view)], {"neck": marker},
                              marker[:1].repeat(10, 1, 1), {"neck": marker[0]}, torch.zeros(8, 8, dtype=torch.bool))


class FakeDataset:
    """Records the augmentation each `get` was asked to apply."""

    def __init__(self, tokens: list[str]) -> None:
        self.sample_tokens = tokens
        self.config = DataConfig()
        self.calls: list[tuple[int, BEVAugmentation]] = []

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def get(self, index: int, bev_aug: BEVAugmentation, rng: np.random.Generator):
        self.calls.append((index, bev_aug))
        return SimpleNamespace(token=self.sample_tokens[index], bev_aug=bev_aug, view_index=None)


def test_cache_mode_replays_the_drawn_views_exact_augmentation():
    # the split order differs from the cache order: dataset index 0 is cache sample 2
    tokens_cache, tokens_split = ["a", "b", "c"], ["c", "a", "b"]
    cache, dataset = FakeCache(tokens_cache), FakeDataset(tokens_split)
    pairs = DistillationDataset(dataset, mode="cache", cache=cache, seed=7)
    for epoch in (0, 1):
        pairs.set_epoch(epoch)
        for index, token in enumerate(tokens_split):
            sample, targets = pairs[index]
            # the view is the first draw of numpy's generator seeded by (seed, epoch, index)
            view = int(np.random.default_rng([7, epoch, index]).integers(3))
            cache_index = tokens_cache.index(token)
            assert cache.reads[-1] == (cache_index, view)
            assert sample.view_index == view and sample.token == token
            assert dataset.calls[-1] == (index, cache.views[(cache_index, view)])
            assert float(targets.features["neck"][0, 0, 0]) == 10 * cache_index + view
            assert targets.attention is not None


def test_approximate_mode_warps_the_identity_view():
    tokens = ["a", "b"]
    cache, dataset = FakeCache(tokens), FakeDataset(tokens)
    pairs = DistillationDataset(dataset, mode="approximate", cache=cache, seed=0, bev_extent=(-8.0, 8.0, -8.0, 8.0))
    sample, targets = pairs[1]
    assert cache.reads == [(1, 0)] and targets.attention is None
    data = DataConfig()
    fresh = sample_bev_augmentation(np.random.default_rng([0, 0, 1]), data.bev_rotation_lim, data.bev_scale_lim,
                                    data.bev_flip_x_prob, data.bev_flip_y_prob)
    assert dataset.calls[-1] == (1, fresh) and not fresh.is_identity
    identity_maps = cache.read(1, 0).features["neck"]
    assert torch.equal(targets.features["neck"], warp_bev(identity_maps, fresh, (-8.0, 8.0, -8.0, 8.0)))


def test_student_learning_rate_schedule_by_hand():
    cfg = StudentExperimentConfig(train=StudentTrainConfig(lr=2e-3, warmup_iters=10, warmup_ratio=0.1,
                                                           lr_steps=(2, 3)))
    expected = {(0, 0): 2e-4,  # warmup starts at lr * ratio
                (0, 5): 2e-3 * (0.1 + 0.9 * 0.5),  # halfway: 1.1e-3
                (0, 10): 2e-3, (1, 30): 2e-3,  # warmup over, before the first step
                (2, 50): 2e-4, (3, 80): 2e-5, (7, 200): 2e-5}  # x0.1 after epochs 2 and 3
    for (epoch, iteration), lr in expected.items():
        assert learning_rate(cfg, epoch, iteration) == pytest.approx(lr, rel=1e-12), (epoch, iteration)


def _tiny_configs():
    return load_tests_module("distill/test_distill_equivalence.py")


def test_inherit_teacher_head_copies_exactly_the_task_heads(tmp_path):
    from distillbev.pipeline.student.model import CameraStudent
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    module = _tiny_configs()
    torch.manual_seed(0)
    student = CameraStudent(module.tiny_student_config(tmp_path).model)
    teacher = CenterPointTeacher(module.tiny_teacher_config(tmp_path).model)
    shared_before = {k: v.clone() for k, v in student.head.shared_conv.state_dict().items()}
    head_state = teacher.pts_bbox_head.state_dict()
    count = inherit_teacher_head(student, head_state)
    task_keys = [k for k in head_state if k.startswith("task_heads.")]
    assert count == len(task_keys) > 0
    for key in task_keys:
        assert torch.equal(student.head.task_heads.state_dict()[key[len("task_heads."):]], head_state[key])
    for key, value in student.head.shared_conv.state_dict().items():
        assert torch.equal(value, shared_before[key])  # the shared conv sees student features: not inherited
    broken = dict(head_state)
    first = task_keys[0]
    broken[first] = torch.zeros(*broken[first].shape[:-1], broken[first].shape[-1] + 1)
    short = first[len("task_heads."):]
    with pytest.raises(ConfigError, match=rf"{short}: teacher \(.*, 4\) vs student \(.*, 3\)"):
        inherit_teacher_head(student, broken)


def test_false_positive_gt_heatmap_follows_the_head_radius_settings():
    from distillbev.pipeline.distill.train import false_positive_gt_heatmap
    from distillbev.pipeline.geometry.bev import BEVGrid
    from distillbev.pipeline.heads.center_head import CenterHeadConfig

    grid = BEVGrid(0.0, 16.0, 0.0, 16.0, 1.0)
    # a 0.4 m car centred in cell (y 8, x 8): its own gaussian radius is 0 cells, so min_radius decides
    boxes = [torch.tensor([[8.5, 8.5, 0.0, 0.4, 0.4, 1.5, 0.0, 0.0, 0.0]])]
    labels = [torch.tensor([0])]
    narrow = false_positive_gt_heatmap(boxes, labels, CenterHeadConfig(grid=grid, min_radius=2), grid)
    wide = false_positive_gt_heatmap(boxes, labels, CenterHeadConfig(grid=grid, min_radius=4), grid)
    assert float(narrow[0, 8, 8]) == 1.0 and float(wide[0, 8, 8]) == 1.0
    assert float(narrow[0, 8, 11]) == 0.0  # 3 cells away: outside a radius-2 gaussian
    # radius 4: sigma = (2 * 4 + 1) / 6 = 1.5, so exp(-3^2 / (2 * 1.5^2)) = exp(-2) three cells away
    assert abs(float(wide[0, 8, 11]) - float(np.exp(-2.0))) < 1e-6


def test_online_teacher_of_another_grid_is_refused(tmp_path):
    from distillbev.pipeline.distill.run import check_live_teacher_grid
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    module = _tiny_configs()
    student_cfg = module.tiny_student_config(tmp_path)
    teacher = CenterPointTeacher(module.tiny_teacher_config(tmp_path).model)
    check_live_teacher_grid(student_cfg, teacher, Path("teacher.pth"))  # the same +-16 m extent and 40x40 head
    student_cfg.model.bev.x_min, student_cfg.model.bev.x_max = -20.0, 20.0
    with pytest.raises(ConfigError) as error:
        check_live_teacher_grid(student_cfg, teacher, Path("teacher.pth"))
    assert "bev_grid.x_min: -16.0 -> -20.0; bev_grid.x_max: 16.0 -> 20.0" in str(error.value)


def test_an_online_mvp_teacher_needs_the_students_loader_to_give_mvp_points(tmp_path):
    from distillbev.pipeline.distill.run import check_live_teacher_grid
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    module = _tiny_configs()
    student_cfg = module.tiny_student_config(tmp_path)
    teacher_cfg = module.tiny_teacher_config(tmp_path)
    teacher_cfg.model.point_features = 17  # an MVP teacher
    teacher = CenterPointTeacher(teacher_cfg.model)
    with pytest.raises(ConfigError) as error:
        check_live_teacher_grid(student_cfg, teacher, Path("mvp.pth"))
    assert "point_features: 17 -> 5 (data.point_features 'lidar')" in str(error.value)
    student_cfg.data.point_features = "mvp"
    check_live_teacher_grid(student_cfg, teacher, Path("mvp.pth"))


def test_a_single_view_cache_is_warned_about(caplog):
    import logging

    from distillbev.pipeline.distill.run import log_view_coverage

    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.distill.run"):
        log_view_coverage(1)
        log_view_coverage(4)
    assert [record.levelname for record in caplog.records] == ["WARNING", "INFO"]
    assert caplog.records[0].getMessage().startswith("the cache holds 1 view per sample (un-augmented)")
    assert caplog.records[1].getMessage().startswith("the cache holds 4 views per sample (view 0 un-augmented)")
    assert "no BEV augmentation" in caplog.records[0].getMessage()

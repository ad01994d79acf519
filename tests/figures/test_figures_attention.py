"""Attention snapshots: what they hold, that they are the student's attention at the end of training, and the
similarity measure on hand-worked maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillbev.pipeline.distill.progress import (attention_similarity, load_snapshot, snapshot_indices,
                                                  snapshot_paths, student_attention)

from figures_world import ATTENTION_SAMPLES, EPOCHS, student_config


def test_similarity_of_hand_worked_maps():
    a = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    # identical, and equal up to a positive scale and offset: r = 1; mirrored order: r = -1
    assert attention_similarity(a, a)[0] == pytest.approx(1.0, abs=1e-15)
    assert attention_similarity(a, 2 * a + 3)[0] == pytest.approx(1.0, abs=1e-15)
    assert attention_similarity(a, a[:, ::-1, ::-1])[0] == pytest.approx(-1.0, abs=1e-15)
    # [1, 2, 3, 4] vs [1, 3, 2, 4]: deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5), products sum to 4,
    # each sum of squares is 5: r = 4 / 5
    assert attention_similarity(a, np.array([[[1.0, 3.0], [2.0, 4.0]]]))[0] == pytest.approx(0.8, abs=1e-15)
    # a constant map has no correlation: NaN, per sample
    r = attention_similarity(np.stack([a[0], np.ones((2, 2))]), np.stack([a[0], a[0]]))
    assert r[0] == pytest.approx(1.0) and math.isnan(r[1])


def test_similarity_resamples_a_coarser_student_map():
    # 2x2 -> 3x3 bilinear with aligned corners: [[0, 2], [4, 6]] becomes x + 2y on 0..2, the teacher's own map
    student = np.array([[[0.0, 2.0], [4.0, 6.0]]])
    teacher = np.array([[[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]])
    assert attention_similarity(student, teacher)[0] == pytest.approx(1.0, abs=1e-12)
    assert attention_similarity(student, teacher[:, ::-1])[0] == pytest.approx(-0.6, abs=1e-12)


def test_snapshot_samples_are_evenly_spaced():
    assert snapshot_indices(10, 4) == [0, 3, 6, 9]
    assert snapshot_indices(3, 2) == [0, 2]
    assert snapshot_indices(3, 5) == [0, 1, 2]
    assert snapshot_indices(1, 4) == [0]


@pytest.mark.slow
def test_snapshots_hold_the_first_and_last_epoch_with_the_teachers_maps(world, trained_runs):
    from distillbev.pipeline.cache.reader import TeacherCache
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset

    cfg = student_config(world, distilled=True)
    tokens = NuScenesDetectionDataset(cfg.data, "synth_train", mode="test").sample_tokens
    assert len(tokens) == 3
    cache = TeacherCache.open(world.cache_path)
    for kind, run in trained_runs.items():
        snapshots = [load_snapshot(p) for p in snapshot_paths(run)]
        assert [(s.epoch, s.iteration) for s in snapshots] == [(1, 3), (EPOCHS, 3 * EPOCHS)]
        for snapshot in snapshots:
            assert snapshot.tokens == [tokens[0], tokens[2]]  # 2 of 3 train samples, evenly spaced
            assert snapshot.maps.shape == (ATTENTION_SAMPLES, 40, 40) and snapshot.maps.dtype == np.float32
            np.testing.assert_allclose(snapshot.maps.mean(axis=(1, 2)), 1.0, rtol=1e-5)  # H*W*softmax: mean 1
            assert (snapshot.student_feature, snapshot.teacher_layer, snapshot.view) == ("neck", "neck", 0)
            assert snapshot.temperature == 0.5
            if kind == "baseline":
                assert snapshot.feature == "raw" and snapshot.teacher_maps is None
            else:
                assert snapshot.feature == "adapted" and snapshot.teacher_source == "cache cache.zarr (view 0)"
                for token, teacher in zip(snapshot.tokens, snapshot.teacher_maps):
                    stored = cache.read(cache.index_of(token), 0).attention["neck"].numpy()
                    np.testing.assert_array_equal(teacher, stored)
        assert not np.array_equal(snapshots[0].maps, snapshots[1].maps)  # the student moved between them


@pytest.mark.slow
def test_last_snapshot_is_the_final_students_attention(world, trained_runs):
    """Recompute the distilled run's last snapshot from latest.pth: the adapted neck feature's attention on the
    test-mode samples at the identity view."""
    from distillbev.pipeline.cache.reader import TeacherCache
    from distillbev.pipeline.data.collate import collate_samples
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.distill.progress import pre_head_pair
    from distillbev.pipeline.distill.run import build_distill_loss
    from distillbev.pipeline.student.model import CameraStudent

    run = trained_runs["distilled"]
    cfg = student_config(world, distilled=True)
    state = torch.load(run / "latest.pth", map_location="cpu", weights_only=False)
    student = CameraStudent(cfg.model)
    student.load_state_dict(state["state_dict"])
    distill_loss = build_distill_loss(cfg, student, TeacherCache.open(world.cache_path).manifest["layers"])
    distill_loss.load_state_dict(state["distill_state_dict"])
    student.eval(), distill_loss.eval()
    dataset = NuScenesDetectionDataset(cfg.data, "synth_train", mode="test")
    batch = collate_samples([dataset.get(0), dataset.get(2)])
    attention, feature = student_attention(student, distill_loss, pre_head_pair(cfg.distill), batch, 0.5)
    last = load_snapshot(snapshot_paths(run)[-1])
    assert feature == "adapted"
    np.testing.assert_allclose(last.maps, attention.numpy(), rtol=1e-5, atol=1e-6)

"""NuScenesDetectionDataset on the hand-made tiny dataroot, against values worked out by hand.

Frames of the tiny dataroot (see tiny_nuscenes.py): ego at global (100, 200 + 6 m/s * t, 0) facing +y; LiDAR at
(0.943713, 0, 1.84023) in the ego frame rotated -90 deg, so lidar x = the car's right, lidar y = forward and a
global point (X, Y, Z) seen from key frame 0 is at lidar (X - 100, Y - 200 - 0.943713, Z - 1.84023).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillbev.pipeline.cache.manifest import manifest_diff
from distillbev.pipeline.config import load_config, to_dict
from distillbev.pipeline.data.collate import collate_samples
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.preflight import point_loading_settings
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.geometry.bev import BEVAugmentation
from distillbev.pipeline.geometry.transforms import points_in_boxes

SIXTY_DEG = np.pi / 3


def make_dataset(tiny_slice, mode="test", **overrides):
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, train_split="tiny_train",
                        val_split="tiny_val", **{"load_images": False, "num_sweeps": 2, **overrides})
    return NuScenesDetectionDataset(config, "tiny_val", mode)


def test_split_order_and_index(tiny_slice):
    dataset = make_dataset(tiny_slice)
    assert len(dataset) == 2
    assert dataset.sample_tokens == tiny_slice.sample_tokens  # time order within the scene
    assert dataset.index_of(tiny_slice.sample_tokens[1]) == 1
    with pytest.raises(KeyError):
        dataset.index_of("not-a-token")


def test_key_frame_points_are_cropped_and_have_zero_lag(tiny_slice):
    sample = make_dataset(tiny_slice, num_sweeps=0)[0]
    # 5 base points + 10 object centres; (60, 0, 0) leaves x < 51.2 and (1, 20, -6) leaves z >= -5.
    assert sample.points.shape == (13, 5)
    assert torch.all(sample.points[:, 4] == 0)
    assert sample.points.dtype == torch.float32
    # The close point stays in the key frame (only sweep points near the sensor are dropped).
    assert torch.any(torch.all(torch.isclose(sample.points[:, :3], torch.tensor([0.5, 0.2, -1.0])), dim=1))


def test_sweeps_move_into_key_frame_with_time_lags(tiny_slice):
    sample = make_dataset(tiny_slice, num_sweeps=2)[1]
    points = sample.points.numpy()
    lags = np.round(points[:, 4], 6)
    # Nearest two previous LIDAR_TOP records of key frame 1: the 250 ms sweep (2 points survive: the close one
    # and two out-of-range ones are dropped) and key frame 0 (12 survive: its close point is dropped).
    assert {lag: int((lags == lag).sum()) for lag in np.unique(lags)} == {0.0: 13, 0.25: 2, 0.5: 12}
    # (0, 3, 0) in a sweep's own frame is 3 m ahead; the ego drove 1.5 m (0.25 s) or 3 m (0.5 s) since then.
    sweep_point = points[(lags == 0.25) & (points[:, 3] == 20)][0]
    np.testing.assert_allclose(sweep_point[:3], [0.0, 1.5, 0.0], atol=1e-5)
    key0_point = points[(lags == 0.5) & (points[:, 3] == 20)][0]
    np.testing.assert_allclose(key0_point[:3], [0.0, 0.0, 0.0], atol=1e-5)


def test_all_available_sweeps_when_fewer_than_requested(tiny_slice):
    sample = make_dataset(tiny_slice, num_sweeps=9)[1]
    lags = np.round(sample.points[:, 4].numpy().astype(np.float64), 6)
    np.testing.assert_allclose(np.unique(lags), [0.0, 0.25, 0.5, 0.55, 0.6], atol=1e-6)
    assert len(lags) == 13 + 2 + 12 + 2 + 2


def test_gt_box_in_lidar_frame_matches_hand_computation(tiny_slice):
    dataset = make_dataset(tiny_slice)
    sample = dataset[0]
    # Ten detection classes in the order written; the 0-point pedestrian and the animal are dropped.
    assert sample.gt_labels.tolist() == list(range(10))
    assert sample.gt_attributes.tolist() == [5, 6, 6, 5, 6, -1, 0, 1, 2, -1]
    car = sample.gt_boxes[0].double().numpy()
    # Car at global (95, 210, 1.5), yaw 120 deg, [w, l, h] = [2, 4.5, 1.6], global velocity (0, 2):
    # lidar x = 95 - 100 = -5 (5 m to the left), y = 210 - 200 - 0.943713, z = 1.5 - 1.84023,
    # yaw = 120 - 90 (ego) + 90 (lidar) = 120 deg, velocity forward = lidar +y.
    np.testing.assert_allclose(car, [-5.0, 9.056287, -0.34023, 4.5, 2.0, 1.6, 2 * SIXTY_DEG, 0.0, 2.0], atol=1e-5)
    # Key frame 1, 0.5 s later: the ego drove 3 m, the car 1 m.
    car1 = dataset[1].gt_boxes[0].double().numpy()
    np.testing.assert_allclose(car1[:3], [-5.0, 7.056287, -0.34023], atol=1e-5)
    # The motorcycle moves with global velocity (1, -1): lidar axes are parallel to global x, y here.
    np.testing.assert_allclose(sample.gt_boxes[6, 7:9].numpy(), [1.0, -1.0], atol=1e-5)


def test_lidar_poses_are_float64(tiny_slice):
    sample = make_dataset(tiny_slice)[0]
    assert sample.lidar_to_ego.dtype == np.float64 and sample.ego_to_global.dtype == np.float64
    np.testing.assert_allclose(sample.lidar_to_ego[:3, 3], [0.943713, 0.0, 1.84023])
    np.testing.assert_allclose(sample.ego_to_global[:3, 3], [100.0, 200.0, 0.0])


def test_cameras_geometry_and_normalisation(tiny_slice):
    dataset = make_dataset(tiny_slice, load_images=True, final_size=(64, 176))
    sample = dataset[0]
    cameras = sample.cameras
    assert cameras.channels[1] == "CAM_FRONT"
    assert cameras.images.shape == (6, 3, 64, 176)
    # CAM_FRONT: ideal forward camera at ego (1.7, 0, 1.5), 10 ms after the LiDAR (ego 0.06 m further):
    # camera z (forward) = lidar +y, camera x (right) = lidar +x, camera y (down) = lidar -z.
    expected = np.array([[1, 0, 0, 0.0], [0, 0, 1, 1.7 - 0.943713 + 0.06], [0, -1, 0, 1.5 - 1.84023], [0, 0, 0, 1]])
    np.testing.assert_allclose(cameras.camera_to_lidar[1].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(cameras.intrinsics[1, 0, 0].item(), 1266.417203046554, rtol=1e-6)
    # Test mode: scale 176/1600 = 0.11 -> 176x99, crop 35 rows from the top.
    np.testing.assert_allclose(cameras.image_aug[1].numpy(), [[0.11, 0, 0], [0, 0.11, -35], [0, 0, 1]], atol=1e-6)
    # CAM_FRONT is filled with RGB (200, 100, 50): ImageNet-normalised value at the centre.
    expected_pixel = (np.array([200, 100, 50]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(cameras.images[1, :, 32, 88].numpy(), expected_pixel, atol=0.05)


def test_train_mode_is_reproducible_and_epoch_dependent(tiny_slice):
    first = make_dataset(tiny_slice, mode="train", num_sweeps=2)
    second = make_dataset(tiny_slice, mode="train", num_sweeps=2)
    a, b = first[1], second[1]
    assert torch.equal(a.points, b.points) and torch.equal(a.bev_aug, b.bev_aug)
    assert torch.equal(a.gt_boxes, b.gt_boxes)
    # The default generator is default_rng(seed + epoch * len + index); passing it explicitly gives the same view.
    explicit = first.get(1, rng=np.random.default_rng(first.config.seed + 0 * len(first) + 1))
    assert torch.equal(explicit.points, a.points) and torch.equal(explicit.bev_aug, a.bev_aug)
    assert not torch.equal(first.get(1, rng=np.random.default_rng(123)).bev_aug, a.bev_aug)
    second.set_epoch(1)
    assert not torch.equal(second[1].bev_aug, a.bev_aug)


def test_explicit_bev_aug_replays_exact_view(tiny_slice):
    dataset = make_dataset(tiny_slice)
    plain = dataset[1]
    aug = BEVAugmentation(rotation=0.3, scale=1.04, flip_x=True, flip_y=False)
    view = dataset.get(1, bev_aug=aug)
    np.testing.assert_allclose(view.points.numpy(), aug.apply_points(plain.points.numpy()), atol=1e-5)
    np.testing.assert_allclose(view.gt_boxes.numpy(), aug.apply_boxes(plain.gt_boxes.numpy()), atol=1e-5)
    np.testing.assert_allclose(view.bev_aug.numpy(), aug.matrix(), atol=1e-6)
    assert torch.equal(plain.bev_aug, torch.eye(4))


def test_point_inside_box_stays_inside_after_augmentation(tiny_slice):
    dataset = make_dataset(tiny_slice)
    for aug in (BEVAugmentation(), BEVAugmentation(0.39, 0.95, True, True), BEVAugmentation(-0.2, 1.05, False, True)):
        sample = dataset.get(0, bev_aug=aug)
        inside = points_in_boxes(sample.points.double().numpy(), sample.gt_boxes.double().numpy())  # (P, K)
        assert inside.any(axis=0).all(), f"a box lost its centre point under {aug}"


def test_train_mode_drops_boxes_outside_range(tiny_slice):
    small = (-10.0, -10.0, -5.0, 10.0, 10.0, 3.0)
    test_sample = make_dataset(tiny_slice, point_cloud_range=small)[0]
    train_sample = make_dataset(tiny_slice, mode="train", point_cloud_range=small)[0]
    assert len(test_sample.gt_boxes) == 10
    assert 0 < len(train_sample.gt_boxes) < 10
    assert torch.all(train_sample.gt_boxes[:, :2].abs() < 10.0)
    assert torch.all(train_sample.points[:, :2].abs() <= 10.0 * 1.05 * np.sqrt(2) + 1e-3)


def test_previous_frame_and_ego_motion(tiny_slice):
    dataset = make_dataset(tiny_slice, load_images=True, load_previous_frame=True, final_size=(32, 88))
    first, second = dataset[0], dataset[1]
    # The first key frame of a scene is its own previous frame.
    np.testing.assert_allclose(first.prev_lidar_to_lidar.numpy(), np.eye(4), atol=1e-6)
    # The adjacent frame is anchored on CAM_FRONT's ego pose (10 ms) with the LiDAR calibration: its origin is
    # 6 m/s * 0.49 s = 2.94 m behind key frame 1's LiDAR (500 ms); lidar y = forward.
    np.testing.assert_allclose(second.prev_lidar_to_lidar.numpy()[:3, 3], [0.0, -2.94, 0.0], atol=1e-5)
    assert second.prev_cameras.images.shape == second.cameras.images.shape
    assert torch.equal(second.prev_cameras.image_aug, second.cameras.image_aug)
    # Every camera fired at 10 ms with the anchor, so the adjacent cameras sit at their rig positions: frame 0's own
    # camera_to_lidar (LiDAR at 0 ms, cameras 6 m/s * 10 ms = 0.06 m further forward) minus that motion.
    expected = first.cameras.camera_to_lidar.clone()
    expected[:, 1, 3] -= 0.06
    torch.testing.assert_close(second.prev_cameras.camera_to_lidar, expected)


def test_collate_stacks_fixed_shapes(tiny_slice):
    dataset = make_dataset(tiny_slice, load_images=True, load_previous_frame=True, final_size=(32, 88))
    batch = collate_samples([dataset[0], dataset[1]])
    assert len(batch) == 2 and batch.sample_tokens == tiny_slice.sample_tokens
    assert batch.images.shape == (2, 6, 3, 32, 88)
    assert batch.camera_to_lidar.shape == (2, 6, 4, 4) and batch.image_aug.shape == (2, 6, 3, 3)
    assert batch.prev_images.shape == (2, 6, 3, 32, 88) and batch.prev_lidar_to_lidar.shape == (2, 4, 4)
    assert batch.bev_aug.shape == (2, 4, 4)
    assert [len(p) for p in batch.points] == [len(dataset[0].points), len(dataset[1].points)]
    lidar_only = collate_samples([make_dataset(tiny_slice)[0]])
    assert lidar_only.images is None and lidar_only.prev_lidar_to_lidar is None


def test_dataloader_with_collate(tiny_slice):
    dataset = make_dataset(tiny_slice, mode="train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_samples, num_workers=0)
    batch = next(iter(loader))
    assert len(batch) == 2 and all(b.shape[1] == 9 for b in batch.gt_boxes)


def test_range_filter_runs_after_the_bev_augmentation(tiny_slice, monkeypatch):
    """A point 14 m out on +x, outside a +-12.8 m range, lands at (9.90, 9.90) after a 45 deg rotation and must be
    kept; (12, 12), inside the range, lands at (0, 16.97) and must go. Cropping before the augmentation does the
    opposite, leaving real objects in the rotated view without points."""
    from distillbev.pipeline.data import dataset as dataset_module

    cloud = np.array([[14.0, 0.0, 0.5, 0.3, 0.0], [12.0, 12.0, 0.5, 0.3, 0.0], [1.0, 2.0, 0.5, 0.3, 0.1]],
                     dtype=np.float32)
    monkeypatch.setattr(dataset_module, "load_lidar_points", lambda *args, **kwargs: cloud.copy())
    dataset = make_dataset(tiny_slice, point_cloud_range=(-12.8, -12.8, -5.0, 12.8, 12.8, 3.0), load_images=True,
                           final_size=(32, 88))
    sample = dataset.get(0, bev_aug=BEVAugmentation(rotation=np.pi / 4))
    half = 14.0 / np.sqrt(2.0)
    expected = np.array([[half, half, 0.5, 0.3, 0.0], [-np.sqrt(0.5), 3 * np.sqrt(0.5), 0.5, 0.3, 0.1]])
    assert np.allclose(sample.points.numpy(), expected, atol=1e-5)
    # the depth targets' cloud: every key-frame point (time lag 0), augmented, not cropped
    assert np.allclose(sample.depth_points.numpy()[:, :2], [[half, half], [0.0, 12.0 * np.sqrt(2.0)]], atol=1e-5)
    assert collate_samples([sample, sample]).depth_points[1].shape == (2, 5)
    assert make_dataset(tiny_slice)[0].depth_points is None  # no cameras, no depth cloud


def test_a_cache_manifest_records_the_crop_after_the_augmentation_as_existing_caches_do():
    """The point_loading of an existing cache's manifest (it carries range_filter) compares equal to what extraction
    records now, so extract-teacher reopens such a store; one without the key (points cropped before the
    augmentation) stays told apart."""
    stored = {"num_sweeps": 9, "sweep_candidates": 10, "sweep_selection": "nearest", "sweep_min_distance": 1.0,
              "point_cloud_range": [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0], "point_dims": 5,
              "range_filter": "after_bev_augmentation", "pad_empty_sweeps": True}
    requested = {"point_loading": point_loading_settings(DataConfig())}
    assert manifest_diff({"point_loading": stored}, requested) == []
    cropped_first = {key: value for key, value in stored.items() if key != "range_filter"}
    assert manifest_diff({"point_loading": cropped_first}, requested) == [
        'point_loading.range_filter: <missing> -> "after_bev_augmentation"']


def test_a_run_config_with_the_retired_range_filter_loads_and_another_order_is_refused(tmp_path):
    """A run's config.yaml written when `data.range_filter` was a setting still loads (distillbev figures reads
    them); asking for the other order is an error naming the key."""
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  num_sweeps: 3\n  range_filter: after_bev_augmentation\n")
    cfg = load_config(StudentExperimentConfig, path)
    assert cfg.data.num_sweeps == 3 and "range_filter" not in to_dict(cfg)["data"]
    path.write_text("data:\n  range_filter: before_bev_augmentation\n")
    with pytest.raises(ConfigError) as error:
        load_config(StudentExperimentConfig, path)
    assert str(error.value) == (f"{path}: key 'data.range_filter' is no longer a setting: only "
                                f"'after_bev_augmentation' remains, found 'before_bev_augmentation'; remove the key")
    with pytest.raises(ConfigError, match="key 'data.range_filter' is no longer a setting"):
        load_config(StudentExperimentConfig, None, ["data.range_filter=before_bev_augmentation"])

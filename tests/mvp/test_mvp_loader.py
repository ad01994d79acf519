"""The MVP teacher's input: 17-dim points from each LiDAR record and its virtual-point file, moved into the key
frame with the LiDAR points; the pre-flight check and fingerprint of the virtual files; the config checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.index import key_frame_lidar, load_lidar_points
from distillbev.pipeline.data.loading import load_nuscenes, read_points, split_sample_tokens
from distillbev.pipeline.data.preflight import check_split_inputs, index_fingerprint
from distillbev.pipeline.data.virtual_points import MVP_CLASSES, VirtualPoints, virtual_path, write_virtual_points
from distillbev.pipeline.errors import DataError
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherModelConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher

SPLIT = "synth_train"
PEDESTRIAN, CAR = MVP_CLASSES.index("pedestrian"), MVP_CLASSES.index("car")
PAINTED_ROWS = (3, 5)  # raw rows each hand-made file paints as cars


def config(root: Path, point_features: str) -> DataConfig:
    return DataConfig(dataroot=str(root), version="v1.0-synthetic", train_split=SPLIT, val_split="synth_val",
                      num_sweeps=2, sweep_candidates=2, load_images=False, point_features=point_features)


def far_row(raw: np.ndarray) -> int:
    """A raw row the sweep loader keeps (|x| or |y| >= 1 m)."""
    return int(np.flatnonzero((np.abs(raw[:, 0]) >= 1.0) | (np.abs(raw[:, 1]) >= 1.0))[0])


def hand_made(raw: np.ndarray) -> VirtualPoints:
    """Two virtual pedestrians at the position of a far raw point (score 0.9), and raw rows 3 and 5 painted as cars
    (score 0.5)."""
    virtual = np.zeros((2, 14), np.float32)
    virtual[:, :3] = raw[far_row(raw), :3]
    virtual[:, 3 + PEDESTRIAN] = 1.0
    virtual[:, 13] = 0.9
    rows = list(PAINTED_ROWS)
    real = np.zeros((2, 15), np.float32)
    real[:, :4] = raw[rows, :4]
    real[:, 4 + CAR] = 1.0
    real[:, 14] = 0.5
    return VirtualPoints(virtual, real, np.asarray(rows, np.int64))


@pytest.fixture()
def mvp_root(street_dataroot: Path, tmp_path: Path):
    """A copy of the tiny street world whose sample 1 (it has 2 sweeps) has hand-made virtual-point files."""
    root = tmp_path / "data"
    shutil.copytree(street_dataroot, root)
    dataset = NuScenesDetectionDataset(config(root, "lidar"), SPLIT, "test")
    index = dataset.index
    i = int(np.flatnonzero(index.sweep_counts >= 2)[0])
    paths = [index.path(index.lidar, i)] + [index.path(index.sweeps, i, j) for j in range(2)]
    for path in paths:
        write_virtual_points(virtual_path(path), hand_made(read_points(path, "test")))
    return root, dataset, i, paths


def test_mvp_points_are_the_lidar_points_plus_painted_and_virtual_rows_in_the_key_frame(mvp_root) -> None:
    root, lidar_dataset, i, paths = mvp_root
    lidar = load_lidar_points(lidar_dataset.index, i, lidar_dataset.config, None)  # (P, 5)
    mvp = load_lidar_points(lidar_dataset.index, i, config(root, "mvp"), None)  # (P + 12, 17)
    assert mvp.shape == (len(lidar) + 3 * 4, 17)
    flag, lag = mvp[:, 15], mvp[:, 16]
    plain = mvp[flag == 1]
    # the plain rows are the LiDAR loader's points, in its order, with ones in the class and score slots
    np.testing.assert_array_equal(plain[:, :4], lidar[:, :4])
    np.testing.assert_array_equal(plain[:, 16], lidar[:, 4])
    np.testing.assert_array_equal(plain[:, 4:15], np.ones((len(plain), 11), np.float32))
    lags = sorted(set(lidar[:, 4].tolist()))
    assert len(lags) == 3 and lags[0] == 0.0
    for record_lag in lags:  # one record per time lag: the key frame and its two sweeps
        record = lidar[lidar[:, 4] == record_lag]
        painted = mvp[(flag == 0) & (lag == record_lag)]
        virtual = mvp[(flag == -1) & (lag == record_lag)]
        assert len(painted) == 2 and len(virtual) == 2
        raw = read_points(paths[lags.index(record_lag)], "test")
        # a painted or virtual row sits where the loader moved the same raw point: one transform for all rows
        if record_lag == 0:  # the key frame keeps every raw row in order
            np.testing.assert_array_equal(painted[:, :3], record[list(PAINTED_ROWS), :3])
            np.testing.assert_array_equal(virtual[:, :3], np.repeat(record[far_row(raw), None, :3], 2, axis=0))
        else:  # a sweep drops its close rows first: raw row k is row position[k] of the moved cloud
            kept = (np.abs(raw[:, 0]) >= 1.0) | (np.abs(raw[:, 1]) >= 1.0)
            position = np.cumsum(kept) - 1
            np.testing.assert_allclose(virtual[:, :3], np.repeat(record[position[far_row(raw)], None, :3], 2,
                                                                   axis=0), atol=1e-6)
            for row, k in zip(painted, PAINTED_ROWS):
                if kept[k]:
                    np.testing.assert_allclose(row[:3], record[position[k], :3], atol=1e-6)
        np.testing.assert_array_equal(painted[:, 3], raw[list(PAINTED_ROWS), 3])
        np.testing.assert_array_equal(painted[:, 4 + CAR], [1.0, 1.0])
        np.testing.assert_array_equal(painted[:, 14], [0.5, 0.5])
        np.testing.assert_array_equal(virtual[:, 3], [-1.0, -1.0])  # a virtual point has no intensity
        np.testing.assert_array_equal(virtual[:, 4 + PEDESTRIAN], [1.0, 1.0])
        np.testing.assert_allclose(virtual[:, 14], [0.9, 0.9])
        assert virtual[:, 4:14].sum() == 2.0  # one-hot
    # the camera students' depth targets take only the key frame's own returns, never painted or virtual rows
    np.testing.assert_array_equal(key_frame_lidar(mvp), lidar[lidar[:, 4] == 0])
    np.testing.assert_array_equal(key_frame_lidar(lidar), lidar[lidar[:, 4] == 0])


def test_bev_augmentation_moves_virtual_points_with_the_cloud(mvp_root) -> None:
    root, _, i, _ = mvp_root
    from distillbev.pipeline.geometry.bev import BEVAugmentation

    dataset = NuScenesDetectionDataset(config(root, "mvp"), SPLIT, "test")
    view = BEVAugmentation(rotation=np.pi / 2, flip_x=True)
    plain, turned = dataset.get(i).points.numpy(), dataset.get(i, bev_aug=view).points.numpy()
    original_virtual = plain[plain[:, 15] == -1]
    rotated = turned[turned[:, 15] == -1]
    assert len(rotated) == len(original_virtual) > 0
    # rotation by 90 degrees: (x, y) -> (-y, x); then the x flip mirrors y -> -y
    np.testing.assert_allclose(rotated[:, 0], -original_virtual[:, 1], atol=1e-5)
    np.testing.assert_allclose(rotated[:, 1], -original_virtual[:, 0], atol=1e-5)
    np.testing.assert_array_equal(rotated[:, 3:], original_virtual[:, 3:])


def test_a_missing_virtual_file_names_it_the_sample_and_the_command(mvp_root) -> None:
    root, _, i, paths = mvp_root
    missing = virtual_path(paths[2])
    missing.unlink()
    dataset = NuScenesDetectionDataset(config(root, "mvp"), SPLIT, "test")
    with pytest.raises(DataError) as error:
        dataset.get(i)
    message = str(error.value)
    assert str(missing) in message and Path(paths[2]).name in message and dataset.sample_tokens[i] in message
    assert "distillbev make-virtual-points" in message


def test_preflight_checks_and_fingerprints_the_virtual_files(mvp_root) -> None:
    root, dataset, i, paths = mvp_root
    nusc = load_nuscenes(root, "v1.0-synthetic")
    token = dataset.sample_tokens[i]
    lidar = check_split_inputs(nusc, [token], 2, 2)
    mvp = check_split_inputs(nusc, [token], 2, 2, virtual=True)
    assert lidar.problems == [] and mvp.problems == []
    assert mvp.files == 2 * lidar.files == 6 and mvp.fingerprint != lidar.fingerprint
    # a student reads the fingerprint off its own split index (no devkit): the same hash, virtual files included
    everything = split_sample_tokens(nusc, SPLIT)
    for virtual in (False, True):
        assert index_fingerprint(dataset.index, 2, virtual) == \
            check_split_inputs(nusc, everything, 2, 2, virtual=virtual).fingerprint
    # a changed virtual file changes the MVP fingerprint and leaves the LiDAR one alone
    write_virtual_points(virtual_path(paths[1]), VirtualPoints.empty())
    assert check_split_inputs(nusc, [token], 2, 2, virtual=True).fingerprint != mvp.fingerprint
    assert check_split_inputs(nusc, [token], 2, 2).fingerprint == lidar.fingerprint
    # every missing virtual file is one problem line naming it, its sample and the command that makes it
    others = [t for t in split_sample_tokens(nusc, SPLIT) if t != token]
    problems = check_split_inputs(nusc, [token, *others], 2, 2, virtual=True).problems
    assert problems and all("LIDAR_TOP_VIRTUAL" in p and "make-virtual-points" in p for p in problems)
    assert not any(str(virtual_path(p)) in " ".join(problems) for p in paths)


def test_teacher_config_must_take_the_points_the_loader_gives() -> None:
    with pytest.raises(ValueError, match="model.point_features: 17"):
        TeacherExperimentConfig(data=DataConfig(load_images=False, point_features="mvp"))
    with pytest.raises(ValueError, match="point_features must be one of"):
        DataConfig(point_features="radar")
    ok = TeacherExperimentConfig(data=DataConfig(load_images=False, point_features="mvp"),
                                 model=TeacherModelConfig(point_features=17))
    assert ok.data.point_dims == 17


def test_the_pillar_net_takes_17_dim_points(mvp_root) -> None:
    root, _, i, _ = mvp_root
    from distillbev.pipeline.config import load_config

    cfg = load_config(TeacherExperimentConfig, Path(__file__).parents[2] / "configs/street/teacher_mvp.yaml")
    cfg.data.dataroot, cfg.data.num_sweeps, cfg.data.sweep_candidates = str(root), 2, 2
    sample = NuScenesDetectionDataset(cfg.data, SPLIT, "test").get(i)
    teacher = CenterPointTeacher(cfg.model).eval()
    assert teacher.pts_voxel_encoder.pfn_layers[0].linear.in_features == 17 + 6
    with torch.no_grad():
        out = teacher([sample.points])
    assert out.heatmap.shape == (1, 10, 80, 80) and torch.isfinite(out.features["neck"]).all()

"""The real key frame through the loader: the split index read from mmdet3d's info file, the point cloud at a scene
start, the GT boxes in the LiDAR frame and, through our camera transforms, in the six cameras (against mmdet3d's
`cam_instances`, which the devkit computed from the tables with each camera's own ego pose)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from real_keyframe import (CAMERA_FILES, DATAROOT, LIDAR_FILE, SAMPLE_TOKEN, SPLIT, read_cloud, read_info,
                           real_data_config)

from distillbev.pipeline.data.classes import CLASS_ID, DETECTION_CLASSES, NO_ATTRIBUTE
from distillbev.pipeline.data.config import CAMERA_CHANNELS
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset

KEPT_BOXES = 65  # 69 instances: 1 of a category outside the 10 classes, 3 pedestrians without a LiDAR/radar point
CLASS_COUNTS = {"pedestrian": 27, "barrier": 22, "car": 8, "traffic_cone": 3, "truck": 2, "bicycle": 1, "bus": 1,
                "construction_vehicle": 1}
PIXEL_TOLERANCE = 1.0
METRE_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def info() -> tuple[dict, dict]:
    return read_info()


def expected_boxes(metainfo: dict, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """The pkl's instances as the devkit's detection eval keeps them: (K, 9) boxes and (K,) OUR class ids, mapped
    by class name (mmdet3d's label order is car, truck, trailer, bus, construction_vehicle, bicycle, motorcycle,
    pedestrian, traffic_cone, barrier; ours is CenterPoint's)."""
    names = {label: name for name, label in metainfo["categories"].items()}
    boxes, labels = [], []
    for instance in info["instances"]:
        name = names.get(instance["bbox_label_3d"])
        if name is None or instance["num_lidar_pts"] + instance["num_radar_pts"] == 0:
            continue
        # a box without a previous or next annotation has no velocity (NaN), which the loader reads as 0
        boxes.append([*instance["bbox_3d"], *np.nan_to_num(instance["velocity"], nan=0.0)])
        labels.append(CLASS_ID[name])
    return np.array(boxes), np.array(labels)


def mmdet3d_yaw(headings: np.ndarray, sample: dict) -> np.ndarray:
    """(K,) mmdet3d's yaws of boxes with these LiDAR-frame headings (K,): a nuScenes box turns about the global z
    axis only, so its LiDAR-frame rotation is lidar_from_global @ Rz(theta); theta is solved in closed form from the
    heading of its x axis, and pyquaternion gives the yaw of that rotation as mmdet3d's converter takes it."""
    from pyquaternion import Quaternion

    lidar_to_global = np.asarray(sample["ego2global"]) @ np.asarray(sample["lidar_points"]["lidar2ego"])
    lidar_from_global = np.linalg.inv(lidar_to_global)
    r = lidar_from_global[:3, :3]
    out = []
    for heading in headings:
        # x axis r @ (cos t, sin t, 0) along (cos h, sin h): a cos t + b sin t = 0, with the axis pointing along h
        a = r[1, 0] * np.cos(heading) - r[0, 0] * np.sin(heading)
        b = r[1, 1] * np.cos(heading) - r[0, 1] * np.sin(heading)
        theta = np.arctan2(-a, b)
        axis = r[:, :2] @ [np.cos(theta), np.sin(theta)]
        if axis[0] * np.cos(heading) + axis[1] * np.sin(heading) < 0:
            theta += np.pi
        rotation = r @ np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        out.append(Quaternion(matrix=rotation, atol=1e-6).yaw_pitch_roll[0])
    return np.array(out)


def test_the_index_holds_the_key_frame_as_a_scene_start(camera_index, info):
    _, sample = info
    assert len(camera_index) == 1 and camera_index.token(0) == SAMPLE_TOKEN
    assert camera_index.split == SPLIT and camera_index.camera_channels == CAMERA_CHANNELS
    assert int(camera_index.previous[0]) == -1 and int(camera_index.sweep_counts[0]) == 0
    assert camera_index.path(camera_index.lidar, 0) == f"{DATAROOT}/{LIDAR_FILE.relative_to(DATAROOT).as_posix()}"
    assert int(camera_index.lidar.timestamps[0]) == int(camera_index.timestamps[0]) == 1532402927647951
    for k, channel in enumerate(CAMERA_CHANNELS):
        assert camera_index.path(camera_index.cameras, 0, k) == f"{DATAROOT}/samples/{channel}/{CAMERA_FILES[channel]}"
        intrinsics = camera_index.intrinsics[camera_index.cameras.calibration[0, k]]
        assert np.allclose(intrinsics, sample["images"][channel]["cam2img"], atol=1e-9)


def test_the_index_boxes_are_the_pkl_instances_with_our_class_ids(camera_index, info):
    boxes, labels, attributes = camera_index.annotations(0)
    assert boxes.shape == (KEPT_BOXES, 9) and len(info[1]["instances"]) == 69
    want_boxes, want_labels = expected_boxes(*info)
    columns = [0, 1, 2, 3, 4, 5, 7, 8]  # x, y, z, l, w, h, vx, vy: as stored
    assert np.allclose(boxes[:, columns], want_boxes[:, columns], atol=1e-9)
    assert (labels == want_labels).all()
    # yaw: ours is the heading of the box's x axis in the LiDAR xy plane (the devkit path's), mmdet3d's is
    # pyquaternion's yaw_pitch_roll[0] of the box's LiDAR-frame rotation; they differ with the ego's tilt
    assert 1e-4 < np.abs(boxes[:, 6] - want_boxes[:, 6]).max() < 2e-3
    assert np.allclose(mmdet3d_yaw(boxes[:, 6], info[1]), want_boxes[:, 6], atol=1e-6)
    assert Counter(DETECTION_CLASSES[i] for i in labels) == CLASS_COUNTS
    # the first instance is a pedestrian: mmdet3d's label 7, ours 8
    assert info[1]["instances"][0]["bbox_label_3d"] == 7 and labels[0] == CLASS_ID["pedestrian"] == 8
    assert (attributes == NO_ATTRIBUTE).all()  # attributes live in the tables, which this dataroot lacks


def test_the_loader_returns_the_key_frame_and_nine_padded_copies_at_a_scene_start(camera_sample):
    """mmdet3d's LoadPointsFromMultiSweeps(sweeps_num=9, pad_empty_sweeps=True, remove_close=True) on a frame
    without sweeps: the key frame, then 9 copies of it without the rows of the 1 m box, all with time lag 0; then
    the range filter (-51.2..51.2, -51.2..51.2, -5..3 m)."""
    cloud = read_cloud().astype(np.float32)
    cloud[:, 4] = 0.0  # the ring column becomes the time lag
    far = cloud[~((np.abs(cloud[:, 0]) < 1.0) & (np.abs(cloud[:, 1]) < 1.0))]
    assert len(far) == 26_414 and len(cloud) + 9 * len(far) == 272_414
    expected = np.concatenate([cloud] + [far] * 9)
    x, y, z = expected[:, 0], expected[:, 1], expected[:, 2]
    expected = expected[(x >= -51.2) & (x < 51.2) & (y >= -51.2) & (y < 51.2) & (z >= -5.0) & (z < 3.0)]
    points = camera_sample.points.numpy()
    assert points.shape == expected.shape and points.shape[1] == 5
    assert np.array_equal(points, expected)
    assert (points[:, 4] == 0).all()


def test_gt_box_centres_project_onto_mmdet3d_center_2d_and_depth(camera_sample, info):
    """Our LiDAR-frame GT centres, through the Sample's camera_to_lidar and intrinsics (the index's calibrations and
    each camera's ego pose), against mmdet3d's cam_instances: the camera-frame centre to a centimetre, its pixel to
    a pixel. The only cam_instances without a counterpart are the 3 pedestrians without a LiDAR/radar point, which
    the loader drops (matched through mmdet3d's own lidar2cam)."""
    metainfo, sample = info
    cameras = camera_sample.cameras
    assert cameras.channels == CAMERA_CHANNELS
    centres = camera_sample.gt_boxes[:, :3].double().numpy()  # (K, 3) LiDAR frame, identity BEV augmentation
    labels = camera_sample.gt_labels.numpy()
    names = {label: name for name, label in metainfo["categories"].items()}
    empty = np.array([i["bbox_3d"][:3] for i in sample["instances"]
                      if i["num_lidar_pts"] + i["num_radar_pts"] == 0])  # (3, 3) LiDAR frame
    matched = unmatched = 0
    for n, channel in enumerate(CAMERA_CHANNELS):
        lidar_to_camera = np.linalg.inv(cameras.camera_to_lidar[n].double().numpy())
        intrinsics = cameras.intrinsics[n].double().numpy()
        in_camera = centres @ lidar_to_camera[:3, :3].T + lidar_to_camera[:3, 3]  # (K, 3)
        mmdet3d_lidar_to_camera = np.asarray(sample["images"][channel]["lidar2cam"])
        empty_in_camera = empty @ mmdet3d_lidar_to_camera[:3, :3].T + mmdet3d_lidar_to_camera[:3, 3]
        for instance in sample["cam_instances"][channel]:
            target = np.asarray(instance["bbox_3d"][:3])
            same_class = labels == CLASS_ID[names[instance["bbox_label_3d"]]]
            distance = np.where(same_class, np.linalg.norm(in_camera - target, axis=1), np.inf)
            j = int(np.argmin(distance))
            if distance[j] > METRE_TOLERANCE:
                # no counterpart: it must be one of the boxes without a point
                assert np.linalg.norm(empty_in_camera - target, axis=1).min() < METRE_TOLERANCE, (channel, instance)
                unmatched += 1
                continue
            assert abs(in_camera[j, 2] - instance["depth"]) < METRE_TOLERANCE
            projected = intrinsics @ in_camera[j]
            assert np.linalg.norm(projected[:2] / projected[2] - instance["center_2d"]) < PIXEL_TOLERANCE
            matched += 1
    assert (matched, unmatched) == (81, 3)


def test_the_sample_cameras_are_the_six_images_with_their_geometry(camera_sample, info):
    cameras = camera_sample.cameras
    assert cameras.images.shape == (6, 3, 256, 704) and cameras.images.dtype == torch.float32
    assert torch.isfinite(cameras.images).all()
    test_mode = torch.tensor([[0.44, 0, 0], [0, 0.44, -140], [0, 0, 1]])
    assert torch.allclose(cameras.image_aug, test_mode.expand(6, 3, 3), atol=1e-6)
    for n, channel in enumerate(CAMERA_CHANNELS):
        assert np.allclose(cameras.intrinsics[n].numpy(), info[1]["images"][channel]["cam2img"], rtol=1e-6)
    assert camera_sample.gt_boxes.shape == (KEPT_BOXES, 9)


def test_a_train_draw_moves_points_and_boxes_together(camera_index):
    dataset = NuScenesDetectionDataset(real_data_config(), SPLIT, "train", index=camera_index)
    sample = dataset.get(0)
    assert sample.cameras.images.shape == (6, 3, 256, 704)
    assert not torch.allclose(sample.cameras.image_aug[0], torch.tensor([[0.44, 0, 0], [0, 0.44, -140], [0, 0, 1]]))
    bev = sample.bev_aug.double().numpy()
    assert not np.allclose(bev, np.eye(4))
    boxes, labels, _ = camera_index.annotations(0)
    moved = boxes[:, :3] @ bev[:3, :3].T + bev[:3, 3]
    inside = (np.abs(moved[:, 0]) < 51.2) & (np.abs(moved[:, 1]) < 51.2)
    assert np.allclose(sample.gt_boxes[:, :3].double().numpy(), moved[inside], atol=1e-4)
    assert (sample.gt_labels.numpy() == labels[inside]).all()
    # the key frame's rows with the BEV augmentation: a row of the file moved by the same matrix is in the sample
    first = read_cloud()[0, :3].astype(np.float64) @ bev[:3, :3].T + bev[:3, 3]
    assert np.abs(sample.points[:, :3].double().numpy() - first).sum(axis=1).min() < 1e-4

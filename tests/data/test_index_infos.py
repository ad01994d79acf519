"""mmdet3d 1.x infos as a source of the `SplitIndex` (pipeline/data/infos.py).

The infos here are written by `write_infos`, which follows mmdet3d's `create_nuscenes_infos` +
`update_infos_to_v2.update_pkl_infos` from the devkit's own records (pyquaternion, `get_sample_data` boxes, float32
matrices, timestamps in seconds, instances in `sample['anns']` order, mmdet3d's class order). mmdet3d's converter
itself is run in test_infos_mmdet3d.py. The tiny dataroot (tiny_nuscenes.py): split tiny_val is one scene of two
key frames; key frame 0 has 2 previous LIDAR_TOP records, key frame 1 has 4.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from distillbev.pipeline.data.index import SplitIndex, build_split_index
from distillbev.pipeline.data.infos import (
    camera_ego_poses, devkit_yaw, index_from_infos, infos_file, poses_from_matrices, read_infos)
from distillbev.pipeline.data.loading import load_nuscenes, split_sample_tokens
from distillbev.pipeline.errors import DataError
from distillbev.pipeline.geometry.transforms import make_transform, quaternion_to_matrix

SPLIT = "tiny_val"
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
MMDET3D_CLASSES = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian",
                   "traffic_cone", "barrier")  # mmdet3d's label order, not ours


# ----------------------------------------------------------------------------------------- infos writer
def _transform(record: dict) -> np.ndarray:
    from pyquaternion import Quaternion

    t = np.eye(4)
    t[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    t[:3, 3] = record["translation"]
    return t


def _stored(t: np.ndarray) -> list:
    return np.asarray(t).astype(np.float32).tolist()  # the infos keep matrices as float32 lists


def infos_of(nusc, tokens: list[str], max_sweeps: int = 10, sweep_prefix: str = "./data/nuscenes/") -> dict:
    """An info-version-1.1 infos dict of `tokens` as mmdet3d writes it (see the module doc)."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    ignored = set()
    data_list = []
    for position, token in enumerate(tokens):
        sample = nusc.get("sample", token)
        key = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        lidar_to_ego = _transform(nusc.get("calibrated_sensor", key["calibrated_sensor_token"]))
        ego_to_global = _transform(nusc.get("ego_pose", key["ego_pose_token"]))
        global_to_lidar = np.linalg.inv(lidar_to_ego) @ np.linalg.inv(ego_to_global)

        def record_entry(record: dict) -> dict:
            sensor_to_ego = _transform(nusc.get("calibrated_sensor", record["calibrated_sensor_token"]))
            record_ego_to_global = _transform(nusc.get("ego_pose", record["ego_pose_token"]))
            sensor_to_lidar = global_to_lidar @ record_ego_to_global @ sensor_to_ego
            return {"sensor_to_ego": sensor_to_ego, "ego_to_global": record_ego_to_global,
                    "lidar_to_sensor": np.linalg.inv(sensor_to_lidar), "timestamp": record["timestamp"] / 1e6,
                    "sample_data_token": record["token"]}

        info = {"sample_idx": position, "token": token, "timestamp": sample["timestamp"] / 1e6,
                "ego2global": _stored(ego_to_global),
                "lidar_points": {"num_pts_feats": 5, "lidar_path": Path(key["filename"]).name,
                                 "lidar2ego": _stored(lidar_to_ego)}}
        sweeps, record = [], key
        while record["prev"] and len(sweeps) < max_sweeps:
            record = nusc.get("sample_data", record["prev"])
            entry = record_entry(record)
            sweeps.append({"lidar_points": {"lidar_path": sweep_prefix + record["filename"],
                                            "lidar2ego": _stored(entry["sensor_to_ego"]),
                                            "lidar2sensor": _stored(entry["lidar_to_sensor"])},
                           "ego2global": _stored(entry["ego_to_global"]), "timestamp": entry["timestamp"],
                           "sample_data_token": entry["sample_data_token"]})
        if sweeps:  # mmdet3d drops empty lists
            info["lidar_sweeps"] = sweeps
        info["images"] = {}
        for channel in CAMERAS:
            record = nusc.get("sample_data", sample["data"][channel])
            entry = record_entry(record)
            intrinsic = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])["camera_intrinsic"]
            info["images"][channel] = {"img_path": Path(record["filename"]).name, "cam2img": intrinsic,
                                       "cam2ego": _stored(entry["sensor_to_ego"]),
                                       "sample_data_token": record["token"], "timestamp": entry["timestamp"],
                                       "lidar2cam": _stored(entry["lidar_to_sensor"])}
        _, boxes, _ = nusc.get_sample_data(key["token"])
        instances = []
        for ann_token, box in zip(sample["anns"], boxes):
            ann = nusc.get("sample_annotation", ann_token)
            name = category_to_detection_name(ann["category_name"]) or ann["category_name"]
            if name not in MMDET3D_CLASSES:
                ignored.add(name)
            velocity = np.array([*nusc.box_velocity(ann_token)[:2], 0.0])  # mmdet3d drops the global vz
            velocity = velocity @ np.linalg.inv(ego_to_global[:3, :3]).T @ np.linalg.inv(lidar_to_ego[:3, :3]).T
            width, length, height = box.wlh
            label = MMDET3D_CLASSES.index(name) if name in MMDET3D_CLASSES else -1
            instances.append({
                "bbox_3d": [*box.center.tolist(), float(length), float(width), float(height),
                            float(box.orientation.yaw_pitch_roll[0])],
                "bbox_label": label, "bbox_label_3d": label, "velocity": velocity[:2].tolist(),
                "num_lidar_pts": np.int64(ann["num_lidar_pts"]), "num_radar_pts": np.int64(ann["num_radar_pts"]),
                "bbox_3d_isvalid": np.bool_(ann["num_lidar_pts"] + ann["num_radar_pts"] > 0)})
        info["instances"] = instances
        data_list.append(info)
    categories = {name: i for i, name in enumerate(MMDET3D_CLASSES)}
    categories.update({name: -1 for name in sorted(ignored)})
    return {"metainfo": {"categories": categories, "dataset": "nuscenes", "version": nusc.version,
                         "info_version": "1.1"}, "data_list": data_list}


def write_infos(path: Path, infos: dict, protocol: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(infos, protocol=protocol))
    return path


def converter_order(nusc, split: str) -> list[str]:
    """The split's samples in sample.json order, as mmdet3d's converter lists them (not the split order)."""
    members = set(split_sample_tokens(nusc, split))
    return [record["token"] for record in nusc.sample if record["token"] in members]


# -------------------------------------------------------------------------------------------- comparison
def _angle(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def assert_same_index(found: SplitIndex, expected: SplitIndex, velocity_atol: float = 1e-9) -> None:
    """Field by field. Poses and calibrations compared as the transforms they resolve to (float32-rounded in the
    infos: 1e-6 on rotations, 2e-4 m on global translations); velocities within `velocity_atol` m/s (mmdet3d
    drops the global vertical velocity)."""
    assert (found.dataroot, found.version, found.split, found.camera_channels) == \
        (expected.dataroot, expected.version, expected.split, expected.camera_channels)
    for name in ("tokens", "timestamps", "previous", "sweep_counts", "adjacent_counts", "box_offsets", "labels",
                 "attributes"):
        assert np.array_equal(getattr(found, name), getattr(expected, name)), name
        assert getattr(found, name).dtype == getattr(expected, name).dtype, name
    assert (found.adjacent_interval, found.reference_camera) == (expected.adjacent_interval, expected.reference_camera)
    for table in ("lidar", "sweeps", "cameras", "adjacent"):
        a, b = getattr(found, table), getattr(expected, table)
        assert np.array_equal(a.files, b.files), table
        assert np.array_equal(a.timestamps, b.timestamps), table
        assert np.array_equal(a.calibration >= 0, b.calibration >= 0), table
        assert a.files.shape == b.files.shape and a.ego_pose.shape == b.ego_pose.shape, table
        for where in zip(*np.nonzero(b.calibration >= 0)):
            sensor_a, ego_a = found.transforms(a, *where)
            sensor_b, ego_b = expected.transforms(b, *where)
            np.testing.assert_allclose(sensor_a, sensor_b, atol=1e-6, err_msg=f"{table} {where} calibration")
            np.testing.assert_allclose(ego_a[:3, :3], ego_b[:3, :3], atol=1e-6, err_msg=f"{table} {where} pose")
            np.testing.assert_allclose(ego_a[:3, 3], ego_b[:3, 3], atol=2e-4, err_msg=f"{table} {where} pose")
            np.testing.assert_array_equal(found.intrinsics[a.calibration[where]],
                                          expected.intrinsics[b.calibration[where]])
        # records without a calibration carry the same filler pose
        assert np.array_equal(a.ego_pose[a.calibration < 0], b.ego_pose[b.calibration < 0]), table
    # deduplicated by value: no more rows than the devkit's one per calibrated_sensor record
    assert found.calibrations.shape[0] <= expected.calibrations.shape[0]
    assert found.boxes.shape == expected.boxes.shape
    np.testing.assert_allclose(found.boxes[:, :6], expected.boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(_angle(found.boxes[:, 6] - expected.boxes[:, 6]), 0.0, atol=1e-6)  # float32 poses
    np.testing.assert_allclose(found.boxes[:, 7:], expected.boxes[:, 7:], atol=velocity_atol)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_nusc(tiny_slice):
    return load_nuscenes(tiny_slice.dataroot, tiny_slice.version)


@pytest.fixture(scope="module")
def tiny_infos(tiny_nusc) -> dict:
    return infos_of(tiny_nusc, converter_order(tiny_nusc, SPLIT))


# ---------------------------------------------------------------------------------------------------- tests
def test_infos_file_names_the_split_file_and_how_to_write_it(tmp_path):
    for split, name in [("train", "train"), ("mini_train", "train"), ("val", "val"), ("mini_val", "val"),
                        ("test", "test"), ("synth_train", "synth_train")]:
        (tmp_path / f"nuscenes_infos_{name}.pkl").write_bytes(b"")
        assert infos_file(tmp_path, split) == tmp_path / f"nuscenes_infos_{name}.pkl"
    with pytest.raises(DataError, match=r"nuscenes_infos_other\.pkl: mmdet3d infos of split 'other' not found; "
                                        r"mmdet3d 1\.x writes them with `python tools/create_data\.py nuscenes"):
        infos_file(tmp_path, "other")
    with pytest.raises(DataError, match=r"--version v1\.0-mini"):
        infos_file(tmp_path / "none", "mini_val")


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("sweep_candidates", [4, 1, 0])
def test_index_from_infos_equals_the_devkit_index(tiny_slice, tiny_nusc, tiny_infos, tmp_path, protocol,
                                                  sweep_candidates):
    path = write_infos(tmp_path / "nuscenes_infos_tiny_val.pkl", tiny_infos, protocol)
    expected = build_split_index(tiny_nusc, SPLIT, sweep_candidates, CAMERAS, progress=False)
    found = index_from_infos(path, tiny_slice.dataroot, tiny_slice.version, SPLIT, sweep_candidates, CAMERAS,
                             progress=False)
    assert_same_index(found, expected)
    # the tiny world's hand-made facts, not only agreement: key frame 1's four sweeps, the annotations kept
    assert found.sweep_counts.tolist() == [min(2, sweep_candidates), min(4, sweep_candidates)]
    assert found.previous.tolist() == [-1, 0]
    assert np.diff(found.box_offsets).tolist() == [10, 10]  # the 0-point pedestrian and the animal are dropped
    assert sorted(found.attributes.tolist()) == sorted([5, 6, 6, 5, 6, -1, 0, 1, 2, -1] * 2)
    assert found.calibrations.shape[0] == 7  # LIDAR_TOP and six cameras, each calibration once


def test_lidar_only_index_and_absolute_sweep_paths(tiny, tiny_slice, tiny_nusc, tmp_path):
    infos = infos_of(tiny_nusc, converter_order(tiny_nusc, SPLIT), sweep_prefix=f"{tiny_slice.dataroot}/")
    path = write_infos(tmp_path / "infos.pkl", infos)
    found = index_from_infos(path, tiny_slice.dataroot, tiny_slice.version, SPLIT, 4, progress=False)
    assert_same_index(found, build_split_index(tiny_nusc, SPLIT, 4, progress=False))
    assert found.path(found.sweeps, 1, 0) == f"{tiny_slice.dataroot}/sweeps/LIDAR_TOP/" \
                                               f"tiny__LIDAR_TOP__{tiny.T0 + 250_000}.pcd.bin"


def test_camera_ego_pose_from_the_stored_transforms_hand_worked():
    """Ego yaw 90 deg at global (100, 200, 0) at the key frame, 0.06 m further along global +y (ego +x) when the
    camera records. LiDAR: yaw -90 deg at (0.943713, 0, 1.84023); the ideal forward camera (x right, y down,
    z forward) at (1.7, 0, 1.5). On paper, camera -> key LiDAR: camera x -> LiDAR x, camera y -> -z, camera z -> y,
    its origin at ego (1.76, 0, 1.5), i.e. LiDAR (0, 0.816287, -0.34023); lidar2cam is the inverse below."""
    ego_to_global_key = make_transform([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)], [100.0, 200.0, 0.0])
    lidar_to_ego = make_transform([np.cos(-np.pi / 4), 0, 0, np.sin(-np.pi / 4)], [0.943713, 0.0, 1.84023])
    camera_to_ego = make_transform([0.5, -0.5, 0.5, -0.5], [1.7, 0.0, 1.5])
    lidar_to_camera = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.34023], [0.0, 1.0, 0.0, -0.816287],
                                [0.0, 0.0, 0.0, 1.0]])
    pose = camera_ego_poses(ego_to_global_key, lidar_to_ego, lidar_to_camera, camera_to_ego)
    expected = np.eye(4)
    expected[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # yaw 90 deg
    expected[:3, 3] = [100.0, 200.06, 0.0]
    np.testing.assert_allclose(pose, expected, atol=1e-12)
    np.testing.assert_allclose(poses_from_matrices(pose), [np.sqrt(0.5), 0, 0, np.sqrt(0.5), 100.0, 200.06, 0.0],
                               atol=1e-12)
    # batched: (2, 3, 4, 4) in, the same pose everywhere
    batch = [np.broadcast_to(m, (2, 3, 4, 4)) for m in (ego_to_global_key, lidar_to_ego, lidar_to_camera,
                                                          camera_to_ego)]
    np.testing.assert_allclose(camera_ego_poses(*batch), np.broadcast_to(expected, (2, 3, 4, 4)), atol=1e-12)


def test_poses_from_matrices_round_trips_any_rotation():
    from pyquaternion import Quaternion

    rng = np.random.default_rng(0)
    quaternions = rng.normal(size=(200, 4))
    quaternions[:4] = [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.6, 0.8, 0]]  # the 180 degree rotations
    quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
    matrices = np.stack([make_transform(q, [1.0, -2.0, 3.0]) for q in quaternions])
    poses = poses_from_matrices(matrices)
    assert np.all(poses[:, 0] >= 0) and np.allclose(np.linalg.norm(poses[:, :4], axis=1), 1.0)
    for q, pose in zip(quaternions, poses):
        np.testing.assert_allclose(quaternion_to_matrix(pose[:4]), quaternion_to_matrix(q), atol=1e-12)
        np.testing.assert_allclose(np.abs(pose[:4] @ Quaternion(matrix=quaternion_to_matrix(q)).elements), 1.0,
                                   atol=1e-12)
    assert poses[:, 4:].tolist() == [[1.0, -2.0, 3.0]] * 200


def test_devkit_yaw_undoes_pyquaternions_yaw_of_a_tilted_box():
    """A box rotated about the global z axis only, seen from a LiDAR pitched and rolled by a few degrees: mmdet3d's
    yaw (pyquaternion's, of the box's LiDAR-frame quaternion) is turned into the heading of its x axis."""
    from pyquaternion import Quaternion

    rng = np.random.default_rng(1)
    for pitch, roll in [(0.0, 0.0), (0.05, 0.0), (0.0, -0.08), (0.06, 0.04), (-0.1, 0.09)]:
        lidar_from_global = make_transform(
            (Quaternion(axis=[0, 0, 1], angle=rng.uniform(-np.pi, np.pi)) * Quaternion(axis=[0, 1, 0], angle=pitch)
             * Quaternion(axis=[1, 0, 0], angle=roll)).elements, rng.normal(size=3) * 100)
        global_yaws = np.concatenate([rng.uniform(-np.pi, np.pi, 20), [np.pi, -np.pi + 1e-9, 0.0]])
        box_axes = [lidar_from_global[:3, :3] @ quaternion_to_matrix([np.cos(t / 2), 0, 0, np.sin(t / 2)])
                    for t in global_yaws]
        mmdet3d = [Quaternion(matrix=axes).yaw_pitch_roll[0] for axes in box_axes]
        heading = np.array([np.arctan2(axes[1, 0], axes[0, 0]) for axes in box_axes])
        np.testing.assert_allclose(_angle(devkit_yaw(np.array(mmdet3d), lidar_from_global) - heading), 0.0,
                                   atol=1e-12)
        if pitch and roll:  # the two definitions do differ when the ego is tilted both ways
            assert np.max(np.abs(_angle(np.array(mmdet3d) - heading))) > 1e-3


def test_the_order_comes_from_the_split_not_the_file(tiny_slice, tiny_nusc, tiny_infos, tmp_path):
    infos = dict(tiny_infos, data_list=tiny_infos["data_list"][::-1])
    found = index_from_infos(write_infos(tmp_path / "infos.pkl", infos), tiny_slice.dataroot, tiny_slice.version,
                             SPLIT, 4, progress=False)
    assert [found.token(i) for i in range(len(found))] == tiny_slice.sample_tokens
    assert found.previous.tolist() == [-1, 0]


# --------------------------------------------------------------------------------------------- refusals
def _broken(tmp_path, infos: dict, **metainfo) -> Path:
    return write_infos(tmp_path / "infos.pkl", dict(infos, metainfo={**infos["metainfo"], **metainfo}))


def test_other_info_formats_are_refused_with_how_to_convert(tiny_slice, tiny_infos, tmp_path):
    root, version = tiny_slice.dataroot, tiny_slice.version
    old = write_infos(tmp_path / "old.pkl", {"infos": [], "metadata": {"version": version}})
    with pytest.raises(DataError, match=r"old\.pkl: a pre-1\.x mmdet3d info file .* convert it with `python "
                                        r"tools/dataset_converters/update_infos_to_v2\.py --dataset nuscenes"):
        index_from_infos(old, root, version, SPLIT, 4)
    with pytest.raises(DataError, match=r"metainfo\.info_version is '1\.0', expected '1\.1'"):
        index_from_infos(_broken(tmp_path, tiny_infos, info_version="1.0"), root, version, SPLIT, 4)
    with pytest.raises(DataError, match=r"infos written for version 'v1\.0-mini', expected 'v1\.0-tiny'"):
        index_from_infos(_broken(tmp_path, tiny_infos, version="v1.0-mini"), root, version, SPLIT, 4)
    (tmp_path / "text.pkl").write_text("not a pickle")
    with pytest.raises(DataError, match=r"text\.pkl: not a pickle file"):
        read_infos(tmp_path / "text.pkl")
    write_infos(tmp_path / "list.pkl", [1, 2])
    with pytest.raises(DataError, match=r"expected an mmdet3d info file .* found list"):
        read_infos(tmp_path / "list.pkl")


def test_what_the_infos_lack_is_refused_with_the_reason(tiny_slice, tiny_infos, tmp_path):
    root, version = tiny_slice.dataroot, tiny_slice.version
    path = write_infos(tmp_path / "infos.pkl", tiny_infos)
    with pytest.raises(DataError, match=r"adjacent_count 2: the 4D students' adjacent camera frames .* \(omit "
                                        r"--infos\)"):
        index_from_infos(path, root, version, SPLIT, 4, CAMERAS, adjacent_count=2)
    with pytest.raises(DataError, match=r"the infos hold at most 4 LiDAR sweeps per sample \(the converter's "
                                        r"max_sweeps\), sweep_candidates is 5"):
        index_from_infos(path, root, version, SPLIT, 5)
    # max_sweeps 2: key frame 1's list is cut at 2, so 3 candidates cannot be read from these infos
    cut = write_infos(tmp_path / "cut.pkl", infos_of(load_nuscenes(root, version), tiny_slice.sample_tokens, 2))
    with pytest.raises(DataError, match="at most 2 LiDAR sweeps"):
        index_from_infos(cut, root, version, SPLIT, 3)
    assert index_from_infos(cut, root, version, SPLIT, 2, progress=False).sweep_counts.tolist() == [2, 2]
    none = write_infos(tmp_path / "none.pkl", infos_of(load_nuscenes(root, version), tiny_slice.sample_tokens, 0))
    with pytest.raises(DataError, match=rf"hold no LiDAR sweeps, yet sample {tiny_slice.sample_tokens[1]} follows "
                                        r"another key frame \(the infos were written with max_sweeps=0\?\)"):
        index_from_infos(none, root, version, SPLIT, 1)


def test_infos_of_another_split_or_dataset_are_refused(tiny_slice, tiny_infos, tmp_path):
    root, version = tiny_slice.dataroot, tiny_slice.version
    first = tiny_slice.sample_tokens[0]
    short = write_infos(tmp_path / "short.pkl", dict(tiny_infos, data_list=[
        info for info in tiny_infos["data_list"] if info["token"] != first]))
    with pytest.raises(DataError, match=rf"the infos hold 1 samples, split 'tiny_val' of .* has 2; 1 of the "
                                        rf"split's samples are missing and 0 others present \(e\.g\. {first}\)"):
        index_from_infos(short, root, version, SPLIT, 4)
    data_list = [dict(info) for info in tiny_infos["data_list"]]
    data_list[0]["instances"] = data_list[0]["instances"][:-1]
    token = data_list[0]["token"]
    fewer = write_infos(tmp_path / "fewer.pkl", dict(tiny_infos, data_list=data_list))
    with pytest.raises(DataError, match=rf"sample {token} has \d+ instances, .*sample_annotation\.json has \d+ "
                                        r"annotations of it"):
        index_from_infos(fewer, root, version, SPLIT, 4)
    data_list = [dict(info) for info in tiny_infos["data_list"]]
    data_list[1]["images"] = {k: v for k, v in data_list[1]["images"].items() if k != "CAM_BACK"}
    camera = write_infos(tmp_path / "camera.pkl", dict(tiny_infos, data_list=data_list))
    with pytest.raises(DataError, match=rf"sample {data_list[1]['token']} has no image of CAM_BACK"):
        index_from_infos(camera, root, version, SPLIT, 4, ("CAM_FRONT", "CAM_BACK"))


def test_malformed_infos_name_the_sample_and_the_field(tiny_slice, tiny_infos, tmp_path):
    root, version = tiny_slice.dataroot, tiny_slice.version
    token = tiny_infos["data_list"][1]["token"]

    def broken(change) -> Path:
        data_list = copy.deepcopy(tiny_infos["data_list"])
        change(data_list[1])
        return write_infos(tmp_path / "broken.pkl", dict(tiny_infos, data_list=data_list))

    with pytest.raises(DataError, match=rf"sample {token}: field 'lidar2ego' missing or malformed \(KeyError\)"):
        index_from_infos(broken(lambda info: info["lidar_points"].pop("lidar2ego")), root, version, SPLIT, 4)
    with pytest.raises(DataError, match=rf"sample {token}: a sweep's ego2global is \[\[1\.0, 0\.0\]\], expected a "
                                        r"4x4 transform"):
        index_from_infos(broken(lambda info: info["lidar_sweeps"][2].update(ego2global=[[1.0, 0.0]])), root,
                         version, SPLIT, 4)
    with pytest.raises(DataError, match=rf"sample {token} has a LiDAR sweep at 'x\.pcd\.bin', expected a path "
                                        r"ending in sweeps/LIDAR_TOP/<name>"):
        index_from_infos(broken(lambda info: info["lidar_sweeps"][0]["lidar_points"].update(lidar_path="x.pcd.bin")),
                         root, version, SPLIT, 4)
    with pytest.raises(DataError, match=rf"sample {token}: an image's cam2img is \[1\.0\], expected a 3x3"):
        index_from_infos(broken(lambda info: info["images"]["CAM_BACK"].update(cam2img=[1.0])), root, version,
                         SPLIT, 4, CAMERAS)


def test_without_tables_key_frames_are_scene_starts_in_time_order(tiny_slice, tiny_nusc, tmp_path):
    """A dataroot of loose key frames (no version folder): with infos written without sweeps each sample is a
    scene start, its annotations have no attribute, and the samples are in time order; with sweeps it is refused."""
    root = tmp_path / "loose"
    shutil.copytree(tiny_slice.dataroot / "samples", root / "samples")
    tokens = tiny_slice.sample_tokens
    infos = infos_of(tiny_nusc, tokens[::-1], max_sweeps=0)
    found = index_from_infos(write_infos(tmp_path / "infos.pkl", infos), root, tiny_slice.version, "anything", 3,
                             ("CAM_FRONT",), progress=False)
    assert [found.token(i) for i in range(len(found))] == tokens
    assert found.previous.tolist() == [-1, -1] and found.sweep_counts.tolist() == [0, 0]
    assert found.sweeps.files.shape == (2, 3)
    expected = build_split_index(tiny_nusc, SPLIT, 0, ("CAM_FRONT",), progress=False)
    assert np.array_equal(found.labels, expected.labels)
    assert found.attributes.tolist() == [-1] * 20
    np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-9)
    assert found.path(found.cameras, 1, 0) == str(root / expected.cameras.files[1, 0].decode())
    assert Path(found.path(found.lidar, 0)).is_file()
    with_sweeps = write_infos(tmp_path / "sweeps.pkl", infos_of(tiny_nusc, tokens))
    with pytest.raises(DataError, match=rf"sample {tokens[0]} has LiDAR sweeps but .*loose/v1\.0-tiny holds no "
                                        r"tables: without sample\.json the previous key frame of a scene is unknown"):
        index_from_infos(with_sweeps, root, tiny_slice.version, "anything", 3)
    (root / tiny_slice.version).mkdir()
    shutil.copy(tiny_slice.dataroot / tiny_slice.version / "sample.json", root / tiny_slice.version)
    with pytest.raises(DataError, match=r"holds sample\.json but not scene\.json, attribute\.json, "
                                        r"sample_annotation\.json"):
        index_from_infos(with_sweeps, root, tiny_slice.version, "anything", 3)


def test_a_pickle_that_runs_code_is_refused_and_has_no_effect(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    for protocol in (2, 4):
        path = write_infos(tmp_path / "evil.pkl", {"metainfo": {}, "data_list": [Payload()]}, protocol)
        with pytest.raises(DataError, match=r"global (posix|os)\.system is not allowed in an info file"):
            read_infos(path)
        assert not marker.exists()
    builtin = tmp_path / "eval.pkl"
    builtin.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match=r"global builtins\.eval is not allowed"):
        read_infos(builtin)
    # numpy arrays, scalars and dtypes are what real infos hold: they load
    arrays = {"metainfo": {"categories": {"car": 0}, "info_version": "1.1"},
              "data_list": [{"a": np.arange(3, dtype=np.float32), "b": np.int64(4), "c": np.bool_(True)}]}
    for protocol in (2, 4, 5):
        _, data_list = read_infos(write_infos(tmp_path / "arrays.pkl", arrays, protocol))
        assert data_list[0]["a"].tolist() == [0.0, 1.0, 2.0] and data_list[0]["b"] == 4 and data_list[0]["c"]


@pytest.mark.slow
def test_a_multi_scene_world_with_terrain_equals_the_devkit_index(tmp_path):
    """World 2 (terrain: the ego pitches and rolls, so mmdet3d's velocities drop a little of the vertical one), three
    scenes: the split order across scenes, previous key frames, and every field against the devkit's index."""
    from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

    root = tmp_path / "world"
    generate_dataset(root, SyntheticConfig(num_scenes=3, samples_per_scene=3, val_scenes=1, sweeps_per_key_frame=1,
                                           lidar_azimuth_steps=64), progress=False)
    nusc = load_nuscenes(root, "v1.0-synthetic")
    for split in ("synth_train", "synth_val"):
        infos = infos_of(nusc, converter_order(nusc, split))
        longest = max(len(info.get("lidar_sweeps", ())) for info in infos["data_list"])
        path = write_infos(tmp_path / f"nuscenes_infos_{split}.pkl", infos)
        assert infos_file(tmp_path, split) == path
        expected = build_split_index(nusc, split, longest, CAMERAS, progress=False)
        found = index_from_infos(path, root, "v1.0-synthetic", split, longest, CAMERAS, progress=False)
        assert_same_index(found, expected, velocity_atol=0.02)
        assert len(found) == (6 if split == "synth_train" else 3) and (found.previous == -1).sum() == len(found) // 3
        assert json.loads((root / "v1.0-synthetic" / "splits.json").read_text())[split]  # a custom split

"""The street world (world 2): objects by shape, clutter, other categories, sensor timing, and no appearance cue.

Two tiny dataroots (2 scenes x 3 key frames, seeds 0 and 1) are generated once for the module.
"""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from distillbev.pipeline.data.classes import DETECTION_CLASSES, category_to_class
from distillbev.pipeline.geometry.transforms import box_corners, make_transform, points_in_boxes
from distillbev.pipeline.synthetic.frames import camera_times
from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
from distillbev.pipeline.synthetic.layout import build_street_scene
from distillbev.pipeline.synthetic.shapes import class_parts, parts_in_world

pytestmark = pytest.mark.slow


def street_config(seed: int) -> SyntheticConfig:
    return SyntheticConfig(num_scenes=2, samples_per_scene=3, val_scenes=1, seed=seed, sweeps_per_key_frame=2)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for seed in (0, 1):
        root = tmp_path_factory.mktemp(f"street{seed}") / "data"
        generate_dataset(root, street_config(seed), progress=False)
        out[seed] = root
    return out


def load(root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-synthetic", str(root), verbose=False)


def test_a_car_shows_its_front_by_shape():
    parts = class_parts("car", 4.6, 1.9, 1.7, np.random.default_rng(0))
    cabin = next(p for p in parts if p.material == "glass")
    wheels = [p for p in parts if p.material == "rubber"]
    assert cabin.x < 0  # set back: the bonnet is in front
    assert len(wheels) == 4 and sorted({round(p.x, 3) for p in wheels}) == pytest.approx([-1.38, 1.38])
    # every part lies inside the annotation box (l 4.6 along x, w 1.9 along y, h 1.7 from the ground)
    for p in parts:
        assert -2.3 - 1e-9 <= p.x - p.l / 2 and p.x + p.l / 2 <= 2.3 + 1e-9
        assert -0.95 - 1e-9 <= p.y - p.w / 2 and p.y + p.w / 2 <= 0.95 + 1e-9
        assert 0 <= p.z0 and p.z0 + p.h <= 1.7 + 1e-9


def test_parts_are_placed_in_the_world_frame_of_their_box():
    parts = class_parts("traffic_cone", 0.4, 0.4, 1.0, np.random.default_rng(0))
    box = np.array([10.0, -2.0, 0.5, 0.4, 0.4, 1.0, np.pi / 2])  # gravity centre at z 0.5: bottom on the ground
    world = parts_in_world(parts, box)
    assert world[0, :3] == pytest.approx([10.0, -2.0, 0.025])  # the base tier: 5% of 1 m tall, on the ground
    assert np.all(world[:, 6] == np.pi / 2)
    corners = box_corners(world).reshape(-1, 3)
    grown = box.copy()
    grown[3:6] += 1e-6
    assert points_in_boxes(corners, grown[None]).all()


def test_every_part_of_every_object_is_inside_its_annotation_box():
    rng = np.random.default_rng([0, 0, 2])
    scene = build_street_scene(0, rng, start_timestamp=0, num_key_frames=3, sweeps_per_key_frame=2,
                               objects_per_scene=60, speed_range=(3.0, 8.0), max_curvature=0.02, reach=70.0)
    kinds = {obj.class_name for obj in scene.objects}
    assert {"car", "building"} <= kinds and any(not obj.annotated for obj in scene.objects)
    boxes = scene.boxes_at(scene.key_frame_times_us[1])
    for obj, box in zip(scene.objects, boxes):
        grown = box.copy()
        grown[3:6] += 1e-6
        corners = box_corners(parts_in_world(obj.parts, box)).reshape(-1, 3)
        assert points_in_boxes(corners, grown[None]).all(), obj.class_name


def test_tables_record_other_categories_but_no_clutter(roots):
    nusc = load(roots[0])
    categories = {c["name"] for c in nusc.category}
    assert {"animal", "static_object.bicycle_rack", "movable_object.debris"} <= categories
    annotated = [nusc.get("sample_annotation", t)["category_name"] for s in nusc.sample for t in s["anns"]]
    classes = [category_to_class(name) for name in annotated]
    assert "vehicle.car" in annotated and all(name is None or name in DETECTION_CLASSES for name in classes)
    others = [name for name, c in zip(annotated, classes) if c is None]
    assert others and all(name in categories for name in others)  # ignored by the benchmark, still annotated
    # the key frames' annotations are boxes with points: num_lidar_pts equals the points inside the box
    for sample in (nusc.sample[1], nusc.sample[4]):  # one key frame of each scene (each car)
        _, xyz_global = global_points(nusc, roots[0], sample)
        for token in sample["anns"]:
            annotation = nusc.get("sample_annotation", token)
            inside = int(points_in_boxes(xyz_global, annotation_box(annotation)[None]).sum())
            assert inside == annotation["num_lidar_pts"] > 0, annotation["category_name"]


def test_each_car_has_its_own_calibration(roots):
    nusc = load(roots[0])
    cars = {}
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        vehicle = nusc.get("log", scene["log_token"])["vehicle"]
        cars[vehicle] = {channel: nusc.get("calibrated_sensor", nusc.get("sample_data", token)
                                           ["calibrated_sensor_token"]) for channel, token in sample["data"].items()}
    assert sorted(cars) == ["synthetic-ego", "synthetic-ego-1"]
    a, b = cars["synthetic-ego"], cars["synthetic-ego-1"]
    for channel in a:
        moved = np.abs(np.subtract(a[channel]["translation"], b[channel]["translation"]))
        assert 0 < moved.max() <= 0.03 + 1e-9 and a[channel]["rotation"] != b[channel]["rotation"]
    focal = b["CAM_FRONT"]["camera_intrinsic"][0][0] / a["CAM_FRONT"]["camera_intrinsic"][0][0]
    assert focal != 1.0 and abs(focal - 1.0) <= 0.015


def test_scenes_start_without_sweeps_and_cameras_have_their_own_times(roots):
    nusc = load(roots[0])
    for scene in nusc.scene:
        first = nusc.get("sample", scene["first_sample_token"])
        assert nusc.get("sample_data", first["data"]["LIDAR_TOP"])["prev"] == ""
    sample = nusc.sample[1]
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    offsets = {}
    for channel in ("CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT"):
        record = nusc.get("sample_data", sample["data"][channel])
        offsets[channel] = (record["timestamp"] - lidar["timestamp"]) / 1000.0
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        assert pose["timestamp"] == record["timestamp"] and record["ego_pose_token"] != lidar["ego_pose_token"]
    # the front camera fires with the LiDAR's pass over the front, the back one half a turn (25 ms) away
    assert abs(offsets["CAM_FRONT"]) < 6 and 18 < abs(offsets["CAM_BACK"]) < 32
    assert abs(offsets["CAM_FRONT_LEFT"]) == pytest.approx(abs(offsets["CAM_FRONT_RIGHT"]), abs=9)


def test_lidar_files_hold_every_ray_in_the_nuscenes_layout(roots):
    """As in nuScenes, a .pcd.bin holds every ray, column by column with the 32 rings in order, and a ray without a
    return is a row at the sensor origin; the devkit's remove_close(1.0) drops exactly those rows."""
    from nuscenes.utils.data_classes import LidarPointCloud

    from distillbev.pipeline.data.loading import lidar_returns

    nusc = load(roots[0])
    records = [r for r in nusc.sample_data if r["channel"] == "LIDAR_TOP"]
    assert any(not r["is_key_frame"] for r in records) and any(r["is_key_frame"] for r in records)
    for record in records:
        path = roots[0] / record["filename"]
        points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
        assert points.shape == (32 * 1084, 5)
        assert (points.reshape(1084, 32, 5)[:, :, 4] == np.arange(32)).all()
        returns = lidar_returns(points)
        assert (points[~returns, :4] == 0).all()
        # nothing stands within a metre of the sensor (the lowest beam meets the ground 3.1 m away)
        assert (np.maximum(np.abs(points[returns, 0]), np.abs(points[returns, 1])) >= 1.0).all()
        # the upper beams see sky over the street: a real share of rays return nothing, most return something
        assert 0.6 < returns.mean() < 0.95
        cloud = LidarPointCloud.from_file(str(path))
        cloud.remove_close(1.0)
        assert cloud.nbr_points() == int(returns.sum())


def test_dataset_stats_counts_rows_and_returns_per_key_frame(roots):
    from distillbev.pipeline.data.loading import lidar_returns
    from distillbev.pipeline.data.stats import dataset_statistics, format_statistics

    nusc = load(roots[0])
    stats = dataset_statistics(nusc)
    returns = []
    for sample in nusc.sample:
        record = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        returns.append(lidar_returns(np.fromfile(roots[0] / record["filename"], dtype=np.float32).reshape(-1, 5)).sum())
    assert stats.samples == 6 and stats.annotations_all == len(nusc.sample_annotation)
    assert stats.points_per_key_frame == {"mean": 34688.0, "p5": 34688.0, "p95": 34688.0}
    assert stats.returns_per_key_frame["mean"] == pytest.approx(np.mean(returns))
    assert stats.returns_per_key_frame["p5"] == pytest.approx(np.percentile(returns, 5))
    assert f"| {np.mean(returns):.0f} (" in format_statistics(stats)


def test_world_one_keeps_its_single_time():
    from distillbev.pipeline.synthetic.world import Scene

    scene = Scene(0, 0, (0,), 0, None, ())
    assert camera_times(scene, 1234) == [1234] * 6


def global_points(nusc, root, sample) -> tuple[np.ndarray, np.ndarray]:
    """The key frame's points (P, 5) as stored, and their xyz (P, 3) in the global frame."""
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    points = np.fromfile(root / lidar["filename"], dtype=np.float32).reshape(-1, 5)
    pose = nusc.get("ego_pose", lidar["ego_pose_token"])
    cal = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
    global_from_lidar = (make_transform(pose["rotation"], pose["translation"])
                         @ make_transform(cal["rotation"], cal["translation"]))
    return points, (np.c_[points[:, :3].astype(np.float64), np.ones(len(points))] @ global_from_lidar.T)[:, :3]


def annotation_box(annotation: dict) -> np.ndarray:
    """(7,) = (x, y, z, l, w, h, yaw) of a sample_annotation record (global frame)."""
    from pyquaternion import Quaternion

    w, l, h = annotation["size"]
    return np.array([*annotation["translation"], l, w, h, Quaternion(annotation["rotation"]).yaw_pitch_roll[0]])


def _object_features(root) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per annotated detection-class object with >= 8 points: class, mean LiDAR intensity (1,), mean RGB of the
    image pixels its points project to (3,), and its box size (l, w, h)."""
    nusc = load(root)
    labels, intensity, colour, size = [], [], [], []
    for sample in nusc.sample:
        points, xyz_global = global_points(nusc, root, sample)
        cameras = []
        for channel in ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
                        "CAM_BACK_RIGHT"):
            record = nusc.get("sample_data", sample["data"][channel])
            pose = nusc.get("ego_pose", record["ego_pose_token"])
            cal = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
            camera_from_global = np.linalg.inv(make_transform(pose["rotation"], pose["translation"])
                                               @ make_transform(cal["rotation"], cal["translation"]))
            image = np.asarray(Image.open(root / record["filename"]), dtype=np.float64)
            cameras.append((camera_from_global, np.asarray(cal["camera_intrinsic"]), image))
        for token in sample["anns"]:
            annotation = nusc.get("sample_annotation", token)
            name = category_to_class(annotation["category_name"])
            if name is None or annotation["num_lidar_pts"] < 8:
                continue
            box = annotation_box(annotation)
            inside = points_in_boxes(xyz_global, box[None])[:, 0]
            pixels = []
            for camera_from_global, intrinsics, image in cameras:
                cam = (np.c_[xyz_global[inside], np.ones(int(inside.sum()))] @ camera_from_global.T)[:, :3]
                front = cam[:, 2] > 0.5
                uv = (cam[front] @ intrinsics.T)[:, :2] / cam[front, 2:3]
                ok = ((uv[:, 0] >= 0) & (uv[:, 0] < image.shape[1] - 1) & (uv[:, 1] >= 0)
                      & (uv[:, 1] < image.shape[0] - 1))
                pixels += [image[int(v), int(u)] for u, v in uv[ok]]
            if not pixels:
                continue
            labels.append(name)
            intensity.append([points[inside, 3].mean()])
            colour.append(np.mean(pixels, axis=0))
            size.append(box[3:6])
    return labels, np.asarray(intensity), np.asarray(colour), np.asarray(size)


def _balanced_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Nearest class centroid on standardised features; the mean over classes of the per-class recall."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-9
    names = sorted(set(train_y) & set(test_y))
    centroids = np.stack([((train_x[np.array(train_y) == n] - mean) / std).mean(0) for n in names])
    predicted = [names[i] for i in np.argmin(((((test_x - mean) / std)[:, None] - centroids[None]) ** 2).sum(-1), 1)]
    recalls = [np.mean([p == n for p, t in zip(predicted, test_y) if t == n]) for n in names]
    return float(np.mean(recalls))


def test_no_appearance_cue_names_the_class(roots):
    train, test = _object_features(roots[0]), _object_features(roots[1])
    scores = {}
    for name, column in (("intensity", 1), ("colour", 2), ("shape", 3)):
        scores[name] = _balanced_accuracy(train[column], train[0], test[column], test[0])
    classes = len(set(train[0]) & set(test[0]))
    assert classes >= 4, classes
    # the box's shape names the class; its paint and its LiDAR intensity do not (cones and barriers keep their
    # real-world colours, so colour is not at chance)
    assert scores["shape"] > 0.75, scores
    assert scores["colour"] < scores["shape"] - 0.25 and scores["intensity"] < scores["shape"] - 0.3, scores


def test_the_ego_brakes_stops_and_drives_off_along_its_profile():
    from distillbev.pipeline.synthetic.ego_path import EgoPath

    path = EgoPath((0.0, 0.0), 0.0, 4.0, 0.0, profile=((1.0, 4.0), (3.0, 0.0), (4.0, 0.0), (6.0, 4.0)))
    # 4 m/s until t = 1, braking to 0 at t = 3 (4 m more), standing until t = 4, back at 4 m/s at t = 6 (4 m more)
    assert path.arc([-1.0, 0.0, 1.0, 2.0, 3.0, 3.5, 4.0, 6.0, 7.0]) == pytest.approx(
        [-4.0, 0.0, 4.0, 7.0, 8.0, 8.0, 8.0, 12.0, 16.0])
    assert path.time_at_arc(8.0) == pytest.approx(3.0, abs=0.01) and path.time_at_arc(-2.0) == pytest.approx(-0.5)
    xy, heading = path.pose([3.5])
    assert xy[0] == pytest.approx([8.0, 0.0]) and heading[0] == 0.0


def test_a_turning_object_follows_its_circle():
    from distillbev.pipeline.synthetic.world import SceneObject

    obj = SceneObject("car", (1.9, 4.6, 1.7), (1.0, 2.0), 0.0, (5.0, 0.0), "vehicle.moving", yaw_rate=0.5)
    t = np.array([0.0, 1.0, np.pi])
    boxes = obj.boxes_at(t)
    radius = 5.0 / 0.5
    expected = np.stack([1.0 + radius * np.sin(0.5 * t), 2.0 + radius * (1 - np.cos(0.5 * t))], axis=-1)
    assert boxes[:, :2] == pytest.approx(expected, abs=2e-3) and boxes[:, 6] == pytest.approx(0.5 * t)
    braking = SceneObject("car", (1.9, 4.6, 1.7), (0.0, 0.0), 0.0, (4.0, 0.0), "vehicle.moving", acceleration=-2.0)
    assert braking.boxes_at(np.array([1.0, 2.0, 5.0]))[:, 0] == pytest.approx([3.0, 4.0, 4.0], abs=1e-3)
    assert (braking.attribute_at(1.0), braking.attribute_at(3.0)) == ("vehicle.moving", "vehicle.stopped")

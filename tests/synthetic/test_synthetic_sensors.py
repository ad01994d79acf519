"""LiDAR points, camera renders, velocities and boxes of the tiny synthetic dataroot agree with each other and with
the devkit's geometry."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

from distillbev.pipeline.synthetic.catalog import CLASS_SPECS
from distillbev.pipeline.synthetic.ego_path import rectangle_corners, rectangles_overlap
from distillbev.pipeline.synthetic.generate import plan_scene
from distillbev.pipeline.synthetic.tables import make_token


def _class_of(category: str) -> str:
    return next(s.name for s in CLASS_SPECS.values() if s.category == category)


def _global_points(nusc, sample_data_token: str) -> np.ndarray:
    """Key-frame points (3, P) moved LiDAR -> ego -> global with the devkit's own classes."""
    from nuscenes.utils.data_classes import LidarPointCloud
    from pyquaternion import Quaternion

    record = nusc.get("sample_data", sample_data_token)
    cloud = LidarPointCloud.from_file(nusc.get_sample_data_path(sample_data_token))
    calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    ego = nusc.get("ego_pose", record["ego_pose_token"])
    cloud.rotate(Quaternion(calibration["rotation"]).rotation_matrix)
    cloud.translate(np.array(calibration["translation"]))
    cloud.rotate(Quaternion(ego["rotation"]).rotation_matrix)
    cloud.translate(np.array(ego["translation"]))
    return cloud.points[:3]


def test_lidar_files_are_five_float32_columns(nusc, synthetic_config):
    for record in nusc.sample_data[:40]:
        if record["fileformat"] != "pcd":
            continue
        raw = np.fromfile(nusc.get_sample_data_path(record["token"]), dtype=np.float32)
        assert raw.size % 5 == 0
        points = raw.reshape(-1, 5)
        assert 10_000 < len(points) < 60_000
        assert set(np.unique(points[:, 4]).astype(int)) <= set(range(32))
        ranges = np.linalg.norm(points[:, :3], axis=1)
        assert ranges.max() <= synthetic_config.visibility_range + 0.05
        assert 0 <= points[:, 3].min() and points[:, 3].max() <= 255


def test_num_lidar_pts_matches_devkit_points_in_box(nusc):
    from nuscenes.utils.geometry_utils import points_in_box

    checked = 0
    for sample in nusc.sample:
        points = _global_points(nusc, sample["data"]["LIDAR_TOP"])
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            assert int(points_in_box(nusc.get_box(ann_token), points).sum()) == ann["num_lidar_pts"]
            checked += 1
    assert checked > 50


def test_annotated_boxes_do_not_overlap_each_other_or_the_ego(nusc):
    from pyquaternion import Quaternion

    from distillbev.pipeline.synthetic.rig import EGO_FOOTPRINT

    for sample in nusc.sample:
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        xy = np.array([a["translation"][:2] for a in anns])
        yaw = np.array([Quaternion(a["rotation"]).yaw_pitch_roll[0] for a in anns])
        corners = rectangle_corners(xy, np.array([a["size"][1] for a in anns]), np.array([a["size"][0] for a in anns]), yaw)
        overlap = rectangles_overlap(corners[:, None], corners[None, :])
        assert not (overlap & ~np.eye(len(anns), dtype=bool)).any()
        ego = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        ego_yaw = Quaternion(ego["rotation"]).yaw_pitch_roll[0]
        cx, cy, length, width = EGO_FOOTPRINT
        centre = np.array(ego["translation"][:2]) + [cx * np.cos(ego_yaw), cx * np.sin(ego_yaw)]
        ego_corners = rectangle_corners(centre, np.array(length), np.array(width), np.array(ego_yaw))
        assert not rectangles_overlap(corners, ego_corners[None]).any()


def test_velocities_match_the_true_constant_motion(nusc, synthetic_config):
    moving = 0
    for scene_index, scene_record in enumerate(nusc.scene):
        scene = plan_scene(synthetic_config, scene_index).scene
        by_instance = {make_token(synthetic_config.seed, "instance", scene_index, i): obj
                       for i, obj in enumerate(scene.objects)}
        for ann in nusc.sample_annotation:
            if nusc.get("sample", ann["sample_token"])["scene_token"] != scene_record["token"]:
                continue
            obj = by_instance[ann["instance_token"]]
            assert _class_of(ann["category_name"]) == obj.class_name
            timestamp = nusc.get("sample", ann["sample_token"])["timestamp"]
            box = obj.boxes_at(np.array([scene.seconds(timestamp)]))[0]
            np.testing.assert_allclose(ann["translation"][:2], box[:2], atol=1e-9)
            velocity = nusc.box_velocity(ann["token"])[:2]
            if ann["prev"] or ann["next"]:
                np.testing.assert_allclose(velocity, obj.velocity, atol=1e-6)
                moving += np.hypot(*obj.velocity) > 0.5
            attributes = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
            if np.hypot(*obj.velocity) > 0:
                assert attributes[0] in ("vehicle.moving", "cycle.with_rider", "pedestrian.moving")
    assert moving > 3


def _hue_saturation(rgb: np.ndarray) -> tuple[float, float]:
    hue, saturation, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255.0))
    return hue, saturation


def test_renderer_draws_objects_where_the_devkit_projects_them(nusc):
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    hues = [spec.hue for spec in CLASS_SPECS.values()]
    checked, matched = 0, 0
    for sample in nusc.sample:
        for channel in ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"):
            path, boxes, intrinsic = nusc.get_sample_data(sample["data"][channel], box_vis_level=BoxVisibility.ANY)
            image = np.asarray(Image.open(path).convert("RGB"))
            for box in boxes:
                if box.center[2] < 1.0:
                    continue
                u, v = view_points(box.center[:, None], np.array(intrinsic), normalize=True)[:2, 0]
                if not (8 <= u < 1600 - 8 and 8 <= v < 900 - 8):
                    continue
                hue, saturation = _hue_saturation(image[int(round(v)), int(round(u))])
                hue_errors = [abs((hue - h + 0.5) % 1.0 - 0.5) for h in hues]
                # The centre always shows an object (never ground or sky): its own, or a nearer one hiding it.
                assert saturation > 0.4 and min(hue_errors) < 0.05, (channel, box.name, hue, saturation)
                checked += 1
                if hue_errors[list(CLASS_SPECS).index(_class_of(box.name))] < 0.05:
                    matched += 1
                else:  # hidden: the annotation must not claim it is fully visible
                    assert nusc.get("sample_annotation", box.token)["visibility_token"] != "4"
    assert checked >= 30
    assert matched >= 0.75 * checked


def test_background_has_no_class_colour(synthetic_dataroot):
    root, _ = synthetic_dataroot
    image = np.asarray(Image.open(next(Path(root, "samples", "CAM_FRONT").glob("*.jpg"))).convert("RGB"))
    sky = image[20, 800]
    assert _hue_saturation(sky)[1] < 0.3  # pale sky, never mistaken for an object
    assert image[20:100].std(axis=(0, 1)).max() < 20


def test_detection_eval_accepts_the_custom_splits(nusc, tmp_path):
    """GT-as-prediction on the val split through DetectionEval: every class present, near-perfect scores."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.eval.detection.utils import category_to_detection_name

    results = {}
    for sample in nusc.sample:
        entries = []
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            attributes = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
            entries.append({"sample_token": sample["token"], "translation": ann["translation"], "size": ann["size"],
                            "rotation": ann["rotation"], "velocity": list(nusc.box_velocity(ann_token)[:2]),
                            "detection_name": category_to_detection_name(ann["category_name"]),
                            "detection_score": 1.0, "attribute_name": attributes[0] if attributes else ""})
        results[sample["token"]] = entries
    for entries in results.values():
        for entry in entries:
            entry["velocity"] = [0.0 if np.isnan(v) else float(v) for v in entry["velocity"]]
    result_path = tmp_path / "results.json"
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    result_path.write_text(json.dumps({"meta": meta, "results": results}))
    evaluation = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(result_path), "synth_val",
                               str(tmp_path / "eval"), verbose=False)
    metrics, _ = evaluation.evaluate()
    summary = metrics.serialize()
    assert len(evaluation.gt_boxes.sample_tokens) == 3
    assert summary["mean_ap"] > 0.99
    assert summary["nd_score"] > 0.99

"""The tiny synthetic dataroot loads in nuscenes-devkit and its tables are complete and consistently linked."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from distillbev.pipeline.data.classes import ATTRIBUTES, DETECTION_CLASSES
from distillbev.pipeline.synthetic.catalog import CLASS_SPECS
from distillbev.pipeline.synthetic.generate import GENERATOR_ID, MANIFEST_NAME, SUMMARY_NAME
from distillbev.pipeline.synthetic.rig import CAMERA_CHANNELS, RIG
from distillbev.pipeline.synthetic.tables import TABLE_NAMES


def test_all_tables_and_manifest_written(synthetic_dataroot, synthetic_config):
    root, summary = synthetic_dataroot
    table_dir = root / synthetic_config.version
    assert sorted(p.stem for p in table_dir.glob("*.json") if p.stem != "splits") == sorted(TABLE_NAMES)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["generator"] == GENERATOR_ID and manifest["complete"] is True
    assert manifest["summary"]["samples"] == summary["samples"] == 6
    assert json.loads((root / SUMMARY_NAME).read_text())["annotations"] == summary["annotations"] > 0
    assert summary["sweeps"] == 6 * 9
    splits = json.loads((table_dir / "splits.json").read_text())
    assert splits == {"synth_train": ["scene-0000"], "synth_val": ["scene-0001"]}


def test_every_referenced_file_exists(nusc):
    for record in nusc.sample_data:
        assert Path(nusc.dataroot, record["filename"]).is_file(), record["filename"]
    for record in nusc.map:
        assert Path(nusc.dataroot, record["filename"]).is_file()
        assert set(record["log_tokens"]) == {log["token"] for log in nusc.log}
    camera = next(r for r in nusc.sample_data if r["fileformat"] == "jpg")
    with Image.open(Path(nusc.dataroot, camera["filename"])) as image:
        assert image.size == (1600, 900) == (camera["width"], camera["height"])


def test_rig_is_the_real_nuscenes_rig(nusc):
    assert {s["channel"] for s in nusc.sensor} == {"LIDAR_TOP", *CAMERA_CHANNELS}
    for record in nusc.calibrated_sensor:
        calibration = RIG[nusc.get("sensor", record["sensor_token"])["channel"]]
        np.testing.assert_allclose(record["translation"], calibration.translation)
        np.testing.assert_allclose(record["rotation"], calibration.rotation)
        if calibration.modality == "camera":
            np.testing.assert_allclose(record["camera_intrinsic"], calibration.intrinsics)
    front = RIG["CAM_FRONT"].intrinsics
    assert front[0, 0] == front[1, 1] and 800 < front[0, 2] < 830


def _walk(nusc, table: str, first: str) -> list[dict]:
    records, token = [], first
    while token:
        records.append(nusc.get(table, token))
        token = records[-1]["next"]
    return records


def test_scene_and_sample_chains(nusc):
    for scene in nusc.scene:
        samples = _walk(nusc, "sample", scene["first_sample_token"])
        assert len(samples) == scene["nbr_samples"] == 3
        assert samples[-1]["token"] == scene["last_sample_token"]
        assert samples[0]["prev"] == ""
        assert all(s["scene_token"] == scene["token"] for s in samples)
        times = [s["timestamp"] for s in samples]
        assert all(isinstance(t, int) for t in times)
        assert np.all(np.diff(times) == 500_000)  # 2 Hz key frames in microseconds
        for before, after in zip(samples[:-1], samples[1:]):
            assert after["prev"] == before["token"]


def test_sample_data_chains_per_channel_in_time_order(nusc):
    chains: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in nusc.sample_data:
        scene = nusc.get("sample", record["sample_token"])["scene_token"]
        chains[(scene, record["channel"])].append(record)
    assert len(chains) == 2 * 7
    for (scene, channel), records in chains.items():
        heads = [r for r in records if r["prev"] == ""]
        assert len(heads) == 1
        walked = _walk(nusc, "sample_data", heads[0]["token"])
        assert [r["token"] for r in walked] == [r["token"] for r in sorted(records, key=lambda r: r["timestamp"])]
        times = np.array([r["timestamp"] for r in walked])
        if channel == "LIDAR_TOP":
            assert len(walked) == 3 * 10 and np.all(np.diff(times) == 50_000)  # 20 Hz, sweeps included
            # A sweep belongs to the next key frame's sample (the devkit interpolates from sample.prev).
            for record in walked:
                sample = nusc.get("sample", record["sample_token"])
                assert sample["timestamp"] - record["timestamp"] in range(0, 500_000, 50_000)
                assert record["is_key_frame"] == (sample["timestamp"] == record["timestamp"])
        else:
            assert len(walked) == 3 and all(r["is_key_frame"] for r in walked)
        for record in walked:
            assert nusc.get("ego_pose", record["ego_pose_token"])["timestamp"] == record["timestamp"]


def test_instance_annotation_chains(nusc):
    assert sum(i["nbr_annotations"] for i in nusc.instance) == len(nusc.sample_annotation)
    for instance in nusc.instance:
        annotations = _walk(nusc, "sample_annotation", instance["first_annotation_token"])
        assert len(annotations) == instance["nbr_annotations"] >= 1
        assert annotations[-1]["token"] == instance["last_annotation_token"]
        assert annotations[0]["prev"] == ""
        assert all(a["instance_token"] == instance["token"] for a in annotations)
        times = [nusc.get("sample", a["sample_token"])["timestamp"] for a in annotations]
        assert times == sorted(times) and len(set(times)) == len(times)


def test_annotation_fields(nusc, synthetic_config):
    categories = {spec.category for spec in CLASS_SPECS.values()}
    for ann in nusc.sample_annotation:
        assert ann["category_name"] in categories
        spec = next(s for s in CLASS_SPECS.values() if s.category == ann["category_name"])
        assert ann["visibility_token"] in {"1", "2", "3", "4"}
        assert ann["num_radar_pts"] == 0 and ann["num_lidar_pts"] >= 1
        names = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        if spec.name in ("barrier", "traffic_cone"):
            assert names == []
        else:
            assert len(names) == 1 and names[0] in ATTRIBUTES
        # Sizes are (w, l, h), near the class' nuScenes mean.
        np.testing.assert_allclose(ann["size"], spec.size_wlh, rtol=0.1)
        assert abs(ann["translation"][2] - ann["size"][2] / 2) < 1e-9  # resting on the ground
        sample = nusc.get("sample", ann["sample_token"])
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        ego = nusc.get("ego_pose", lidar["ego_pose_token"])["translation"]
        assert np.hypot(ann["translation"][0] - ego[0], ann["translation"][1] - ego[1]) < synthetic_config.visibility_range


def test_val_split_has_all_ten_classes(nusc):
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    assert "synth_val" not in splits  # a custom split, read from splits.json
    val_scene = next(s for s in nusc.scene if s["name"] == "scene-0001")
    classes = set()
    for sample in _walk(nusc, "sample", val_scene["first_sample_token"]):
        for ann_token in sample["anns"]:
            classes.add(next(s.name for s in CLASS_SPECS.values()
                             if s.category == nusc.get("sample_annotation", ann_token)["category_name"]))
    assert classes == set(DETECTION_CLASSES)


def test_ego_drives_a_smooth_path(nusc):
    for scene in nusc.scene:
        first = nusc.get("sample", scene["first_sample_token"])
        lidar = _walk(nusc, "sample_data", nusc.get("sample_data", first["data"]["LIDAR_TOP"])["token"])
        poses = [nusc.get("ego_pose", r["ego_pose_token"]) for r in lidar]
        xy = np.array([p["translation"][:2] for p in poses])
        intervals = np.diff([p["timestamp"] for p in poses]) * 1e-6  # differences of ints first: us since 1970
        speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / intervals
        assert 3.0 <= speed.min() and speed.max() <= 8.0 and np.ptp(speed) < 1e-6
        from pyquaternion import Quaternion

        yaw = np.array([Quaternion(p["rotation"]).yaw_pitch_roll[0] for p in poses])
        step = np.diff(xy, axis=0)
        tangent = np.arctan2(step[:, 1], step[:, 0])  # chord direction = mean of the two headings on an arc
        mean_yaw = np.angle(np.exp(1j * yaw[:-1]) + np.exp(1j * yaw[1:]))
        assert np.abs(np.angle(np.exp(1j * (tangent - mean_yaw)))).max() < 1e-6
        assert np.abs(np.diff(np.unwrap(yaw))).max() < 0.02 * 8.0 * 0.05 + 1e-9  # gentle: |curvature| <= 0.02

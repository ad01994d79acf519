"""The flat split index: the dataset reads only it, it round-trips through .npz, and it fingerprints like the devkit.

The tiny dataroot (tiny_nuscenes.py): split tiny_val is one scene of two key frames; the LIDAR_TOP chain (ms from
T0) is sweep -100, sweep -50, key 0, sweep 250, key 500, so key frame 1's sweeps nearest first are 250, 0, -50,
-100 (four records), key frame 0's are -50, -100 (two).
"""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.index import SplitIndex, build_split_index
from distillbev.pipeline.data.loading import load_nuscenes
from distillbev.pipeline.data.preflight import dataset_fingerprint, index_fingerprint
from distillbev.pipeline.errors import DataError

SPLIT = "tiny_val"


def config_for(slice_, **overrides) -> DataConfig:
    return DataConfig(dataroot=str(slice_.dataroot), version=slice_.version, train_split="tiny_train",
                      val_split=SPLIT, **{"load_images": True, "final_size": (32, 88), "num_sweeps": 2,
                                          "load_previous_frame": True, **overrides})


def test_index_holds_the_records_in_split_order(tiny, tiny_slice):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    index = build_split_index(nusc, SPLIT, 10, ("CAM_FRONT", "CAM_BACK"))
    assert [index.token(i) for i in range(len(index))] == tiny_slice.sample_tokens
    assert index.previous.tolist() == [-1, 0]  # key frame 1's previous key frame is key frame 0
    assert index.sweep_counts.tolist() == [2, 4]
    sweep_ms = [(t - tiny.T0) // 1000 for t in index.sweeps.timestamps[1, :4]]
    assert sweep_ms == [250, 0, -50, -100]
    assert index.sweeps.files[1, 4:].tolist() == [b""] * 6 and index.sweeps.calibration[1, 4:].tolist() == [-1] * 6
    assert index.cameras.files.shape == (2, 2)
    assert index.path(index.lidar, 0) == str(tiny_slice.key_lidar_files[0])
    # the records' own calibration and ego pose, as the devkit gives them
    sample = nusc.get("sample", tiny_slice.sample_tokens[1])
    record = nusc.get("sample_data", sample["data"]["CAM_BACK"])
    calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", record["ego_pose_token"])
    row = index.cameras.calibration[1, 1]
    assert index.calibrations[row].tolist() == [*calibration["rotation"], *calibration["translation"]]
    assert index.intrinsics[row].tolist() == calibration["camera_intrinsic"]
    assert index.cameras.ego_pose[1, 1].tolist() == [*pose["rotation"], *pose["translation"]]
    # annotations: the rows of each sample, exactly the dataset's GT
    assert index.box_offsets[-1] == len(index.labels) == index.boxes.shape[0]


def test_dataset_samples_equal_from_a_saved_index(tiny_slice, tmp_path):
    config = config_for(tiny_slice)
    built = NuScenesDetectionDataset(config, SPLIT, "train")
    built.index.save(tmp_path / "index.npz")
    loaded = NuScenesDetectionDataset(config, SPLIT, "train", index=SplitIndex.load(tmp_path / "index.npz"))
    for i in range(len(built)):
        a, b = built[i], loaded[i]
        for name in ("points", "depth_points", "gt_boxes", "gt_labels", "gt_attributes", "bev_aug",
                     "prev_lidar_to_lidar"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for name in ("images", "intrinsics", "camera_to_lidar", "image_aug"):
            assert torch.equal(getattr(a.cameras, name), getattr(b.cameras, name))
            assert torch.equal(getattr(a.prev_cameras, name), getattr(b.prev_cameras, name))
        assert np.array_equal(a.ego_to_global, b.ego_to_global)
    # the first key frame of a scene is its own previous frame
    assert torch.allclose(built[0].prev_lidar_to_lidar, torch.eye(4), atol=1e-12)


def test_the_dataset_keeps_no_devkit_object(tiny_slice):
    """Forked DataLoader workers inherit the dataset: it must hold only the flat index (numpy buffers) and small
    Python objects, never the devkit's table dicts."""
    from nuscenes import NuScenes

    dataset = NuScenesDetectionDataset(config_for(tiny_slice), SPLIT, "train")
    assert not any(isinstance(value, NuScenes) for value in vars(dataset).values())
    assert not any(isinstance(value, NuScenes) for value in vars(dataset.index).values())
    tables = sum(path.stat().st_size for path in (tiny_slice.dataroot / tiny_slice.version).glob("*.json"))
    assert len(pickle.dumps(dataset)) < tables  # smaller than the tables it was built from


@pytest.mark.parametrize("num_sweeps", [9, 1, 0])
def test_index_fingerprint_equals_the_devkit_fingerprint(tiny_slice, num_sweeps):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    index = build_split_index(nusc, SPLIT, 10)
    expected = dataset_fingerprint(nusc, tiny_slice.sample_tokens, num_sweeps, 10)
    assert index_fingerprint(index, num_sweeps) == expected
    assert index_fingerprint(index, 9 - num_sweeps if num_sweeps else 1) != expected
    with pytest.raises(ValueError, match="holds 10 sweep candidates"):
        index_fingerprint(index, 11)


def test_an_index_that_does_not_fit_is_refused(tiny_slice, tmp_path):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    lidar_only = build_split_index(nusc, SPLIT, 10)
    with pytest.raises(DataError, match=r"cameras \[\], 10 sweep candidates, 0 adjacent every 1\) does not fit "
                                         r"split 'tiny_val' with cameras \['CAM_FRONT_LEFT'"):
        NuScenesDetectionDataset(config_for(tiny_slice), SPLIT, "train", index=lidar_only)
    with pytest.raises(DataError, match="does not fit split 'tiny_train'"):
        NuScenesDetectionDataset(config_for(tiny_slice, load_images=False), "tiny_train", "train", index=lidar_only)
    path = tmp_path / "old.npz"
    np.savez(path, format=np.array(0))
    with pytest.raises(DataError, match=f"{path}: split index format 0, expected 2 \\(a folder\\); delete the file"):
        SplitIndex.load(path)


def test_a_sample_without_a_configured_camera_names_it(tiny_slice_copy):
    table = tiny_slice_copy.dataroot / tiny_slice_copy.version / "sample_data.json"
    records = json.loads(table.read_text())
    token = tiny_slice_copy.sample_tokens[1]
    records = [r for r in records if not (r["sample_token"] == token and "CAM_BACK" in r["filename"]
                                          and r["is_key_frame"])]
    table.write_text(json.dumps(records))
    nusc = load_nuscenes(tiny_slice_copy.dataroot, tiny_slice_copy.version)
    # the devkit's sample['data'] is built from sample_data, so the key-frame CAM_BACK is gone from it
    with pytest.raises(DataError, match=f"{table}: sample {token} has no key-frame CAM_BACK sample_data"):
        build_split_index(nusc, SPLIT, 10, ("CAM_FRONT", "CAM_BACK"))


# ------------------------------------------------------------------------------------------- adjacent frames
class ChainedTables:
    """A stand-in devkit with two cameras' sample_data chains: CAM_FRONT at 12 Hz (every 83.333 ms, 20 records
    back) and CAM_BACK 20 ms later than each CAM_FRONT record."""

    def __init__(self) -> None:
        self.records = {}
        for channel, offset in (("CAM_FRONT", 0), ("CAM_BACK", 20_000)):
            for k in range(21):  # k = 0 is the key frame, k = 1.. are earlier records
                prev = f"{channel}-{k + 1}" if k < 20 else ""
                self.records[f"{channel}-{k}"] = {"token": f"{channel}-{k}", "prev": prev,
                                                  "timestamp": 1_000_000_000 - round(k * 1e6 / 12) + offset}
        self.sample = {"data": {"CAM_FRONT": "CAM_FRONT-0", "CAM_BACK": "CAM_BACK-0"}}

    def get(self, table: str, token: str) -> dict:
        assert table == "sample_data"
        return self.records[token]


def test_adjacent_candidates_follow_the_reference_camera_every_interval():
    """Interval 3, 4 candidates: CAM_FRONT records 3, 6, 9, 12 back (0.25 s apart; the reference's infos), and for
    CAM_BACK its record nearest in time to each, i.e. the same count back."""
    from distillbev.pipeline.data.index import _adjacent_candidates

    tables = ChainedTables()
    candidates = _adjacent_candidates(tables, tables.sample, ("CAM_BACK", "CAM_FRONT"), 1, 4, 3)
    assert [[record["token"] for record in row] for row in candidates] == [
        ["CAM_BACK-3", "CAM_FRONT-3"], ["CAM_BACK-6", "CAM_FRONT-6"], ["CAM_BACK-9", "CAM_FRONT-9"],
        ["CAM_BACK-12", "CAM_FRONT-12"]]
    # a chain shorter than the candidates asked for gives what exists: 20 records back hold 6 at interval 3
    assert len(_adjacent_candidates(tables, tables.sample, ("CAM_FRONT",), 0, 9, 3)) == 6
    # interval 1 is the previous record (the previous key frame where cameras only record key frames)
    first = _adjacent_candidates(tables, tables.sample, ("CAM_FRONT",), 0, 1, 1)
    assert [[record["token"] for record in row] for row in first] == [["CAM_FRONT-1"]]


def test_adjacent_choice_is_the_reference_rule(tiny_slice):
    """BEVDet4D's dataset: train draws from [low, min(high, count)), the last one when count <= low; test takes
    min(test candidate, count - 1); a scene start (count 0) is its own previous frame (-1)."""
    dataset = NuScenesDetectionDataset(config_for(tiny_slice, adjacent_train_range=(2, 9),
                                                  adjacent_test_candidate=5), SPLIT, "train")
    counts = dataset.index.adjacent_counts
    assert counts.tolist() == [0, 1]  # the tiny cameras record key frames only: key frame 1 has one candidate
    assert dataset.adjacent_choice(0, np.random.default_rng(0)) == -1
    assert dataset.adjacent_choice(1, np.random.default_rng(0)) == 0  # count 1 <= low 2: the last candidate
    assert dataset.adjacent_choice(1, None) == 0  # test: min(5, 0)
    # the saved index is mapped read-only: give the dataset a private copy of the counts to edit
    dataset.index = dataclasses.replace(dataset.index, adjacent_counts=np.array(counts))
    dataset.index.adjacent_counts[1] = 12  # pretend a 12 Hz chain: draws cover exactly 2..8
    draws = {dataset.adjacent_choice(1, np.random.default_rng(seed)) for seed in range(200)}
    assert draws == set(range(2, 9))
    assert dataset.adjacent_choice(1, None) == 5
    dataset.index.adjacent_counts[1] = 4
    assert {dataset.adjacent_choice(1, np.random.default_rng(seed)) for seed in range(50)} == {2, 3}
    assert dataset.adjacent_choice(1, None) == 3
    dataset.index.adjacent_counts[1] = 1

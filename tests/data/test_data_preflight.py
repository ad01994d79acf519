"""Pre-flight check of a split's LiDAR inputs, the dataset fingerprint, and per-table JSON errors."""

from __future__ import annotations

import hashlib

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.index import build_split_index, load_lidar_points
from distillbev.pipeline.data.loading import load_nuscenes, split_sample_tokens
from distillbev.pipeline.data.preflight import (check_split_inputs, dataset_fingerprint, lidar_inputs,
                                                preflight_message, preflight_split)
from distillbev.pipeline.errors import DataError

SPLIT = "tiny_val"
KEY_BYTES = 15 * 20  # 5 points + 10 object centres
SWEEP_BYTES = 5 * 20
# LIDAR_TOP chain of the tiny dataroot (ms from T0): sweep -100, sweep -50, key 0, sweep 250, key 500.
FILES_READ = {9: [-100, -50, 0, 250, 500], 1: [-50, 0, 250, 500], 0: [0, 500]}  # num_sweeps -> distinct files


def lidar_path(tiny, slice_, ms: int) -> Path:
    return slice_.lidar_files[tiny.token("sd", "LIDAR_TOP", tiny.T0 + ms * 1000)]


def fingerprint(slice_, num_sweeps=9, tokens=None) -> str:
    nusc = load_nuscenes(slice_.dataroot, slice_.version)
    tokens = split_sample_tokens(nusc, SPLIT) if tokens is None else tokens
    return dataset_fingerprint(nusc, tokens, num_sweeps, max(num_sweeps, 10))


def edit_table(slice_, table: str, edit) -> None:
    path = slice_.dataroot / slice_.version / f"{table}.json"
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records, indent=1))


# ------------------------------------------------------------------------------------------ clean dataroot
@pytest.mark.parametrize("num_sweeps", [9, 1, 0])
def test_clean_dataroot_counts_every_file(tiny, tiny_slice, num_sweeps):
    nusc, tokens, inputs = preflight_split(tiny_slice.dataroot, tiny_slice.version, SPLIT, num_sweeps, 10)
    paths = [lidar_path(tiny, tiny_slice, ms) for ms in FILES_READ[num_sweeps]]
    assert tokens == tiny_slice.sample_tokens
    assert inputs.problems == []
    assert inputs.sample_count == 2
    assert inputs.files == len(FILES_READ[num_sweeps])
    assert inputs.bytes == sum(path.stat().st_size for path in paths)
    assert inputs.bytes == {9: 2 * KEY_BYTES + 3 * SWEEP_BYTES, 1: 2 * KEY_BYTES + 2 * SWEEP_BYTES,
                            0: 2 * KEY_BYTES}[num_sweeps]
    assert len(inputs.fingerprint) == 64 and int(inputs.fingerprint, 16) >= 0


def test_lidar_inputs_are_key_frame_then_nearest_sweeps(tiny, tiny_slice):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    records = lidar_inputs(nusc, tiny_slice.sample_tokens, 9, 10)
    names = [[Path(r["filename"]).name for r in sample] for sample in records]
    expected = [[lidar_path(tiny, tiny_slice, ms).name for ms in order] for order in ([0, -50, -100],
                                                                                     [500, 250, 0, -50, -100])]
    assert names == expected
    assert [[Path(r["filename"]).name for r in s] for s in lidar_inputs(nusc, tiny_slice.sample_tokens, 1, 10)] \
        == [expected[0][:2], expected[1][:2]]


# ---------------------------------------------------------------------------------------- broken files
def test_every_broken_file_is_reported_in_one_call(tiny, tiny_slice_copy):
    first, last = tiny_slice_copy.sample_tokens
    key = tiny_slice_copy.key_lidar_files[-1]
    key.unlink()
    sweep = lidar_path(tiny, tiny_slice_copy, -50)
    sweep.write_bytes(sweep.read_bytes()[:90])

    _, _, inputs = preflight_split(tiny_slice_copy.dataroot, tiny_slice_copy.version, SPLIT, 9, 10, progress=True)
    assert inputs.problems == [
        f"{sweep}: 90 bytes in sample {first} (and 1 more sample), expected a positive multiple of 20 (5 float32 "
        f"x, y, z, intensity, ring per point); the file is truncated or not a .pcd.bin, re-extract it",
        f"{key}: LiDAR file of sample {last} not found; check that samples/ and sweeps/ were extracted into the "
        f"dataroot",
    ]
    assert inputs.files == 5
    assert inputs.bytes == KEY_BYTES + 90 + 2 * SWEEP_BYTES
    assert preflight_message(inputs.problems) == f"2 problems in the inputs: {'; '.join(inputs.problems)}"


def test_empty_file_and_folder_are_problems(tiny, tiny_slice_copy):
    first, last = tiny_slice_copy.sample_tokens
    sweep = lidar_path(tiny, tiny_slice_copy, 250)
    sweep.write_bytes(b"")
    key = tiny_slice_copy.key_lidar_files[0]
    key.unlink()
    key.mkdir()
    nusc = load_nuscenes(tiny_slice_copy.dataroot, tiny_slice_copy.version)
    inputs = check_split_inputs(nusc, tiny_slice_copy.sample_tokens, 1, 10)
    assert inputs.problems == [
        f"{key}: LiDAR file of sample {first} is not a regular file; re-extract it from the dataset archive",
        f"{sweep}: 0 bytes in sample {last}, expected a positive multiple of 20 (5 float32 x, y, z, intensity, "
        f"ring per point); the file is truncated or not a .pcd.bin, re-extract it",
    ]


def test_preflight_message_limits_the_list():
    problems = [f"p{i}" for i in range(8)]
    assert preflight_message(problems, limit=3) == "8 problems in the inputs: p0; p1; p2 (and 5 more)"
    assert preflight_message(["only"]) == "1 problem in the inputs: only"


# ---------------------------------------------------------------------------------------------- tables
def truncate_table(slice_, table: str) -> tuple[Path, str]:
    """Cut a table file mid-record; returns its path and the parser's message for it."""
    path = slice_.dataroot / slice_.version / f"{table}.json"
    text = path.read_text()[:5000]
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as exc_info:
        json.loads(text)
    return path, str(exc_info.value)


def test_truncated_table_is_named(tiny_slice_copy):
    path, error = truncate_table(tiny_slice_copy, "sample_annotation")
    with pytest.raises(DataError) as exc_info:
        load_nuscenes(tiny_slice_copy.dataroot, tiny_slice_copy.version)
    assert str(exc_info.value) == f"{path}: not valid JSON ({error}); re-extract or regenerate this table"
    assert "sample_annotation.json: not valid JSON (" in str(exc_info.value)


def test_two_broken_tables_are_named_in_one_message(tiny_slice_copy):
    annotations, annotations_error = truncate_table(tiny_slice_copy, "sample_annotation")
    poses = tiny_slice_copy.dataroot / tiny_slice_copy.version / "ego_pose.json"
    poses.write_text('{"token": "a"}')
    with pytest.raises(DataError) as exc_info:
        preflight_split(tiny_slice_copy.dataroot, tiny_slice_copy.version, SPLIT, 9, 10)
    assert str(exc_info.value) == (
        f"{poses}: expected a JSON list of records, found dict; re-extract or regenerate this table; "
        f"{annotations}: not valid JSON ({annotations_error}); re-extract or regenerate this table")


def test_two_missing_tables_are_named_in_one_message(tiny_slice_copy):
    table_root = tiny_slice_copy.dataroot / tiny_slice_copy.version
    (table_root / "log.json").unlink()
    (table_root / "map.json").unlink()
    with pytest.raises(DataError) as exc_info:
        preflight_split(tiny_slice_copy.dataroot, tiny_slice_copy.version, SPLIT, 9, 10)
    message = str(exc_info.value)
    assert "\n" not in message and message.count("table file missing") == 2
    assert message.startswith(f"{table_root / 'log.json'}: table file missing; ")
    assert f"; {table_root / 'map.json'}: table file missing; " in message


# ------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_ignores_where_the_dataroot_lives(tiny_slice, tmp_path):
    moved = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(tiny_slice.dataroot, moved)
    copy = type(tiny_slice)(dataroot=moved, version=tiny_slice.version)
    assert fingerprint(copy) == fingerprint(tiny_slice)


@pytest.mark.parametrize("table, field, index", [("ego_pose", "translation", 0),
                                                 ("calibrated_sensor", "rotation", 1),
                                                 ("sample_data", "timestamp", None)])
def test_fingerprint_changes_with_a_record_the_split_reads(tiny, tiny_slice, tiny_slice_copy, table, field, index):
    target = {"ego_pose": tiny.token("sd", "LIDAR_TOP", tiny.T0 - 100_000), "calibrated_sensor":
              tiny.token("calib", "LIDAR_TOP"), "sample_data": tiny.token("sd", "LIDAR_TOP", tiny.T0 + 250_000)}[table]

    def edit(records):
        record = next(r for r in records if r["token"] == target)
        if index is None:
            record[field] += 1
        else:
            record[field][index] += 1e-6

    edit_table(tiny_slice_copy, table, edit)
    assert fingerprint(tiny_slice_copy) != fingerprint(tiny_slice)


def test_fingerprint_changes_with_a_file_size(tiny, tiny_slice, tiny_slice_copy):
    sweep = lidar_path(tiny, tiny_slice_copy, -100)
    sweep.write_bytes(sweep.read_bytes() + np.zeros(5, dtype=np.float32).tobytes())
    assert fingerprint(tiny_slice_copy) != fingerprint(tiny_slice)


def test_fingerprint_changes_with_num_sweeps_and_split_order(tiny_slice):
    reference = fingerprint(tiny_slice)
    first, last = tiny_slice.sample_tokens
    assert fingerprint(tiny_slice, tokens=[first, last]) == reference
    assert fingerprint(tiny_slice, num_sweeps=1) != reference
    # 10 sweeps read the same 4 previous records as 9 (the chain is shorter), but the setting differs.
    assert fingerprint(tiny_slice, num_sweeps=10) != reference
    assert fingerprint(tiny_slice, tokens=[last, first]) != reference
    assert fingerprint(tiny_slice, tokens=[first]) != reference


def test_fingerprint_ignores_unrelated_tables(tiny_slice, tiny_slice_copy):
    def edit(records):
        records[0]["translation"][0] += 1.0

    edit_table(tiny_slice_copy, "sample_annotation", edit)
    assert fingerprint(tiny_slice_copy) == fingerprint(tiny_slice)


# ------------------------------------------------------------------------------- load_lidar_points unchanged
# Pinned from the loader as it was before the sweep walk moved into `lidar_records` (checked then against an
# inline copy of the old code): (points, sha256 prefix of the float32 bytes, next draw of the rng or None).
PINNED_CLOUDS = {
    (9, 10, None): [(23, "a1df200a76fc6e13", None), (41, "000e73491ddd695c", None)],
    (1, 10, None): [(19, "1f61d137f1a63a90", None), (19, "d4c6eacc2204ceb1", None)],
    (2, 4, 3): [(23, "a1df200a76fc6e13", 0.08564916714362436), (23, "3b50d4a3cc443ba5", 0.8012744652063969)],
    (1, 4, 11): [(19, "1f61d137f1a63a90", 0.49927786244011496), (19, "d4c6eacc2204ceb1", 0.49927786244011496)],
}


@pytest.mark.parametrize("num_sweeps, candidates, seed", list(PINNED_CLOUDS))
def test_load_lidar_points_is_unchanged(tiny_slice, num_sweeps, candidates, seed):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, num_sweeps=num_sweeps,
                        sweep_candidates=candidates, load_images=False)
    index = build_split_index(nusc, SPLIT, candidates)
    assert [index.token(i) for i in range(len(index))] == tiny_slice.sample_tokens
    found = []
    for i in range(len(index)):
        rng = None if seed is None else np.random.default_rng(seed)
        points = load_lidar_points(index, i, config, rng)
        assert points.dtype == np.float32 and points.shape[1] == 5
        found.append((points.shape[0], hashlib.sha256(points.tobytes()).hexdigest()[:16],
                      None if rng is None else rng.random()))  # the same draws were consumed
    assert found == PINNED_CLOUDS[(num_sweeps, candidates, seed)]


@pytest.mark.parametrize("pad", [True, False])
def test_a_scene_start_without_sweeps_is_padded_with_its_key_frame(tiny_slice_copy, pad):
    """Key frame 0 cut from its previous sweeps: with padding its cloud is the key frame plus, per missing sweep,
    the key frame without its own close returns (|x| and |y| < 1 m), all at time lag 0 (mmdet3d's rule)."""
    from distillbev.pipeline.data.loading import read_points

    nusc = load_nuscenes(tiny_slice_copy.dataroot, tiny_slice_copy.version)
    token = tiny_slice_copy.sample_tokens[0]
    key_token = nusc.get("sample", token)["data"]["LIDAR_TOP"]
    key_file = tiny_slice_copy.dataroot / nusc.get("sample_data", key_token)["filename"]

    def cut(records):
        for record in records:
            if record["token"] == key_token:
                record["prev"] = ""

    edit_table(tiny_slice_copy, "sample_data", cut)
    nusc = load_nuscenes(tiny_slice_copy.dataroot, tiny_slice_copy.version)
    config = DataConfig(dataroot=str(tiny_slice_copy.dataroot), version=tiny_slice_copy.version, num_sweeps=2,
                        load_images=False, pad_empty_sweeps=pad)
    points = load_lidar_points(build_split_index(nusc, SPLIT, 10), 0, config, None)
    key = read_points(key_file, token)
    key[:, 4] = 0.0
    far = key[~((np.abs(key[:, 0]) < 1.0) & (np.abs(key[:, 1]) < 1.0))]
    expected = np.concatenate([key, far, far]) if pad else key
    assert len(far) < len(key)  # the tiny key frame has a return within 1 m: the padding really drops it
    assert points.tobytes() == expected.astype(np.float32).tobytes()

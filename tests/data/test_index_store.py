"""The saved split index: written once as raw arrays, mapped read-only by every process, rebuilt when stale.

The tiny dataroot (tiny_nuscenes.py): split tiny_val is one scene of two key frames, 13 tables and splits.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from distillbev.pipeline.data import index_store
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.index import FrameTable, SplitIndex, build_split_index
from distillbev.pipeline.data.index_store import open_split_index
from distillbev.pipeline.data.loading import load_nuscenes
from distillbev.pipeline.errors import DataError

SPLIT = "tiny_val"
CAMERAS = ("CAM_FRONT", "CAM_BACK")


def config_for(root: Path, version: str, **overrides) -> DataConfig:
    values = {"load_images": True, "camera_channels": CAMERAS, "num_sweeps": 2, "load_previous_frame": True,
              "final_size": (32, 88), **overrides}
    return DataConfig(dataroot=str(root), version=version, train_split="tiny_train", val_split=SPLIT, **values)


@pytest.fixture
def root(tiny_slice_copy):
    """(dataroot, version) of a private tiny dataroot: its index folder starts empty and tests may edit tables."""
    shutil.rmtree(tiny_slice_copy.dataroot / ".distillbev", ignore_errors=True)  # copied from the shared dataroot
    return tiny_slice_copy.dataroot, tiny_slice_copy.version


@pytest.fixture
def builds(monkeypatch):
    """The splits the devkit builder was called for, in order (the real builder still runs)."""
    calls = []
    real = index_store.build_split_index

    def counting(nusc, split, *args, **kwargs):
        calls.append(split)
        return real(nusc, split, *args, **kwargs)

    monkeypatch.setattr(index_store, "build_split_index", counting)
    return calls


def assert_same_index(a: SplitIndex, b: SplitIndex) -> None:
    """Field for field equal: every array (values, dtype, shape) and every scalar."""
    for field in dataclasses.fields(SplitIndex):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, FrameTable):
            for sub in dataclasses.fields(FrameTable):
                u, v = getattr(x, sub.name), getattr(y, sub.name)
                assert u.dtype == v.dtype and np.array_equal(u, v), f"{field.name}.{sub.name}"
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


def index_folders_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


# --------------------------------------------------------------------------------------------- save / load
def test_save_and_map_round_trip_field_for_field(tiny_slice, tmp_path):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    built = build_split_index(nusc, SPLIT, 10, CAMERAS, 1, 1)
    built.save(tmp_path / "index", {"note": "kept"})
    mapped = SplitIndex.load(tmp_path / "index")
    assert_same_index(mapped, built)
    # every array is a read-only map of its file, not a private copy
    arrays = mapped.arrays()
    assert len(arrays) == 27 and sorted(arrays) == sorted(built.arrays())
    for name, array in arrays.items():
        assert isinstance(array, np.memmap) and not array.flags.owndata and not array.flags.writeable, name
        assert Path(array.filename) == (tmp_path / "index" / f"{name}.npy").resolve()
        np.load(tmp_path / "index" / f"{name}.npy", allow_pickle=False)  # plain .npy, no pickled objects
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert header["format"] == 2 and header["metadata"] == {"note": "kept"}
    assert header["arrays"]["boxes"] == {"dtype": "<f8", "shape": [len(built.labels), 9]}
    # nothing but the finished folder is left (the temporary folder was renamed)
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    # read into memory instead of mapped
    assert not isinstance(SplitIndex.load(tmp_path / "index", mmap=False).boxes, np.memmap)


def test_a_mapped_index_pickles_as_its_folder(tiny_slice, tmp_path):
    """Spawned workers get the folder and map it again (a few hundred bytes), not a copy of every array; an index
    rebuilt in between is refused rather than silently swapped."""
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    built = build_split_index(nusc, SPLIT, 10, CAMERAS)
    built.save(tmp_path / "index")
    mapped = SplitIndex.load(tmp_path / "index", dataroot="/elsewhere")
    payload = pickle.dumps(mapped)
    assert len(payload) < 1000 < len(pickle.dumps(built))
    again = pickle.loads(payload)
    assert isinstance(again.tokens, np.memmap) and again.dataroot == "/elsewhere"
    assert_same_index(again, mapped)
    # an edited copy is no longer the folder's content: it pickles its arrays
    edited = dataclasses.replace(mapped, previous=np.array(mapped.previous))
    assert pickle.loads(pickle.dumps(edited)).previous.tolist() == mapped.previous.tolist()
    built.save(tmp_path / "index")  # rebuilt: a new build id
    with pytest.raises(DataError, match="the split index was rebuilt .* restart the job"):
        pickle.loads(payload)


def test_a_damaged_folder_is_a_data_error_naming_it(tiny_slice, tmp_path):
    nusc = load_nuscenes(tiny_slice.dataroot, tiny_slice.version)
    build_split_index(nusc, SPLIT, 10).save(tmp_path / "index")
    path = tmp_path / "index" / "boxes.npy"
    np.save(path, np.zeros((1, 9)))
    with pytest.raises(DataError, match=f"{path}: split index array of <f8 \\[1, 9\\], expected <f8 \\[[0-9]+, 9\\]"):
        SplitIndex.load(tmp_path / "index")


# ---------------------------------------------------------------------------------------------- the store
def test_the_first_open_builds_and_saves_later_opens_map(root, builds, caplog):
    dataroot, version = root
    config = config_for(dataroot, version)
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.data.index_store"):
        first = open_split_index(config, SPLIT)
    assert builds == [SPLIT]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    folder = dataroot / ".distillbev" / "index"
    assert len(lines) == 1 and lines[0].startswith(f"split index of {SPLIT}: none saved yet; building it from the "
                                                   f"devkit tables into {folder}/{version}.{SPLIT}.")
    caplog.clear()
    second = open_split_index(config, SPLIT)
    assert builds == [SPLIT]  # mapped, not rebuilt
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert isinstance(second.boxes, np.memmap) and isinstance(first.boxes, np.memmap)
    assert second.boxes.filename == first.boxes.filename
    # equal to an index built in memory from the devkit, and its paths use the dataroot as configured
    nusc = load_nuscenes(dataroot, version)
    assert_same_index(second, build_split_index(nusc, SPLIT, 10, CAMERAS, 1, 1))
    assert second.dataroot == str(dataroot)
    # the folder: one index and its lock file; its header records the parameters and every table's identity
    (saved,) = index_folders_of(folder)
    assert sorted(p.name for p in folder.iterdir()) == [saved.name, f"{saved.name}.lock"]
    metadata = json.loads((saved / "index.json").read_text())["metadata"]
    assert metadata["parameters"] | {"devkit": None} == {
        "dataroot": os.path.realpath(dataroot), "version": version, "split": SPLIT, "sweep_candidates": 10,
        "camera_channels": list(CAMERAS), "adjacent_count": 1, "adjacent_interval": 1, "source": "devkit",
        "infos_file": "", "devkit": None}
    tables = sorted((dataroot / version).glob("*.json"))
    assert len(tables) == 14  # the 13 devkit tables and splits.json
    assert metadata["sources"] == [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                                   for p in tables]


def test_the_dataset_reads_the_saved_index(root, builds):
    dataroot, version = root
    config = config_for(dataroot, version)
    datasets = [NuScenesDetectionDataset(config, SPLIT, "train") for _ in range(2)]
    assert builds == [SPLIT]
    assert all(isinstance(d.index.tokens, np.memmap) for d in datasets)
    # a devkit object given explicitly still builds in memory, as before
    in_memory = NuScenesDetectionDataset(config, SPLIT, "train", nusc=load_nuscenes(dataroot, version))
    assert builds == [SPLIT] and not isinstance(in_memory.index.tokens, np.memmap)
    a, b = datasets[0][1], in_memory[1]
    assert np.array_equal(a.points.numpy(), b.points.numpy()) and np.array_equal(a.gt_boxes, b.gt_boxes)


@pytest.mark.parametrize("change", ["mtime", "size", "new table"])
def test_a_changed_table_rebuilds_the_index(root, builds, caplog, change):
    dataroot, version = root
    config = config_for(dataroot, version)
    open_split_index(config, SPLIT)
    table = dataroot / version / "ego_pose.json"
    info = table.stat()
    if change == "mtime":  # same bytes, touched
        os.utime(table, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
        expected = f"ego_pose.json was modified (mtime_ns {info.st_mtime_ns} -> {info.st_mtime_ns + 1_000_000})"
    elif change == "size":
        table.write_text(table.read_text() + "\n")
        os.utime(table, ns=(info.st_atime_ns, info.st_mtime_ns))  # even with the old mtime
        expected = f"ego_pose.json changed size ({info.st_size} -> {info.st_size + 1} bytes)"
    else:
        (dataroot / version / "notes.json").write_text("[]")  # read by no one, but a source all the same
        expected = "notes.json was added"
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.data.index_store"):
        open_split_index(config, SPLIT)
    assert builds == [SPLIT, SPLIT]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"the one saved in {dataroot / '.distillbev' / 'index'} is stale: {expected}; building it" in line
    open_split_index(config, SPLIT)
    assert builds == [SPLIT, SPLIT]  # the rebuilt index is fresh
    assert len(index_folders_of(dataroot / ".distillbev" / "index")) == 1  # replaced in place


def test_a_stale_index_is_never_used(root):
    """An ego pose moved in the table shows in the next open's arrays."""
    dataroot, version = root
    config = config_for(dataroot, version, load_images=False)
    before = open_split_index(config, SPLIT)
    table = dataroot / version / "ego_pose.json"
    records = json.loads(table.read_text())
    key_pose = before.lidar.ego_pose[0].copy()  # w, x, y, z, tx, ty, tz of key frame 0's LiDAR record
    for record in records:
        if record["translation"] == key_pose[4:].tolist():
            record["translation"][0] += 7.0
    table.write_text(json.dumps(records))
    after = open_split_index(config, SPLIT)
    assert after.lidar.ego_pose[0, 4] == key_pose[4] + 7.0
    assert before.lidar.ego_pose[0, 4] == key_pose[4]  # the old map stays valid in the process that holds it


def test_other_parameters_get_another_folder(root, builds):
    dataroot, version = root
    open_split_index(config_for(dataroot, version), SPLIT)
    open_split_index(config_for(dataroot, version, sweep_candidates=5, num_sweeps=2), SPLIT)
    lidar_only = open_split_index(config_for(dataroot, version, load_images=False), SPLIT)
    open_split_index(config_for(dataroot, version, load_images=False), "tiny_train")
    # the adjacent interval does not matter without adjacent frames: the same folder as lidar_only
    open_split_index(config_for(dataroot, version, load_images=False, adjacent_interval=3), SPLIT)
    assert builds == [SPLIT, SPLIT, SPLIT, "tiny_train"]
    names = [p.name for p in index_folders_of(dataroot / ".distillbev" / "index")]
    assert len(names) == 4 and sorted(n.split(".")[-2] for n in names) == ["tiny_train"] + [SPLIT] * 3
    assert lidar_only.camera_channels == () and lidar_only.sweeps.files.shape[1] == 10


def test_a_damaged_or_half_written_index_is_rebuilt(root, builds, caplog):
    dataroot, version = root
    config = config_for(dataroot, version)
    open_split_index(config, SPLIT)
    (saved,) = index_folders_of(dataroot / ".distillbev" / "index")
    (saved / "sweeps.files.npy").unlink()
    leftover = saved.parent / f".{saved.name}.tmp-crashed"  # a build that died before its rename
    leftover.mkdir()
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.data.index_store"):
        index = open_split_index(config, SPLIT)
    assert builds == [SPLIT, SPLIT] and index.sweeps.files.shape == (2, 10)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "is damaged" in line and "sweeps.files.npy" in line
    assert not leftover.exists()


def _open_in_child(config: DataConfig, barrier, out: str) -> None:
    barrier.wait()  # every process opens at the same moment
    index = open_split_index(config, SPLIT)
    Path(out).write_text(json.dumps({"tokens": [index.token(i) for i in range(len(index))],
                                     "mapped": isinstance(index.tokens, np.memmap),
                                     "file": str(index.tokens.filename)}))


def test_processes_opening_at_once_build_once(root, tmp_path, monkeypatch):
    dataroot, version = root
    counter = tmp_path / "builds.txt"
    real = index_store.build_split_index

    def slow_counting(nusc, split, *args, **kwargs):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        import time

        time.sleep(1.0)  # long enough for every other process to reach the lock while this one builds
        return real(nusc, split, *args, **kwargs)

    monkeypatch.setattr(index_store, "build_split_index", slow_counting)  # inherited by the forked processes
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    config = config_for(dataroot, version)
    processes = [context.Process(target=_open_in_child, args=(config, barrier, str(tmp_path / f"out{k}.json")))
                 for k in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    assert len(counter.read_text().splitlines()) == 1
    results = [json.loads((tmp_path / f"out{k}.json").read_text()) for k in range(4)]
    assert all(r["mapped"] for r in results)
    assert len({r["file"] for r in results}) == 1
    assert all(r["tokens"] == results[0]["tokens"] for r in results) and len(results[0]["tokens"]) == 2


def test_a_read_only_dataroot_falls_back_to_the_user_cache(root, tmp_path, monkeypatch, builds):
    dataroot, version = root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = index_store._writable
    if os.geteuid() == 0:  # permission bits do not bind root: refuse the dataroot as a non-root user is refused
        monkeypatch.setattr(index_store, "_writable",
                            lambda folder: not Path(folder).is_relative_to(dataroot) and real(folder))
    dataroot.chmod(0o555)
    try:
        index = open_split_index(config_for(dataroot, version), SPLIT)
        again = open_split_index(config_for(dataroot, version), SPLIT)
    finally:
        dataroot.chmod(0o755)
    assert builds == [SPLIT]
    assert not (dataroot / ".distillbev").exists()
    cache = tmp_path / "cache" / "distillbev" / "index"
    (saved,) = index_folders_of(cache)
    assert Path(index.tokens.filename).parent == saved.resolve() == Path(again.tokens.filename).parent


def test_an_explicit_index_dir_is_used(root, tmp_path, builds):
    dataroot, version = root
    config = config_for(dataroot, version, index_dir=str(tmp_path / "indexes"))
    index = open_split_index(config, SPLIT)
    assert Path(index.tokens.filename).parent.parent == (tmp_path / "indexes").resolve()
    assert not (dataroot / ".distillbev").exists()
    if os.geteuid() != 0:  # an unwritable index_dir is an error naming it (root can write anywhere)
        (tmp_path / "locked").mkdir(mode=0o555)
        with pytest.raises(DataError, match="no writable folder .* set data.index_dir to a writable folder"):
            open_split_index(config_for(dataroot, version, index_dir=str(tmp_path / "locked" / "x")), SPLIT)


def test_a_missing_dataroot_is_a_data_error_and_creates_nothing(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: dataroot not found"):
        open_split_index(config_for(tmp_path / "nope", "v1.0-tiny"), SPLIT)
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------------------------- infos
@pytest.fixture
def infos(monkeypatch, tmp_path):
    """An infos folder holding nuscenes_infos_tiny_val.pkl, with `index_from_infos` replaced by the devkit build
    of the same split (the infos reader has its own tests); returns (folder, calls)."""
    from distillbev.pipeline.data import index_store as index_store_module

    folder = tmp_path / "infos"
    folder.mkdir()
    (folder / f"nuscenes_infos_{SPLIT}.pkl").write_bytes(b"not read by the stand-in")
    calls = []

    def from_infos(infos_path, dataroot, version, split, sweep_candidates, camera_channels=(), adjacent_count=0,
                   adjacent_interval=1, progress=True):
        calls.append((str(infos_path), split, sweep_candidates, tuple(camera_channels), adjacent_count))
        return build_split_index(load_nuscenes(dataroot, version), split, sweep_candidates, camera_channels,
                                 adjacent_count, adjacent_interval, progress=False)

    monkeypatch.setattr(index_store_module, "index_from_infos", from_infos)
    return folder, calls


def test_an_index_from_infos_records_the_infos_file(root, infos, builds, caplog):
    dataroot, version = root
    folder, calls = infos
    config = config_for(dataroot, version, infos=str(folder), load_previous_frame=False)
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.data.index_store"):
        index = open_split_index(config, SPLIT)
    pkl = folder / f"nuscenes_infos_{SPLIT}.pkl"
    assert calls == [(os.path.realpath(pkl), SPLIT, 10, CAMERAS, 0)] and builds == []
    assert f"building it from the infos file {os.path.realpath(pkl)} into" in caplog.records[0].getMessage()
    assert isinstance(index.boxes, np.memmap)
    open_split_index(config, SPLIT)
    assert len(calls) == 1
    (saved,) = index_folders_of(dataroot / ".distillbev" / "index")
    metadata = json.loads((saved / "index.json").read_text())["metadata"]
    assert metadata["parameters"]["source"] == "infos"
    assert metadata["sources"][-1] == {"path": os.path.realpath(pkl), "size": pkl.stat().st_size,
                                       "mtime_ns": pkl.stat().st_mtime_ns}
    # the devkit index of the same parameters is another folder; a rewritten infos file rebuilds
    open_split_index(dataclasses.replace(config, infos=""), SPLIT)
    assert builds == [SPLIT] and len(index_folders_of(dataroot / ".distillbev" / "index")) == 2
    pkl.write_bytes(b"rewritten by the converter")
    open_split_index(config, SPLIT)
    assert len(calls) == 2


def test_infos_errors_name_the_folder_or_file(root, tmp_path, infos):
    dataroot, version = root
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'}: infos folder not found .* --infos"):
        open_split_index(config_for(dataroot, version, infos=str(tmp_path / "missing")), SPLIT)
    folder, _ = infos
    with pytest.raises(DataError, match=f"{folder / 'nuscenes_infos_tiny_train.pkl'}: mmdet3d infos of split"):
        open_split_index(config_for(dataroot, version, infos=str(folder)), "tiny_train")


# ------------------------------------------------------------------------------------------- pre-flight
@pytest.mark.parametrize("num_sweeps", [9, 1])
def test_the_index_preflight_equals_the_devkit_preflight(tiny_slice_copy, num_sweeps):
    """`check_index_inputs` (extract-teacher --infos) reports the same problems, files, bytes and fingerprint as
    the devkit walk, for a missing key frame file and a truncated sweep."""
    from distillbev.pipeline.data.preflight import check_index_inputs, check_split_inputs

    first = tiny_slice_copy.sample_tokens[0]
    tiny_slice_copy.key_lidar_files[-1].unlink()
    sweep = next(path for path in tiny_slice_copy.lidar_files.values() if "1533151603497590" in path.name)  # -50 ms
    sweep.write_bytes(sweep.read_bytes()[:90])
    nusc = load_nuscenes(tiny_slice_copy.dataroot, tiny_slice_copy.version)
    expected = check_split_inputs(nusc, tiny_slice_copy.sample_tokens, num_sweeps, 10)
    found = check_index_inputs(build_split_index(nusc, SPLIT, 10), num_sweeps)
    assert found == expected
    assert len(found.problems) == 2 and str(tiny_slice_copy.key_lidar_files[-1]) in found.problems[-1]
    assert f"{sweep}: 90 bytes in sample {first}" in found.problems[0]
    with pytest.raises(ValueError, match="holds 2 sweep candidates, the fingerprint needs 9"):
        check_index_inputs(build_split_index(nusc, SPLIT, 2), 9)

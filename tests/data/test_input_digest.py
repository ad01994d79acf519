"""The digests of the input files, taken from the bytes the loader reads (pipeline/data/digest.py).

The expected SHA-256 values of the hand-made files below were computed with coreutils' `sha256sum`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.digest import InputDigests, extraction_input_files, file_digest, files_per_sample
from distillbev.pipeline.data.loading import read_points
from distillbev.pipeline.data.virtual_points import VirtualPoints, read_virtual_points, write_virtual_points

# two points, 5 float32 each: x, y, z, intensity, ring
TWO_POINTS = np.array([[1, 2, 3, 4, 0], [5, 6, 7, 8, 1]], dtype=np.float32)
TWO_POINTS_SHA256 = "75414840181ddec2b82c69518e899f2339ad856ba7672db79373097f941fd7b4"
SWAPPED_ROWS_SHA256 = "86b8117663d608f6f5b1ab724541e7f8cc7db8e8b328e8d3ceee0897cffde9aa"


def test_a_pcd_bin_read_with_digests_records_the_sha256_of_its_bytes(tmp_path):
    path = tmp_path / "a.pcd.bin"
    TWO_POINTS.tofile(path)
    digests = InputDigests()
    points = read_points(path, "sample-a", digests)
    assert np.array_equal(points, TWO_POINTS) and points.flags.writeable
    assert digests.paths == [str(path)] and digests.sizes == [40]
    assert digests.digests[0].hex() == TWO_POINTS_SHA256
    assert file_digest(path) == (bytes.fromhex(TWO_POINTS_SHA256), 40)


def test_the_same_rows_in_another_order_give_another_digest_at_the_same_size(tmp_path):
    path = tmp_path / "a.pcd.bin"
    TWO_POINTS[::-1].copy().tofile(path)
    digests = InputDigests()
    read_points(path, "sample-a", digests)
    assert digests.sizes == [40] and digests.digests[0].hex() == SWAPPED_ROWS_SHA256


def test_rows_are_one_per_file_in_read_order_padded_with_zeros():
    digests = InputDigests()
    digests.add("first", b"abc")
    digests.add("second", memoryview(b""))
    rows = digests.rows(3)
    assert rows.shape == (3, 32) and rows.dtype == np.uint8
    # sha256("abc") and sha256(""), the FIPS 180-2 test values
    assert rows[0].tobytes().hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert rows[1].tobytes().hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert not rows[2].any()
    with pytest.raises(ValueError, match="2 input files read, at most 1 expected"):
        digests.rows(1)
    assert files_per_sample(2, virtual=False) == 3 and files_per_sample(2, virtual=True) == 6


def test_the_loader_records_each_file_it_reads_in_the_order_extraction_input_files_lists(tiny_slice):
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, train_split="tiny_train",
                        val_split="tiny_val", load_images=False, num_sweeps=2)
    dataset = NuScenesDetectionDataset(config, "tiny_val", "test")
    digests = InputDigests()
    dataset.get(1, digests=digests)
    files = extraction_input_files(dataset.index, 1, num_sweeps=2, virtual=False)
    # key frame 1, then its two nearest previous LIDAR_TOP records: the 250 ms sweep and key frame 0
    assert digests.paths == files and len(files) == 3
    assert files[0].endswith(tiny_slice.key_lidar_files[1].name) and files[2].endswith(
        tiny_slice.key_lidar_files[0].name)
    with open(files[2], "rb") as handle:
        assert digests.digests[2] == hashlib.sha256(handle.read()).digest()
    assert extraction_input_files(dataset.index, 1, num_sweeps=1, virtual=True) == [
        files[0], files[0].replace("/samples/LIDAR_TOP/", "/samples/LIDAR_TOP_VIRTUAL/") + ".pkl.npy",
        files[1], files[1].replace("/sweeps/LIDAR_TOP/", "/sweeps/LIDAR_TOP_VIRTUAL/") + ".pkl.npy"]


def test_a_virtual_point_file_is_hashed_from_the_one_read_that_parses_it(tmp_path):
    path = tmp_path / "LIDAR_TOP_VIRTUAL" / "a.pcd.bin.pkl.npy"
    points = VirtualPoints(np.ones((2, 14), np.float32), np.full((1, 15), 2.0, np.float32), np.array([0]))
    write_virtual_points(path, points)
    digests = InputDigests()
    read = read_virtual_points(path, "sd-a", digests)
    assert np.array_equal(read.virtual, points.virtual) and np.array_equal(read.real_indices, [0])
    assert digests.paths == [str(path)] and digests.digests[0] == hashlib.sha256(path.read_bytes()).digest()

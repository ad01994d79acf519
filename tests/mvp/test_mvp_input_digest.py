"""An MVP teacher's store records the SHA-256 of the virtual-point files beside the LiDAR files, and a virtual-point
file rewritten with the same size is caught by the train-student verification."""

from __future__ import annotations

import hashlib

import pytest
import zarr

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.input_digest import verify_input_files
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.digest import extraction_input_files
from distillbev.pipeline.data.virtual_points import read_virtual_points, write_virtual_points
from distillbev.pipeline.errors import DataError

from test_mvp_extract import SPLIT, _extract, mvp_files  # noqa: F401  (mvp_files is a fixture)


@pytest.mark.slow
def test_virtual_point_files_are_recorded_and_verified_like_lidar_files(mvp_files, tmp_path) -> None:
    root, config_path, checkpoint = mvp_files
    store = tmp_path / "mvp.zarr"
    result = _extract(root, config_path, checkpoint, store)
    assert result.exit_code == 0, result.output + repr(result.exception)
    dataset = NuScenesDetectionDataset(DataConfig(dataroot=str(root), version="v1.0-synthetic", num_sweeps=2,
                                                  sweep_candidates=2, load_images=False), SPLIT, "test")
    digests = zarr.open_group(str(store), mode="r")[v2.INPUT_DIGEST][...]
    assert digests.shape == (len(dataset), 6, 32)  # (key frame + 2 sweeps) x (LiDAR, virtual points)
    files = extraction_input_files(dataset.index, 1, num_sweeps=2, virtual=True)
    assert files[1].endswith(".pkl.npy") and len(files) == 6
    for row, path in enumerate(files):
        with open(path, "rb") as handle:
            assert digests[1, row].tobytes() == hashlib.sha256(handle.read()).digest()

    cache = TeacherCache.open(store)
    location = StoreLocation.parse(store)
    report = verify_input_files(location, cache.manifest, cache.sample_tokens, dataset, "all", progress=False)
    assert (report.samples, report.files) == (len(dataset), len({f for i in range(len(dataset)) for f in
                                                                  extraction_input_files(dataset.index, i, 2, True)}))
    with open(files[1], "rb") as handle:
        before = handle.read()
    virtual = read_virtual_points(files[1])
    virtual.virtual[:, -1] *= 0.5  # the segmenter's scores rescaled: same shapes, same file size
    write_virtual_points(files[1], virtual)
    with open(files[1], "rb") as handle:
        after = handle.read()
    assert len(after) == len(before) and after != before
    with pytest.raises(DataError) as error:
        verify_input_files(location, cache.manifest, cache.sample_tokens, dataset, "all", progress=False)
    assert f"sample {cache.sample_tokens[1]}: {files[1]}" in str(error.value)

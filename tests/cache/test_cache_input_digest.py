"""Identity by content: a store records the SHA-256 of every input file a sample was extracted from, and a resume
refuses to extract a sample from other bytes, even when names and sizes are unchanged (a same-size edit)."""

from __future__ import annotations

import hashlib
import logging
import shutil

import numpy as np
import pytest
import torch
import zarr
from cache_fakes import FilePoints, chunk_files, run_extract
from click.testing import CliRunner
from module_loader import load_tests_module

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.errors import CacheError


def permute_rows(path) -> None:
    """Write a .pcd.bin's points back in reverse order: the same size and the same points, other bytes."""
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    size = path.stat().st_size
    points[::-1].copy().tofile(path)
    assert path.stat().st_size == size and path.read_bytes() != points.tobytes()


def interrupted_at_sample_2(path, manifest, files: FilePoints) -> None:
    """A partial store: samples 0 and 1 done, sample 2 view 0 done, then the run fails reading view 1."""

    def failing(index, bev_aug):
        if index == 2 and not bev_aug.is_identity:  # view 0 is the identity
            raise RuntimeError("the run is interrupted")
        return files(index, bev_aug)

    with pytest.raises(RuntimeError, match="interrupted"):
        run_extract(path, manifest, points=failing, workers=1, threads_per_worker=1)
    assert read_done(path)[2].tolist() == [True, False, False]


def test_a_resume_refuses_a_sample_whose_pcd_bin_was_rewritten_with_the_same_size(tmp_path, manifest):
    files = FilePoints(tmp_path / "lidar")
    path = tmp_path / "cache.zarr"
    interrupted_at_sample_2(path, manifest, files)
    permute_rows(files.path(2))
    before = chunk_files(path)
    with pytest.raises(CacheError) as error:
        run_extract(path, manifest, points=files, workers=1, threads_per_worker=1)
    message = str(error.value)
    assert "sample token-002 (index 2) was read from other bytes" in message
    assert str(files.path(2)) in message and "--overwrite" in message and "new --cache" in message
    assert chunk_files(path) == before  # nothing of the refused sample-view was written
    assert read_done(path)[2].tolist() == [True, False, False]


def test_a_resume_over_unchanged_files_ends_as_a_clean_run_with_each_files_sha256(tmp_path, manifest):
    files = FilePoints(tmp_path / "lidar")
    clean = tmp_path / "clean.zarr"
    run_extract(clean, manifest, points=files, workers=1, threads_per_worker=1)
    path = tmp_path / "cache.zarr"
    interrupted_at_sample_2(path, manifest, files)
    report = run_extract(path, manifest, points=files, workers=1, threads_per_worker=1)
    assert (report.skipped, report.written) == (7, 8)
    assert chunk_files(path) == chunk_files(clean)
    digests = zarr.open_group(str(path), mode="r")[v2.INPUT_DIGEST][...]
    assert digests.shape == (5, 2, 32)  # key frame + 1 sweep per sample (the fake manifest's num_sweeps)
    for index in range(5):
        assert digests[index, 0].tobytes() == hashlib.sha256(files.path(index).read_bytes()).digest()
        assert not digests[index, 1].any()  # the fake loader reads one file


def test_a_store_without_input_digests_resumes_saying_its_inputs_are_unchecked(tmp_path, manifest, caplog):
    files = FilePoints(tmp_path / "lidar")
    path = tmp_path / "cache.zarr"
    interrupted_at_sample_2(path, manifest, files)
    shutil.rmtree(path / v2.INPUT_DIGEST)  # a store created before the array existed
    permute_rows(files.path(2))
    with caplog.at_level(logging.WARNING):
        report = run_extract(path, manifest, points=files, workers=1, threads_per_worker=1)
    assert report.status == v2.STATUS_COMPLETE
    assert "no input_digest array: the files read are not checked" in caplog.text


# ------------------------------------------------------------------------------------ the extract-teacher stage
@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    folder = tmp_path_factory.mktemp("teacher")
    config_path = folder / "teacher.yaml"
    config_path.write_text(load_tests_module("cache/test_cache_stage.py").CONFIG)
    torch.manual_seed(0)
    checkpoint = folder / "teacher.pth"
    torch.save(CenterPointTeacher(load_config(TeacherExperimentConfig, config_path).model).state_dict(), checkpoint)
    return config_path, checkpoint


@pytest.mark.slow
def test_extract_teacher_refuses_to_resume_over_a_rows_permuted_key_frame(tmp_path, tiny_slice_copy, teacher_files,
                                                                          monkeypatch):
    from distillbev.stages.extract_teacher import command

    config_path, checkpoint = teacher_files
    argv = ["--config", str(config_path), "--dataroot", str(tiny_slice_copy.dataroot), "--checkpoint",
            str(checkpoint), "--cache", str(tmp_path / "cache.zarr"), "--split", "tiny_train", "--views", "2"]
    get = NuScenesDetectionDataset.get
    calls = []

    def interrupted_get(self, index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 2:  # sample 0 view 1: view 0 is written, then the run stops
            raise RuntimeError("the run is interrupted")
        return get(self, index, *args, **kwargs)

    monkeypatch.setattr(NuScenesDetectionDataset, "get", interrupted_get)
    first = CliRunner().invoke(command, argv)
    assert isinstance(first.exception, RuntimeError) and read_done(tmp_path / "cache.zarr")[0].tolist() == [1, 0]
    monkeypatch.setattr(NuScenesDetectionDataset, "get", get)
    key_frame = tiny_slice_copy.key_lidar_files[0]
    permute_rows(key_frame)
    refused = CliRunner().invoke(command, argv)
    assert isinstance(refused.exception, CacheError), refused.output
    message = str(refused.exception)
    assert f"sample {tiny_slice_copy.sample_tokens[0]} (index 0) was read from other bytes" in message
    assert key_frame.name in message and "--overwrite" in message
    assert read_done(tmp_path / "cache.zarr")[0].tolist() == [1, 0]

"""User-facing failures: non-finite teacher outputs, unwritable paths, a full disk; none marks the store complete."""

from __future__ import annotations

import errno

import pytest
import torch
import zarr
from cache_fakes import FakeTeacher, run_extract

from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.errors import CacheError


class NaNTeacher(FakeTeacher):
    """Puts a NaN (or `value`) into backbone2 of every batch that contains one of `bad_clouds`."""

    def __init__(self, bad_clouds: list[torch.Tensor], value: float = float("nan")) -> None:
        super().__init__()
        self.bad_clouds = bad_clouds
        self.value = value

    def __call__(self, points_list):
        outputs = super().__call__(points_list)
        for b, points in enumerate(points_list):
            if any(points.shape == bad.shape and torch.equal(points, bad) for bad in self.bad_clouds):
                outputs.features["backbone2"][b, 3, 1, 2] = self.value
        return outputs


@pytest.mark.parametrize("background_writer", [True, False])
def test_nan_output_names_sample_view_and_layer(tmp_path, manifest, background_writer):
    from cache_fakes import load_points
    from distillbev.pipeline.cache.manifest import ViewConfig, view_augmentations

    views = ViewConfig.from_json(manifest["views"])
    bad = [load_points(3, view_augmentations(views, 3)[1])[1]]
    path = tmp_path / "cache.zarr"
    with pytest.raises(CacheError, match=r"'backbone2' of sample token-003 \(index 3, view 1\) has 1 NaN/Inf"):
        run_extract(path, manifest, teacher=NaNTeacher(bad), background_writer=background_writer)
    done = read_done(path)
    assert done[:3].all() and done[3, 0] and not done[3, 1] and not done[4].any()
    assert zarr.open_group(str(path), mode="r").attrs["status"] == "writing"


def test_nan_in_a_worker_process_is_reported(tmp_path, manifest):
    from cache_fakes import load_points
    from distillbev.pipeline.cache.manifest import ViewConfig, view_augmentations

    bad = [load_points(4, view_augmentations(ViewConfig.from_json(manifest["views"]), 4)[0])[1]]
    path = tmp_path / "cache.zarr"
    with pytest.raises(CacheError, match=r"sample token-004 \(index 4, view 0\)"):
        run_extract(path, manifest, teacher=NaNTeacher(bad), workers=2)
    assert not read_done(path)[4, 0]
    assert zarr.open_group(str(path), mode="r").attrs["status"] == "writing"


@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_output_is_refused_like_a_nan(tmp_path, manifest, value):
    from cache_fakes import load_points
    from distillbev.pipeline.cache.manifest import ViewConfig, view_augmentations

    bad = [load_points(2, view_augmentations(ViewConfig.from_json(manifest["views"]), 2)[0])[1]]
    with pytest.raises(CacheError, match=r"'backbone2' of sample token-002 \(index 2, view 0\) has 1 NaN/Inf"):
        run_extract(tmp_path / "cache.zarr", manifest, teacher=NaNTeacher(bad, value))


def test_unwritable_path_is_a_cache_error(tmp_path, manifest):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match=r"a_file/cache.zarr: cannot write the teacher cache .*--cache"):
        run_extract(blocker / "cache.zarr", manifest)


def test_disk_full_during_writes_keeps_status_writing(tmp_path, manifest, monkeypatch):
    from distillbev.pipeline.cache import writer

    original = writer.write_local_chunk  # the writer's one way to a chunk file of a local store
    calls = {"n": 0}

    def filling_write(path, raw, fsync):
        if "/c/" in str(path) and "features" in str(path):
            calls["n"] += 1
            if calls["n"] > 10:  # the disk fills up part-way through the run
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, raw, fsync)

    monkeypatch.setattr(writer, "write_local_chunk", filling_write)
    path = tmp_path / "cache.zarr"
    with pytest.raises(CacheError, match=r"cache.zarr: cannot write .*No space left.*free disk space"):
        run_extract(path, manifest)
    monkeypatch.setattr(writer, "write_local_chunk", original)
    assert zarr.open_group(str(path), mode="r").attrs["status"] == "writing"
    done = read_done(path)
    assert 0 < done.sum() < done.size
    report = run_extract(path, manifest)  # space freed: the same command finishes the store
    assert report.status == "complete" and report.skipped == int(done.sum())


def test_dataset_order_change_is_refused(tmp_path, manifest):
    from cache_fakes import load_points

    def shuffled(index, bev_aug):
        return load_points((index + 1) % 5, bev_aug)

    with pytest.raises(CacheError, match="sample 0 of the dataset is 'token-001' but the store expects 'token-000'"):
        run_extract(tmp_path / "cache.zarr", manifest, points=shuffled)


def test_fp16_overflow_is_refused(tmp_path, manifest):
    class HugeTeacher(FakeTeacher):
        def __call__(self, points_list):
            outputs = super().__call__(points_list)
            outputs.features["neck"] = outputs.features["neck"] * 1e6
            return outputs

    with pytest.raises(CacheError, match="exceeds the float16 range.*--dtype int8"):
        run_extract(tmp_path / "cache.zarr", manifest, teacher=HugeTeacher())


def test_foreign_folder_is_never_deleted(tmp_path, manifest):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="exists and is not a teacher cache"):
        run_extract(folder, manifest, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_extract(empty, manifest).status == "complete"  # an empty folder is fine

"""TeacherCache: refuses missing/partial/foreign stores, explains incompatibilities, works in DataLoader workers."""

from __future__ import annotations

import pickle

import pytest
import torch
import zarr
from cache_fakes import load_points, run_extract

from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.errors import CacheError


@pytest.fixture
def store(tmp_path, manifest):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest)
    return path


def test_missing_store(tmp_path):
    with pytest.raises(CacheError, match="no teacher cache at this path.*extract-teacher"):
        TeacherCache.open(tmp_path / "nothing.zarr")


def test_wrong_schema_version(store):
    zarr.open_group(str(store), mode="r+").attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99, this code reads versions 2 and 3"):
        TeacherCache.open(store)


def test_partial_store_refused_unless_allowed(tmp_path, manifest):
    def failing(index, bev_aug):
        if index == 2:
            raise RuntimeError("stop")
        return load_points(index, bev_aug)

    path = tmp_path / "partial.zarr"
    with pytest.raises(RuntimeError):
        run_extract(path, manifest, points=failing)
    with pytest.raises(CacheError, match=r"partial \(status 'writing', 6 of 15 sample-views done\)"):
        TeacherCache.open(path)
    cache = TeacherCache.open(path, allow_partial=True)
    assert cache.read(1, 2).sample_token == "token-001"
    with pytest.raises(CacheError, match=r"sample-view \(3, 0\) is not extracted yet"):
        cache.read(3, 0)


def test_check_compatible_lists_a_readable_diff(store):
    cache = TeacherCache.open(store)
    cache.check_compatible({"layers": {"neck": {"channels": 12, "shape": [8, 8]}}, "bev_grid": {"resolution": 1.0}})
    with pytest.raises(CacheError) as error:
        cache.check_compatible({"layers": {"neck": {"channels": 384, "shape": [128, 128]}, "head": {"channels": 1}},
                                "bev_grid": {"resolution": 0.2}, "teacher": {"checkpoint_sha256": "b" * 64}})
    message = str(error.value)
    for line in ["layers.neck.channels: 12 -> 384", "layers.neck.shape: [8, 8] -> [128, 128]",
                 "layers.head.channels: <missing> -> 1", "bev_grid.resolution: 1.0 -> 0.2",
                 "teacher.checkpoint_sha256:"]:
        assert line in message


def test_index_of_unknown_token(store):
    with pytest.raises(CacheError, match="'nope' is not in the cache"):
        TeacherCache.open(store).index_of("nope")


def test_pickled_cache_reopens_lazily(store):
    cache = TeacherCache.open(store)
    assert cache._arrays is None  # open() validates but holds no zarr handles
    first = cache.read(1, 1)
    assert cache._arrays is not None
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._arrays is None
    second = clone.read(1, 1)
    assert all(torch.equal(first.features[k], second.features[k]) for k in first.features)


class _Views(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.cache.read(index, index % 3).features["neck"]


def test_reads_in_forked_dataloader_workers(store):
    cache = TeacherCache.open(store)
    cache.read(0, 0)  # the parent has open handles before the workers fork
    loader = torch.utils.data.DataLoader(_Views(cache), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    batches = list(loader)
    assert torch.equal(torch.cat(batches), torch.stack([cache.read(i, i % 3).features["neck"] for i in range(4)]))


def test_sequential_and_concurrent_reads_agree(store):
    a = TeacherCache.open(store, concurrent_reads=True).read(4, 2)
    b = TeacherCache.open(store, concurrent_reads=False).read(4, 2)
    assert torch.equal(a.heatmap, b.heatmap) and torch.equal(a.occupancy, b.occupancy)
    assert all(torch.equal(a.attention[k], b.attention[k]) for k in a.attention)


def test_reading_some_layers_reads_only_their_chunks(store, monkeypatch):
    cache = TeacherCache.open(store)
    whole = cache.read(4, 2)
    assert sorted(whole.features) == ["backbone1", "backbone2", "neck"]
    asked = []
    read_chunk = cache._read_chunk
    monkeypatch.setattr(cache, "_read_chunk", lambda name, *where: asked.append(name) or read_chunk(name, *where))
    part = cache.read(4, 2, layers=["neck"])
    assert sorted(part.features) == sorted(part.attention) == ["neck"]
    assert torch.equal(part.features["neck"], whole.features["neck"])
    assert torch.equal(part.attention["neck"], whole.attention["neck"])
    assert torch.equal(part.heatmap, whole.heatmap) and torch.equal(part.occupancy, whole.occupancy)
    # an fp16 store; the done marker is read too, to check that those chunks are this sample-view's
    assert sorted(asked) == ["attention/neck", "done", "features/neck", "heatmap", "occupancy"]
    with pytest.raises(CacheError, match=r"layers \['head'\] are not cached; it holds \['backbone1', 'backbone2', "
                                         r"'neck'\]"):
        cache.read(4, 2, layers=["neck", "head"])

"""Chunks bound to their place: a done marker is a digest of the store's identity, the sample-view and the CRC32C
of each of its chunks, so a valid chunk at the wrong key (copied over another sample-view, another view's int8
scale, a store merged from two) is refused on read, by `inspect-cache --verify` and by a resume or repair, which
then end byte-identical to a clean extraction. A schema-2 store (bare markers) stays readable, with one warning.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from cache_fakes import FakeTeacher, chunk_files, make_manifest, run_extract, token_of

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.checks import damaged_sample_views, sample_view_array_names
from distillbev.pipeline.cache.chunks import chunk_coords, decode_chunk, get_chunk_bytes
from distillbev.pipeline.cache.inspect.verify import verify_cache
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.state import read_done, read_manifest
from distillbev.pipeline.cache.writer import set_done, write_done
from distillbev.pipeline.errors import CacheError


def chunk(path: Path, array: str, sample: int, view: int) -> Path:
    ndim = zarr.open_array(str(path / array), mode="r").ndim
    return path.joinpath(array, "c", str(sample), str(view), *["0"] * (ndim - 2))


def copy_chunk(path: Path, array: str, source: tuple[int, int], target: tuple[int, int],
               source_store: Path | None = None) -> None:
    """Copy one whole chunk file (its CRC32C valid) over another key, as a hand merge or a stray write would."""
    data = chunk(source_store or path, array, *source).read_bytes()
    assert data != chunk(path, array, *target).read_bytes()  # otherwise the copy would change nothing
    chunk(path, array, *target).write_bytes(data)


def every_array(manifest: dict) -> list[str]:
    return [*sample_view_array_names(manifest), v2.DONE]


# ------------------------------------------------------------------------------------------------ the marker
def test_a_marker_is_a_digest_of_the_store_the_sample_view_and_every_chunk_crc(complete, manifest):
    """The marker's layout, recomputed by hand: SHA-256 over a domain tag, the store id and everything after the
    digest (store tag, sample, view, the chunks' CRC32C in sorted array order)."""
    from distillbev.pipeline.cache.manifest import store_identity

    stored = read_manifest(complete)
    assert stored["schema_version"] == v2.SCHEMA_VERSION == 3
    assert stored["store_id"] == store_identity(stored) and len(stored["store_id"]) == 64
    done = zarr.open_array(str(complete / v2.DONE), mode="r")
    names = sorted(sample_view_array_names(stored))
    assert done.shape == (5, 3, 48 + 4 * len(names)) and done.chunks == (1, 1, 48 + 4 * len(names))
    marker = bytes(decode_chunk(done, get_chunk_bytes(done, chunk_coords(done, 2, 1)))[0, 0])
    crcs = b"".join(chunk(complete, name, 2, 1).read_bytes()[-4:] for name in names)
    body = bytes.fromhex(stored["store_id"])[:8] + (2).to_bytes(4, "little") + (1).to_bytes(4, "little") + crcs
    assert marker[32:] == body
    assert marker[:32] == hashlib.sha256(b"distillbev done marker\0" + bytes.fromhex(stored["store_id"])
                                         + body).digest()


def test_the_store_id_follows_the_identity_not_the_run(manifest, teacher):
    """Two extractions of the same identity get the same id (so a repair equals a clean run byte for byte); another
    checkpoint, another view seed give another; volatile keys change nothing."""
    from distillbev.pipeline.cache.manifest import store_identity

    same = make_manifest(teacher)
    assert store_identity(same) == store_identity(manifest)
    moved = {**manifest, "created_at": "then", "generation": "other",
             "teacher": {**manifest["teacher"], "checkpoint_path": "/elsewhere.pth"}}
    assert store_identity(moved) == store_identity(manifest)
    assert store_identity(make_manifest(teacher, sha="b" * 64)) != store_identity(manifest)
    assert store_identity(make_manifest(teacher, seed=8)) != store_identity(manifest)


def test_clean_store_reads_as_before(complete, manifest):
    cache = TeacherCache.open(complete)
    group = zarr.open_group(str(complete), mode="r")
    assert read_done(complete).all()
    for sample in range(5):
        for view in range(3):
            targets = cache.read(sample, view)
            assert targets.sample_token == token_of(sample)
            assert np.array_equal(targets.features["neck"].numpy(),
                                  group["features/neck"][sample, view].astype(np.float32))
            assert np.array_equal(targets.occupancy.numpy(), group["occupancy"][sample, view])
            assert set(cache.read(sample, view, layers=["backbone1"]).features) == {"backbone1"}
    assert verify_cache(complete, progress=False).ok


# ------------------------------------------------------------------------------------------ refused on read
def test_a_chunk_copied_over_another_samples_key_is_refused_on_read(complete):
    copy_chunk(complete, "features/neck", (1, 0), (2, 0))
    cache = TeacherCache.open(complete)
    with pytest.raises(CacheError) as caught:
        cache.read(2, 0)
    message = str(caught.value)
    assert "sample token-002 (index 2) view 0, features/neck" in message
    assert "not the chunk written for this sample-view" in message and "--repair" in message
    with pytest.raises(CacheError, match="features/neck"):
        cache.read(2, 0, layers=["neck"])
    assert set(cache.read(2, 0, layers=["backbone1"]).features) == {"backbone1"}  # the neck chunk is not read
    cache.read(1, 0)  # the source is untouched
    cache.read(2, 1)


def test_an_int8_scale_from_another_view_is_refused(tmp_path, teacher):
    path = tmp_path / "int8.zarr"
    run_extract(path, make_manifest(teacher, dtype="int8"), workers=1, threads_per_worker=1)
    copy_chunk(path, v2.feature_scale_array("neck"), (2, 1), (2, 0))
    cache = TeacherCache.open(path)
    for dequantize in (True, False):
        with pytest.raises(CacheError, match=r"sample token-002 \(index 2\) view 0, features/neck_scale: .*not the "
                                             r"chunk written for this sample-view"):
            cache.read(2, 0, dequantize=dequantize)
    cache.read(2, 1)


def test_a_store_merged_from_two_stores_is_refused(tmp_path, teacher, manifest, complete, reference):
    """Sample 2 of another checkpoint's store (same layout) copied in, markers and all: every chunk is valid and
    agrees with its marker, but the marker names the other store."""
    other = tmp_path / "other.zarr"
    run_extract(other, make_manifest(teacher, sha="b" * 64), workers=1, threads_per_worker=1)
    for name in every_array(manifest):
        for view in range(3):
            shutil.copyfile(chunk(other, name, 2, view), chunk(complete, name, 2, view))
    cache = TeacherCache.open(complete)
    for view in range(3):
        with pytest.raises(CacheError, match=rf"sample token-002 \(index 2\) view {view}, done: .*another store"):
            cache.read(2, view)
    assert read_manifest(other)["store_id"] != read_manifest(complete)["store_id"]
    cache.read(1, 0)
    problems = {(p.sample_token, p.view, p.array) for p in verify_cache(complete, progress=False).problems}
    assert problems == {(token_of(2), view, v2.DONE) for view in range(3)}
    report = run_extract(complete, manifest, repair=True, workers=1, threads_per_worker=1)
    assert (report.state, sorted(report.redone)) == ("repaired", [(2, 0), (2, 1), (2, 2)])
    assert chunk_files(complete) == reference


def test_a_sample_view_moved_with_its_marker_is_refused(complete, manifest):
    """All of sample-view (1, 0), marker included, copied over (2, 0): the marker says where it was written."""
    for name in every_array(manifest):
        shutil.copyfile(chunk(complete, name, 1, 0), chunk(complete, name, 2, 0))
    with pytest.raises(CacheError, match=r"view 0, done: .*written for sample token-001 \(index 1\) view 0"):
        TeacherCache.open(complete).read(2, 0)


def test_a_cleared_marker_in_a_complete_store_is_refused_on_read(complete):
    set_done(complete, [(3, 2)], 0)
    with pytest.raises(CacheError, match=r"sample token-003 \(index 3\) view 2, done: .*not set.*--repair"):
        TeacherCache.open(complete).read(3, 2)


# ---------------------------------------------------------------------------------- checks, resume, repair
def test_the_full_check_and_verify_name_a_chunk_at_the_wrong_key(complete, manifest):
    copy_chunk(complete, "attention/backbone2", (0, 2), (4, 1))
    group = zarr.open_group(str(complete), mode="r")
    views = [(s, v) for s in range(5) for v in range(3)]
    assert damaged_sample_views(group, manifest, views, full=False) == {}  # the quick check reads no bytes
    damage = damaged_sample_views(group, manifest, views, full=True)
    assert list(damage) == [(4, 1)] and [name for name, _ in damage[(4, 1)]] == ["attention/backbone2"]
    report = verify_cache(complete, progress=False)
    assert [(p.sample_token, p.view, p.array) for p in report.problems] == [(token_of(4), 1, "attention/backbone2")]
    assert "not the chunk written for this sample-view" in report.problems[0].message


def test_repair_rewrites_a_chunk_at_the_wrong_key_byte_identical(complete, manifest, reference):
    copy_chunk(complete, "features/neck", (1, 0), (2, 0))
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert report.state == "complete"  # a plain rerun checks sizes only
    report = run_extract(complete, manifest, repair=True, workers=1, threads_per_worker=1)
    assert (report.state, report.redone, report.written) == ("repaired", [(2, 0)], 1)
    assert chunk_files(complete) == reference
    TeacherCache.open(complete).read(2, 0)


def test_resume_redoes_a_done_sample_view_whose_chunk_was_swapped(complete, manifest, reference):
    zarr.open_group(str(complete), mode="r+").attrs["status"] = v2.STATUS_WRITING
    copy_chunk(complete, v2.HEATMAP, (3, 1), (0, 1))
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert (report.state, report.redone, report.written) == ("resumed", [(0, 1)], 1)
    assert chunk_files(complete) == reference


def test_not_done_markers_are_zero_and_only_the_writer_sets_one(complete):
    done = zarr.open_group(str(complete), mode="r+")[v2.DONE]
    set_done(complete, [(0, 0), (4, 2)], 0)
    assert not done[0, 0].any() and not done[4, 2].any() and done[0, 1].any()
    assert read_done(complete).sum() == 13 and not read_done(complete, [4])[0, 2]
    with pytest.raises(ValueError, match="SampleViewWriter"):
        write_done(done, [(0, 0)], 1)


# --------------------------------------------------------------------------------------- schema-2 stores
def as_schema_2(path: Path) -> None:
    """Turn a store into what schema 2 wrote: bare uint8 markers (S, V), no store id."""
    group = zarr.open_group(str(path), mode="r+")
    old = group[v2.DONE]
    markers = np.asarray(old[...])
    markers = (markers.any(axis=-1) if markers.ndim == 3 else markers).astype(np.uint8)
    group.create_array(v2.DONE, shape=markers.shape, chunks=(1, 1), dtype="uint8", fill_value=0,
                       dimension_names=("sample", "view"), serializer=old.serializer, compressors=old.compressors,
                       config={"write_empty_chunks": True}, overwrite=True)[...] = markers
    attributes = dict(group.attrs)
    attributes.pop("store_id", None)
    attributes["schema_version"] = 2
    group.attrs.put(attributes)


def test_a_schema_2_store_reads_unbound_with_one_warning(complete, manifest, caplog):
    as_schema_2(complete)
    assert read_done(complete).all()
    with caplog.at_level(logging.WARNING):
        cache = TeacherCache.open(complete)
        for sample in range(5):
            cache.read(sample, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "schema 2" in warnings[0] and "not bound" in warnings[0]
    assert verify_cache(complete, progress=False).ok
    before = chunk_files(complete)
    with pytest.raises(CacheError, match=r"schema_version: 2 -> 3.*--overwrite"):
        run_extract(complete, manifest)
    assert chunk_files(complete) == before
    zarr.open_group(str(complete), mode="r+").attrs["status"] = v2.STATUS_WRITING
    set_done(complete, [(1, 2)], 0)
    with pytest.raises(CacheError, match=r"sample-view \(1, 2\) is not extracted yet"):
        TeacherCache.open(complete, allow_partial=True).read(1, 2)


def test_rank_check_still_compares_identity_not_store_id(manifest, teacher):
    """store_id is derived: two ranks with the same inputs agree; the diff names the input, not the id."""
    from distillbev.pipeline.cache.manifest import manifest_diff

    other = make_manifest(FakeTeacher(), sha="c" * 64)
    assert manifest_diff(manifest, make_manifest(teacher)) == []
    assert [line.split(":")[0] for line in manifest_diff(manifest, other)] == ["teacher.checkpoint_sha256"]

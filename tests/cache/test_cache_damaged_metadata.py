"""Damage is never a reason to delete: a store whose metadata cannot be read is refused, with nothing changed.

A root `zarr.json` that is missing, empty, not JSON or not a group's metadata, in a store that holds any array or
chunk, is refused with the repair commands (restore the file, or --overwrite); so is a valid root without a manifest
in a store that holds extracted chunks, and a damaged `zarr.json` of any array. Only a store with nothing in it but
the marker, the lock and an empty or partial root `zarr.json` (its creation interrupted before any array) is rebuilt
by the same command, silently. "Unchanged" is checked file by file: bytes, inode and modification time, since a
store deleted and extracted again would hold the same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from cache_fakes import FakeTeacher, chunk_files, run_extract, store_chunks

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.errors import CacheError

TOTAL = 15  # 5 samples x 3 views


def snapshot(path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file of a store but the lock -> (bytes, inode, mtime in ns)."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != v2.LOCK_FILE}


def refused_unchanged(path: Path, manifest: dict, match: str, **kwargs) -> CacheError:
    """Run the same extraction on `path`: it must raise a CacheError matching `match`, call no teacher, and leave
    every file as it was."""
    before = snapshot(path)
    teacher = FakeTeacher()
    with pytest.raises(CacheError, match=match) as raised:
        run_extract(path, manifest, teacher=teacher, **kwargs)
    assert teacher.calls == 0
    assert snapshot(path) == before
    return raised.value


# ---------------------------------------------------------------------------------------- the root zarr.json
def test_a_brace_written_into_a_complete_stores_zarr_json_refuses_the_rerun_and_changes_nothing(complete, manifest):
    chunks = chunk_files(complete)
    assert len(chunks) > TOTAL
    (complete / "zarr.json").write_text("{")
    error = refused_unchanged(complete, manifest, r"cache.zarr/zarr.json.* is not valid JSON .*nothing was changed")
    text = str(error)
    assert "restore zarr.json from a copy of the store" in text and "--overwrite" in text
    assert chunk_files(complete) == chunks


@pytest.mark.parametrize("damage, problem", [
    ("empty", "is empty"),
    ("missing", "is missing"),
    ("truncated", "is not valid JSON"),
    ("an array's", "is not the metadata of a zarr group"),
])
def test_a_damaged_root_zarr_json_beside_chunks_is_refused(complete, manifest, damage, problem):
    root = complete / "zarr.json"
    if damage == "empty":
        root.write_bytes(b"")  # a crash between zarr's rename and the fsync
    elif damage == "missing":
        root.unlink()
    elif damage == "truncated":
        root.write_bytes(root.read_bytes()[:100])
    else:
        shutil.copyfile(complete / "heatmap" / "zarr.json", root)
    refused_unchanged(complete, manifest, rf"zarr.json.* {problem}.*holds arrays or chunks .*nothing was changed or "
                                          r"deleted.*--overwrite")


def test_an_interrupted_copy_without_its_zarr_json_is_refused(complete, tmp_path, manifest):
    """A copy (rsync) stopped after the marker and some arrays, before the root zarr.json."""
    copy = tmp_path / "copy.zarr"
    copy.mkdir()
    shutil.copyfile(complete / v2.MARKER_FILE, copy / v2.MARKER_FILE)
    shutil.copytree(complete / "attention", copy / "attention")
    refused_unchanged(copy, manifest, r"copy.zarr/zarr.json.* is missing.*holds arrays or chunks \(attention/")


def test_a_root_without_its_manifest_beside_extracted_chunks_is_refused(complete, manifest):
    """A hand edit that dropped the attributes: the same as an interrupted creation, except that chunks hold
    extracted sample-views."""
    root = complete / "zarr.json"
    metadata = json.loads(root.read_text())
    metadata["attributes"] = {}
    root.write_text(json.dumps(metadata))
    refused_unchanged(complete, manifest, r"zarr.json.* holds no manifest.*chunks of extracted sample-views "
                                          r"\(.*\).*nothing was changed or deleted")


def test_overwrite_rebuilds_a_store_whose_zarr_json_is_damaged(complete, manifest, reference, caplog):
    (complete / "zarr.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="distillbev"):
        report = run_extract(complete, manifest, workers=1, threads_per_worker=1, overwrite=True)
    assert (report.state, report.written) == ("created", TOTAL)
    assert "zarr.json is not valid JSON" in caplog.text and "overwriting" in caplog.text
    assert chunk_files(complete) == reference


@pytest.mark.parametrize("left", ["marker", "marker, lock, empty zarr.json", "marker, partial zarr.json"])
def test_a_creation_interrupted_before_any_array_is_rebuilt_silently(tmp_path, manifest, reference, caplog, left):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    for entry in path.iterdir():
        if entry.name != v2.MARKER_FILE:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if left == "marker, lock, empty zarr.json":
        (path / v2.LOCK_FILE).write_bytes(b"")
        (path / "zarr.json").write_bytes(b"")
    elif left == "marker, partial zarr.json":
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_')
        (path / "zarr.0123456789abcdef.partial").write_text('{"zarr_format"')  # zarr's own temporary file
    with caplog.at_level(logging.WARNING, logger="distillbev"):
        report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert (report.state, report.written, report.status) == ("created", TOTAL, "complete")
    assert not caplog.records
    assert chunk_files(path) == reference and TeacherCache.open(path).num_samples == 5


# -------------------------------------------------------------------------------------- an array's zarr.json
@pytest.mark.parametrize("status", ["complete", "writing"])
@pytest.mark.parametrize("array, damage", [
    ("heatmap", "brace"),
    ("heatmap", "missing"),
    ("features/neck", "empty"),
    ("attention/backbone1", "a group's"),
    ("done", "brace"),
    ("input_digest", "brace"),
])
def test_a_damaged_array_zarr_json_is_refused_with_nothing_changed(complete, manifest, array, damage, status):
    if status == "writing":
        root = complete / "zarr.json"
        metadata = json.loads(root.read_text())
        metadata["attributes"]["status"] = "writing"
        root.write_text(json.dumps(metadata))
    metadata_file = complete / array / "zarr.json"
    if damage == "brace":
        metadata_file.write_text("{")
    elif damage == "missing":
        metadata_file.unlink()
    elif damage == "empty":
        metadata_file.write_bytes(b"")
    else:
        metadata_file.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    error = refused_unchanged(complete, manifest, rf"cache.zarr: the metadata of array {array} \({array}/zarr.json\) "
                                                  r"is .*; nothing was changed or deleted")
    assert f"restore {array}/zarr.json from a copy of the store and rerun this command" in str(error)
    assert "rerun this command with --overwrite to delete the store" in str(error)


def test_overwrite_rebuilds_a_store_with_a_damaged_array_zarr_json(complete, manifest, reference, caplog):
    """The same manifest with --overwrite resumes an intact store, but rebuilds one with damaged array metadata (as
    the refusal says)."""
    (complete / "heatmap" / "zarr.json").write_text("{")
    (complete / "done" / "zarr.json").unlink()
    with caplog.at_level(logging.WARNING, logger="distillbev"):
        report = run_extract(complete, manifest, workers=1, threads_per_worker=1, overwrite=True)
    assert (report.state, report.written, report.status) == ("created", TOTAL, "complete")
    assert "overwriting" in caplog.text and "the metadata of array done (done/zarr.json) is missing" in caplog.text
    assert chunk_files(complete) == reference


def test_a_damaged_static_array_zarr_json_names_the_rewrite(complete, manifest, reference):
    """views, sample_tokens and teacher_head are derived from the command: deleting the damaged file is the repair
    (the same command rewrites the array)."""
    metadata_file = complete / "sample_tokens" / "zarr.json"
    metadata_file.write_text("{")
    error = refused_unchanged(complete, manifest, r"the metadata of array sample_tokens \(sample_tokens/zarr.json\) "
                                                  r"is not valid JSON")
    assert f"delete {metadata_file} and rerun this command" in str(error)
    metadata_file.unlink()
    assert run_extract(complete, manifest).state == "complete"
    assert chunk_files(complete) == reference


# ------------------------------------------------------------------------------------------- an object store
@pytest.mark.slow
def test_a_brace_in_zarr_json_on_s3_is_refused_and_every_key_kept(s3_env, manifest, reference):
    location = StoreLocation.parse(s3_env.url("damaged-root.zarr"))
    run_extract(location, manifest, workers=1, threads_per_worker=1)
    location.put("zarr.json", b"{")
    before = store_chunks(location)
    assert len(before) > TOTAL
    with pytest.raises(CacheError, match=r"damaged-root.zarr/zarr.json.* is not valid JSON.*holds arrays or chunks"):
        run_extract(location, manifest)
    assert store_chunks(location) == before and location.get("zarr.json") == b"{"
    without_manifest = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()
    location.put("zarr.json", without_manifest)
    with pytest.raises(CacheError, match=r"holds no manifest, but the store holds chunks of extracted sample-views"):
        run_extract(location, manifest)
    assert store_chunks(location) == before and location.get("zarr.json") == without_manifest

"""inspect-cache --verify: a good store passes; corruption, missing data and NaNs are each named and all reported."""

from __future__ import annotations

import numpy as np
import zarr
from click.testing import CliRunner
from inspect_stores import rebind, token_of, write_store

from distillbev.cli import cli
from distillbev.pipeline.cache.inspect.verify import verify_cache
from distillbev.pipeline.errors import CacheError


def chunk_file(store, array: str, sample: int, view: int):
    """<store>/<array>/c/<s>/<v>/0/... for the zarr v3 default chunk keys (one chunk per sample-view)."""
    ndim = zarr.open_array(str(store / array), mode="r").ndim
    path = store / array / "c" / str(sample) / str(view)
    for _ in range(ndim - 2):
        path = path / "0"
    assert path.is_file(), path
    return path


def writable(store, array: str):
    """An array of the store that writes fill-valued chunks too, as the extraction writer does."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        return zarr.open_array(str(store / array), mode="r+")


def flip_byte(path, position: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def located(report) -> set[tuple[str | None, int | None, str | None]]:
    return {(p.sample_token, p.view, p.array) for p in report.problems}


def test_good_store_passes(store):
    report = verify_cache(store, workers=2, progress=False)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.sample_views_checked == 8
    # per sample-view: done marker + 3 features + 3 attention + heatmap + occupancy
    assert report.chunks_read == 8 * 9
    result = CliRunner().invoke(cli, ["inspect-cache", str(store), "--verify", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "verify: OK, 8 sample-views, 72 chunks read" in result.output


def test_flipped_bytes_are_named_and_all_reported(store):
    flip_byte(chunk_file(store, "features/backbone1", 2, 1))
    flip_byte(chunk_file(store, "heatmap", 0, 0), position=5)
    report = verify_cache(store, workers=2, progress=False)
    assert located(report) == {(token_of(2), 1, "features/backbone1"), (token_of(0), 0, "heatmap")}
    assert all(p.message == "CRC32C checksum mismatch (the chunk is corrupt or truncated)" for p in report.problems)
    assert report.bad_sample_views == [(token_of(0), 0), (token_of(2), 1)]
    result = CliRunner().invoke(cli, ["inspect-cache", str(store), "--verify"])
    assert result.exit_code == 1 and isinstance(result.exception, CacheError)
    assert f"sample {token_of(2)} (index 2), view 1, features/backbone1: CRC32C checksum mismatch" in result.output
    assert "2 problems in 2 sample-views" in str(result.exception)
    # no command was recorded in this hand-made store: the generic form of the repair command is named
    assert "distillbev extract-teacher ... --cache" in str(result.exception) and "--repair" in str(result.exception)


def test_missing_sample_views_are_named(store):
    writable(store, "done")[1, 0] = 0
    chunk_file(store, "attention/neck", 3, 1).unlink()
    report = verify_cache(store, progress=False)
    assert located(report) == {(token_of(1), 0, "done"), (token_of(3), 1, "attention/neck")}
    messages = {p.array: p.message for p in report.problems}
    assert messages["done"] == "not extracted (done marker 0)"
    assert messages["attention/neck"] == "chunk missing (zarr would read it as fill values)"


def test_nan_in_a_feature_chunk_is_named(store):
    features = zarr.open_array(str(store / "features/neck"), mode="r+")
    values = np.asarray(features[3, 0]).copy()
    values[2, 4, 5] = np.nan
    values[0, 0, 0] = np.inf
    features[3, 0] = values  # written through zarr: the checksum is valid, only the values are wrong
    report = verify_cache(store, progress=False)
    assert located(report) == {(token_of(3), 0, "features/neck")}
    assert report.problems[0].message == "1 NaN and 1 Inf values of 1280"


def test_partial_store_and_duplicate_tokens_are_reported(tmp_path):
    path = tmp_path / "partial.zarr"
    write_store(path, tokens=["a", "b", "a"], views=1, finalize=False)
    report = verify_cache(path, progress=False)
    store_wide = [p.message for p in report.problems if p.sample_token is None]
    assert any("status is 'writing'" in m for m in store_wide)
    assert any("1 duplicated tokens" in m for m in store_wide)
    assert len(report.problems) == 2


def test_layout_mismatch_is_reported(store):
    group = zarr.open_group(str(store), mode="r+")
    attributes = dict(group.attrs)
    attributes["layers"]["neck"]["channels"] = 7  # the manifest now disagrees with features/neck (5 channels)
    group.attrs.put(attributes)
    report = verify_cache(store, progress=False)
    assert [p.describe() for p in report.problems] == [
        "features/neck: shape (4, 2, 5, 16, 16) (manifest implies (4, 2, 7, 16, 16))"]


def test_int8_store_checks_scale_and_offset_chunks(tmp_path):
    path = tmp_path / "int8.zarr"
    write_store(path, samples=2, dtype="int8")
    report = verify_cache(path, progress=False)
    assert report.ok, [p.describe() for p in report.problems]
    # per sample-view: done + 3 x (features, scale, offset, attention) + heatmap + occupancy
    assert report.chunks_read == 4 * 15
    flip_byte(chunk_file(path, "features/backbone2_scale", 1, 1))
    assert located(verify_cache(path, progress=False)) == {(token_of(1), 1, "features/backbone2_scale")}


def test_cli_verify_json_lists_problems_and_fails(store):
    import json

    flip_byte(chunk_file(store, "occupancy", 3, 0))
    result = CliRunner().invoke(cli, ["inspect-cache", str(store), "--verify", "--json"])
    assert result.exit_code == 1
    parsed = json.loads(result.stdout)
    assert parsed["verify"]["ok"] is False
    assert [(p["sample_token"], p["view"], p["array"]) for p in parsed["verify"]["problems"]] == [
        (token_of(3), 0, "occupancy")]


def test_flipped_sample_token_and_teacher_head_bytes_are_caught(store):
    flip_byte(store / "sample_tokens" / "c" / "0", position=3)
    flip_byte(store / "teacher_head" / "heatmap.bias" / "c" / "0", position=-6)
    report = verify_cache(store, progress=False)
    assert {(p.array, p.message) for p in report.problems} == {
        ("sample_tokens", "CRC32C checksum mismatch (the chunk is corrupt or truncated)"),
        ("teacher_head/heatmap.bias", "CRC32C checksum mismatch (the chunk is corrupt or truncated)")}


def test_all_zero_maps_are_stored_and_verify(tmp_path):
    path = tmp_path / "zeros.zarr"
    write_store(path, samples=2, views=1)
    writable(path, "occupancy")[1, 0] = False  # an empty canvas (no point in range) is a legitimate target
    rebind(path, 1, 0)
    assert chunk_file(path, "occupancy", 1, 0).is_file()
    assert verify_cache(path, progress=False).ok

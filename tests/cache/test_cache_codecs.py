"""Feature codecs of the cache: the int8 error budget, the codec chains the reader decodes, and the stored bytes.

Every store keeps bytes -> zstd -> crc32c; what changed is how int8 steps are chosen (`storage.int8_error`) and
that the writer encodes chunks itself, which must give zarr's own bytes. Stores written before either change must
read, verify and repair as before.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from cache_fakes import FakeTeacher, chunk_files, load_points, make_manifest, run_extract

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.chunks import (ChunkError, chunk_coords, decode_chunk, encode_chunk,
                                              expect_supported_codecs, get_chunk_bytes)
from distillbev.pipeline.cache.inspect.verify import verify_cache
from distillbev.pipeline.cache.manifest import ViewConfig, build_manifest
from distillbev.pipeline.cache.quantize import dequantize_per_channel, quantize_per_channel
from distillbev.pipeline.cache.reader import TeacherCache, repair_command
from distillbev.pipeline.errors import CacheError
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVGrid


def with_error(manifest: dict, error: float) -> dict:
    manifest["storage"][v2.INT8_ERROR_KEY] = error
    assert v2.validate_manifest(manifest) == []
    return manifest


def teacher_maps(sample: int) -> dict[str, np.ndarray]:
    """The fake teacher's fp32 features of view 0 (the identity) of `sample`: layer -> (C, Y, X)."""
    outputs = FakeTeacher()([load_points(sample, BEVAugmentation())[1]])
    return {name: values[0].numpy() for name, values in outputs.features.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# -- the quantiser ------------------------------------------------------------------------------------------------
def test_error_budget_coarsens_only_the_fine_channels():
    """Channel 0 spans 25.5 (range/255 step 0.1), channel 1 spans 2.55 (step 0.01); a budget whose step is 0.05
    keeps channel 0's step and coarsens channel 1's to 0.05."""
    x = np.array([[[0.0, 0.0, 0.0, 25.5]], [[0.0, 0.51, 1.02, 2.55]]], dtype=np.float32)  # (2, 1, 4)
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    error = 0.05 / (rms * np.sqrt(12))  # the step of an RMS error of `error` x RMS is error * RMS * sqrt(12)
    q, scale, offset = quantize_per_channel(x, error)
    np.testing.assert_allclose(scale, [0.1, 0.05], rtol=1e-6)
    np.testing.assert_array_equal(q[1, 0], [-128, -118, -108, -77])  # rint([0, 10.2, 20.4, 51]) - 128
    np.testing.assert_allclose(dequantize_per_channel(q, scale, offset)[1, 0], [0.0, 0.5, 1.0, 2.55], atol=1e-6)
    plain_q, plain_scale, _ = quantize_per_channel(x)
    np.testing.assert_allclose(plain_scale, [0.1, 0.01], rtol=1e-6)  # error 0: the range/255 steps of before
    assert plain_q[1, 0].tolist() == [-128, -77, -26, 127]


@pytest.mark.parametrize("error", [0.01, 0.03, 0.05])
def test_error_budget_bounds_rms_error_and_cosine(error):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(16, 32, 32)), 0).astype(np.float32) * rng.uniform(0.1, 10, (16, 1, 1))
    x = x.astype(np.float32)
    q, scale, offset = quantize_per_channel(x, error)
    restored = dequantize_per_channel(q, scale, offset)
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    assert np.sqrt(np.mean((restored - x).astype(np.float64) ** 2)) <= 1.05 * error * rms
    assert cosine(x, restored) >= 1 - error ** 2 / 2 * 1.1
    assert (np.abs(restored - x) <= scale[:, None, None] / 2 + 1e-5).all()  # each value within half its step
    assert (restored[x == 0] == 0).all()  # ReLU zeros (the channel minimum) stay exact


# -- round trips through a store ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,error", [("fp16", 0.0), ("int8", 0.0), ("int8", 0.03)])
def test_each_codec_round_trips_within_its_bound(tmp_path, teacher, dtype, error):
    manifest = make_manifest(teacher, dtype=dtype, views=1, sample_count=2)
    if error:
        with_error(manifest, error)
    run_extract(tmp_path / "c.zarr", manifest)
    cache = TeacherCache.open(tmp_path / "c.zarr")
    group = cache.path.open_group(mode="r")
    for name, original in teacher_maps(1).items():
        restored = cache.read(1, 0).features[name].numpy()
        if dtype == "fp16":  # float16 rounding: half a unit in the 11th significant bit
            assert (np.abs(restored - original) <= np.abs(original) * 2.0 ** -11 + 1e-7).all()
        else:
            scale = group[v2.feature_scale_array(name)][1, 0]
            assert (np.abs(restored - original) <= scale[:, None, None] / 2 + 1e-5).all()
        assert cosine(original, restored) >= (1 - error ** 2 / 2 if error else 0.99999)


def test_writer_chunks_equal_zarrs_own_writes(tmp_path, teacher):
    """The writer encodes chunks itself: every chunk file must be the bytes zarr's own write gives."""
    manifest = with_error(make_manifest(teacher, dtype="int8", views=1, sample_count=2), 0.03)
    run_extract(tmp_path / "c.zarr", manifest)
    group = TeacherCache.open(tmp_path / "c.zarr").path.open_group(mode="r+")
    for name in [v2.feature_array("neck"), v2.feature_scale_array("neck"), v2.attention_array("neck"), v2.HEATMAP,
                 v2.OCCUPANCY, v2.DONE]:
        array = group[name]
        stored = get_chunk_bytes(array, chunk_coords(array, 1, 0))
        values = array[1, 0]
        with_zarr = tmp_path / "zarr_write.zarr"
        import zarr

        copy = zarr.create_array(store=str(with_zarr), name=name.replace("/", "_"), shape=array.shape,
                                 chunks=array.chunks, dtype=array.dtype, serializer=array.serializer,
                                 compressors=array.compressors, fill_value=array.fill_value,
                                 config={"write_empty_chunks": True})
        copy[1, 0] = values
        assert get_chunk_bytes(copy, chunk_coords(copy, 1, 0)) == stored, name
        assert encode_chunk(array, np.reshape(values, array.chunks)) == stored, name



def test_a_store_of_another_zstd_level_resumes_at_its_own_level(tmp_path, teacher, monkeypatch):
    """The level changes bytes, never values: a store created at level 3 resumes under today's level and keeps
    writing level-3 chunks (its arrays' codecs), so every chunk of it is encoded alike."""
    from numcodecs.zstd import Zstd

    from distillbev.pipeline.cache.writer import set_done, set_status
    from distillbev.pipeline.cache.state import read_done

    path = tmp_path / "c.zarr"
    monkeypatch.setattr(v2, "ZSTD_LEVEL", 3)
    old = make_manifest(teacher, dtype="int8", views=1, sample_count=3)
    run_extract(path, old)
    set_done(path, [(1, 0)], 0)  # as if the run had stopped before sample 1
    set_status(path, v2.STATUS_WRITING)
    monkeypatch.undo()
    assert v2.ZSTD_LEVEL != 3
    new = make_manifest(teacher, dtype="int8", views=1, sample_count=3)
    assert new["storage"]["level"] == v2.ZSTD_LEVEL
    report = run_extract(path, new)
    assert (report.state, report.status, report.written, report.skipped) == ("resumed", "complete", 1, 2)
    assert read_done(path).all()
    group = TeacherCache.open(path).path.open_group(mode="r")
    assert dict(group.attrs)["storage"]["level"] == 3
    array = group[v2.feature_array("neck")]
    raw = get_chunk_bytes(array, chunk_coords(array, 1, 0))
    payload = np.ascontiguousarray(decode_chunk(array, raw)).tobytes()
    assert raw[:-4] == Zstd(level=3).encode(payload)



def test_local_chunk_reads_give_what_zarrs_store_gives(tmp_path, teacher):
    """On a local disk chunks are read and sized as files; the bytes, sizes and absences are those of zarr's store."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from distillbev.pipeline.cache.chunks import chunk_key, chunk_size, local_root

    manifest = make_manifest(teacher, dtype="int8", views=1, sample_count=2)
    run_extract(tmp_path / "c.zarr", manifest)
    group = TeacherCache.open(tmp_path / "c.zarr").path.open_group(mode="r+")
    array = group[v2.feature_array("neck")]
    assert local_root(array) == tmp_path / "c.zarr"
    key = chunk_key(array, chunk_coords(array, 1, 0))
    through_zarr = sync(array.store.get(key, prototype=default_buffer_prototype())).to_bytes()
    assert get_chunk_bytes(array, chunk_coords(array, 1, 0)) == through_zarr
    assert chunk_size(array, chunk_coords(array, 1, 0)) == len(through_zarr) == int(sync(array.store.getsize(key)))
    (tmp_path / "c.zarr" / key).unlink()
    assert get_chunk_bytes(array, chunk_coords(array, 1, 0)) is None
    assert chunk_size(array, chunk_coords(array, 1, 0)) is None
    assert sync(array.store.get(key, prototype=default_buffer_prototype())) is None


def test_a_failed_chunk_write_leaves_the_old_chunk_and_no_partial_file(tmp_path, monkeypatch):
    from distillbev.pipeline.cache.chunks import write_local_chunk

    chunk = tmp_path / "features" / "neck" / "c" / "0" / "0" / "0" / "0" / "0"
    write_local_chunk(chunk, b"old chunk", fsync=True)
    write_local_chunk(chunk, b"new chunk", fsync=False)
    assert chunk.read_bytes() == b"new chunk"

    def failing_replace(source, target):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        write_local_chunk(chunk, b"torn", fsync=True)
    assert chunk.read_bytes() == b"new chunk"
    assert sorted(p.name for p in chunk.parent.iterdir()) == ["0"]


# -- the manifest ------------------------------------------------------------------------------------------------
def test_manifest_records_the_int8_error_only_when_there_is_one(teacher):
    grid = BEVGrid(-8.0, 8.0, -8.0, 8.0, 1.0)
    common = dict(teacher_config={}, checkpoint_path="", checkpoint_sha256="", grid=grid, layers=[],
                  heatmap_shape=(8, 8), occupancy_shape=(16, 16), views=ViewConfig(), sample_tokens=["a"],
                  dataset={"dataroot": "", "version": "v", "split": "s", "num_sweeps": 1, "fingerprint": "",
                           "point_loading": {}})
    storage = build_manifest(dtype="int8", int8_error=0.03, **common)["storage"]
    assert storage["int8_error"] == 0.03 and storage["codec"] == "zstd" and storage["checksum"] == "crc32c"
    assert "int8_error" not in build_manifest(dtype="int8", **common)["storage"]  # the identity of older stores
    assert "int8_error" not in build_manifest(dtype="fp16", **common)["storage"]
    with pytest.raises(ValueError, match="int8_error 0.03 is for --dtype int8 only"):
        build_manifest(dtype="fp16", int8_error=0.03, **common)
    manifest = build_manifest(dtype="int8", int8_error=0.03, **common)
    manifest["storage"]["int8_error"] = 0.5
    assert v2.validate_manifest(manifest) == ["storage.int8_error: expected a number in (0, 0.1], found 0.5"]


def test_a_store_of_another_error_budget_is_refused(tmp_path, teacher):
    run_extract(tmp_path / "c.zarr", with_error(make_manifest(teacher, dtype="int8", views=1, sample_count=2), 0.03))
    other = with_error(make_manifest(teacher, dtype="int8", views=1, sample_count=2), 0.02)
    with pytest.raises(CacheError, match="storage.int8_error: 0.03 -> 0.02"):
        run_extract(tmp_path / "c.zarr", other)


# -- stores written before ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_older_stores_read_verify_and_keep_their_repair_command(tmp_path, teacher, dtype):
    """A store whose manifest has no int8_error (written before it existed) reads, verifies and resumes; its
    recorded command, which has no --int8-error, is repaired with the steps it was written with."""
    manifest = make_manifest(teacher, dtype=dtype, views=1, sample_count=2)
    command = (f"distillbev extract-teacher --config t.yaml --dataroot d --checkpoint c.pth --cache "
               f"{tmp_path / 'c.zarr'} --split s --dtype {dtype}")
    manifest["extraction"] = {"command": command}
    run_extract(tmp_path / "c.zarr", manifest)
    cache = TeacherCache.open(tmp_path / "c.zarr")
    assert v2.INT8_ERROR_KEY not in cache.manifest["storage"]
    assert verify_cache(tmp_path / "c.zarr", progress=False).ok
    before = chunk_files(tmp_path / "c.zarr")
    assert run_extract(tmp_path / "c.zarr", make_manifest(teacher, dtype=dtype, views=1, sample_count=2)).state \
        == "complete"
    assert chunk_files(tmp_path / "c.zarr") == before
    expected = command + (" --int8-error 0.0" if dtype == "int8" else "") + " --repair"
    assert repair_command(cache.manifest, tmp_path / "c.zarr") == expected


# -- codec chains and corruption ---------------------------------------------------------------------------------
def blosc_array(tmp_path, shuffle: str = "shuffle"):
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    return zarr.create_array(store=str(tmp_path / "blosc.zarr"), shape=(2, 1, 3, 4, 5), chunks=(1, 1, 3, 4, 5),
                             dtype="float16", serializer=BytesCodec(),
                             compressors=[BloscCodec(cname="zstd", clevel=3, shuffle=shuffle), Crc32cCodec()],
                             fill_value=0, config={"write_empty_chunks": True})


@pytest.mark.parametrize("shuffle", ["shuffle", "bitshuffle"])
def test_a_blosc_chain_is_read_and_its_corruption_caught(tmp_path, shuffle):
    array = blosc_array(tmp_path, shuffle)
    values = np.arange(60, dtype=np.float16).reshape(3, 4, 5) / 8
    array[1, 0] = values
    raw = get_chunk_bytes(array, chunk_coords(array, 1, 0))
    expect_supported_codecs(array)
    np.testing.assert_array_equal(decode_chunk(array, raw)[0, 0], values)
    assert encode_chunk(array, values[None, None]) == raw
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    with pytest.raises(ChunkError, match="CRC32C checksum mismatch"):
        decode_chunk(array, bytes(flipped))


def test_an_unsupported_chain_is_named(tmp_path):
    import zarr
    from zarr.codecs import BytesCodec, GzipCodec

    array = zarr.create_array(store=str(tmp_path / "gzip.zarr"), shape=(1, 1, 4), chunks=(1, 1, 4), dtype="int8",
                              serializer=BytesCodec(), compressors=[GzipCodec()])
    with pytest.raises(ChunkError, match=r"unsupported codecs \['BytesCodec', 'GzipCodec'\]"):
        expect_supported_codecs(array)


def test_a_corrupted_chunk_of_the_default_codec_is_caught(tmp_path, teacher):
    manifest = with_error(make_manifest(teacher, dtype="int8", views=1, sample_count=2), v2.DEFAULT_INT8_ERROR)
    run_extract(tmp_path / "c.zarr", manifest)
    chunk = tmp_path / "c.zarr" / "features" / "neck" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"view 0, features/neck: CRC32C checksum mismatch.*--repair"):
        TeacherCache.open(tmp_path / "c.zarr").read(1, 0)
    problems = verify_cache(tmp_path / "c.zarr", progress=False).problems
    assert [(p.view, p.array, p.message) for p in problems] == [
        (0, "features/neck", "CRC32C checksum mismatch (the chunk is corrupt or truncated)")]
    undamaged = TeacherCache.open(tmp_path / "c.zarr").read(0, 0).features["neck"].numpy()
    assert cosine(undamaged, teacher_maps(0)["neck"]) >= 1 - v2.DEFAULT_INT8_ERROR ** 2 / 2

"""Strict chunk access for v2 stores: a chunk that should exist is read, checked and decoded, or named as bad.

zarr returns the fill value for a chunk that is not in the store, and a bare ValueError for a checksum mismatch.
A teacher cache must never hand out fill values as targets, so the reader and the checks read each chunk's bytes
themselves (the chunk file on a local disk, one `get` through the array's zarr store on any other backend) and
decode them here. The codec chain
is read from each array's zarr metadata: a serializer `bytes`, then any number of `zstd` or `blosc` compressors,
then `crc32c` (schema 2 writes bytes -> zstd -> crc32c; a blosc chain is decoded too, so a store written with
zarr's standard blosc codec reads the same way). Any other chain is named as unsupported:

    raw = get_chunk_bytes(array, (s, v))          # bytes, or None when the chunk is absent
    values = decode_chunk(array, raw)             # ChunkError("checksum mismatch") / ("does not decompress")
    problem = check_chunk_bytes(raw)              # the cheap check: present, long enough, CRC32C matches
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

CRC_BYTES = 4
REQUESTS_IN_FLIGHT = 256  # concurrent object-store requests of a batched read or write


class ChunkError(Exception):
    """One chunk is missing or damaged; the message says how (the caller names the sample, view and array)."""


def chunk_coords(array: Any, sample: int, view: int) -> tuple[int, ...]:
    """Coordinates of the one chunk that holds sample-view (sample, view) of a per-sample-view array."""
    return (sample, view) + (0,) * (array.ndim - 2)


def chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    """The store key of a chunk, e.g. 'features/neck/c/3/1/0/0/0'."""
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}" if array.path else \
        array.metadata.encode_chunk_key(coords)


def local_root(array: Any) -> Path | None:
    """The folder of the array's store when it is zarr's LocalStore (its chunks are plain files), else None."""
    from zarr.storage import LocalStore

    return Path(array.store.root) if isinstance(array.store, LocalStore) else None


def get_chunk_bytes(array: Any, coords: tuple[int, ...]) -> bytes | None:
    """The stored bytes of one chunk (None when absent): the file itself on a local disk, where a round trip through
    zarr's event loop costs 20x the read (docs/benchmarks.md); otherwise through the array's zarr store."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    root = local_root(array)
    if root is not None:
        try:
            return (root / chunk_key(array, coords)).read_bytes()
        except FileNotFoundError:
            return None
    buffer = sync(array.store.get(chunk_key(array, coords), prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def crc_problem(raw: bytes | None) -> str | None:
    """Why the stored bytes of a chunk are not a whole, checksummed chunk (None when they are)."""
    import google_crc32c

    if raw is None:
        return "chunk missing (zarr would read it as fill values)"
    if len(raw) <= CRC_BYTES:
        return f"chunk truncated to {len(raw)} bytes"
    stored = raw[-CRC_BYTES:]
    computed = np.uint32(google_crc32c.value(raw[:-CRC_BYTES])).tobytes()
    if stored != computed:
        return "CRC32C checksum mismatch (the chunk is corrupt or truncated)"
    return None


def chunk_size(array: Any, coords: tuple[int, ...]) -> int | None:
    """Stored size in bytes of one chunk (None when absent), without reading it."""
    from zarr.core.sync import sync

    root = local_root(array)
    try:
        if root is not None:
            return os.stat(root / chunk_key(array, coords)).st_size
        return int(sync(array.store.getsize(chunk_key(array, coords))))
    except FileNotFoundError:
        return None


def check_chunk_bytes(raw: bytes | None) -> None:
    """ChunkError unless `raw` is a present chunk with a matching checksum."""
    problem = crc_problem(raw)
    if problem is not None:
        raise ChunkError(problem)


SUPPORTED_COMPRESSORS = ("ZstdCodec", "BloscCodec")


def codec_names(array: Any) -> list[str]:
    """The class names of an array's codecs in write order, e.g. ['BytesCodec', 'ZstdCodec', 'Crc32cCodec']."""
    return [type(c).__name__ for c in (*array.filters, array.serializer, *array.compressors) if c is not None]


def expect_supported_codecs(array: Any) -> None:
    """ChunkError unless the array stores its chunks as bytes -> (zstd | blosc)* -> crc32c (what `decode_chunk`
    reads)."""
    names = codec_names(array)
    middle = names[1:-1]
    if (len(names) < 2 or names[0] != "BytesCodec" or names[-1] != "Crc32cCodec"
            or any(name not in SUPPORTED_COMPRESSORS for name in middle)):
        raise ChunkError(f"unsupported codecs {names} (a v2 store uses BytesCodec, then ZstdCodec or BloscCodec, "
                         f"then Crc32cCodec)")


expect_v2_codecs = expect_supported_codecs  # the name before blosc chains were read


def _decompressor(codec: Any) -> Any:
    """A numcodecs object that decodes what the zarr v3 compressor `codec` wrote (single-threaded)."""
    name = type(codec).__name__
    if name == "ZstdCodec":
        from numcodecs.zstd import Zstd

        return Zstd()
    if name == "BloscCodec":
        from numcodecs.blosc import Blosc

        Blosc.use_threads = False  # a decode runs in one thread: DataLoader workers are the parallelism
        return Blosc()  # a blosc frame carries its own cname, shuffle and typesize
    raise ChunkError(f"unsupported compressor {name}")


def _compressor(codec: Any) -> Any:
    """A numcodecs object that encodes as the zarr v3 compressor `codec` does (same bytes), single-threaded."""
    name = type(codec).__name__
    if name == "ZstdCodec":
        from numcodecs.zstd import Zstd

        return Zstd(level=codec.level, checksum=codec.checksum)
    if name == "BloscCodec":
        from numcodecs.blosc import Blosc

        Blosc.use_threads = False
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        return Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle[codec.shuffle.value],
                     typesize=codec.typesize, blocksize=codec.blocksize)
    raise ChunkError(f"unsupported compressor {name}")


def encode_chunk(array: Any, values: np.ndarray) -> bytes:
    """The stored bytes of one chunk holding `values` (shape `array.chunks`), as zarr's own codec pipeline writes
    them (bytes serializer, the compressors in order, CRC32C last); the writer stores them with one put per chunk.
    """
    import google_crc32c

    expect_supported_codecs(array)
    dtype = np.dtype(array.dtype)
    endian = getattr(array.serializer, "endian", None)
    if dtype.itemsize > 1 and endian is not None and getattr(endian, "value", endian) == "big":
        dtype = dtype.newbyteorder(">")
    values = np.asarray(values)
    if values.shape != tuple(array.chunks):
        raise ValueError(f"chunk of shape {values.shape}, the array's chunks are {tuple(array.chunks)}")
    payload = np.ascontiguousarray(values, dtype=dtype).tobytes()
    for codec in array.compressors:
        if type(codec).__name__ != "Crc32cCodec":
            payload = bytes(_compressor(codec).encode(payload))
    return payload + np.uint32(google_crc32c.value(payload)).tobytes()


def write_local_chunk(path: Path, raw: bytes, fsync: bool) -> None:
    """Write one encoded chunk file as zarr's LocalStore does (a `.partial` file renamed into place, so a reader
    sees the old chunk or the new one), fsync'ed before the rename when asked: one open per chunk, no event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as handle:
            handle.write(raw)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def put_chunks(store: Any, chunks: dict[str, bytes]) -> None:
    """Store several encoded chunks (key -> bytes) through one zarr store, `REQUESTS_IN_FLIGHT` at a time."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    prototype = default_buffer_prototype()
    items = list(chunks.items())

    async def put_batch(batch: list[tuple[str, bytes]]) -> None:
        await asyncio.gather(*(store.set(key, prototype.buffer.from_bytes(raw)) for key, raw in batch))

    for start in range(0, len(items), REQUESTS_IN_FLIGHT):
        sync(put_batch(items[start:start + REQUESTS_IN_FLIGHT]))


def get_chunks(array: Any, coords: list[tuple[int, ...]]) -> list[bytes | None]:
    """The stored bytes of many chunks of one array (None for an absent one), in the order of `coords`.

    On an object store the requests go out `REQUESTS_IN_FLIGHT` at a time (one round trip per batch instead of one
    per chunk: the done markers of trainval are 112,520 objects); on a local disk the files are read in turn.
    """
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    if local_root(array) is not None:
        return [get_chunk_bytes(array, c) for c in coords]
    import asyncio

    prototype = default_buffer_prototype()

    async def get_batch(batch: list[tuple[int, ...]]) -> list[Any]:
        return await asyncio.gather(*(array.store.get(chunk_key(array, c), prototype=prototype) for c in batch))

    found: list[bytes | None] = []
    for start in range(0, len(coords), REQUESTS_IN_FLIGHT):
        batch = sync(get_batch(coords[start:start + REQUESTS_IN_FLIGHT]))
        found += [None if b is None else b.to_bytes() for b in batch]
    return found


def write_chunks(array: Any, chunks: dict[tuple[int, ...], bytes]) -> list[str]:
    """Write encoded chunks (coords -> bytes) of one array: local files through `write_local_chunk` (not fsync'ed:
    the caller fsyncs the returned keys before anything vouches for them), object-store keys with `put_chunks`.
    Returns the keys written."""
    keys = {chunk_key(array, coords): raw for coords, raw in chunks.items()}
    root = local_root(array)
    if root is None:
        put_chunks(array.store, keys)
    else:
        for key, raw in keys.items():
            write_local_chunk(root / key, raw, fsync=False)
    return list(keys)


def decode_chunk(array: Any, raw: bytes | None) -> np.ndarray:
    """The values of one chunk, shape `array.chunks`, after checking its presence and CRC32C.

    The compressors between the bytes serializer and the checksum are undone in reverse order, as the array's
    metadata lists them.
    """
    check_chunk_bytes(raw)
    payload = raw[:-CRC_BYTES]
    compressors = [c for c in array.compressors if type(c).__name__ != "Crc32cCodec"]
    for codec in reversed(compressors):
        decoder = _decompressor(codec)
        try:
            payload = decoder.decode(payload)
        except Exception as exc:  # a frame that passes the CRC yet does not decompress: written wrongly
            raise ChunkError(f"chunk does not decompress ({type(exc).__name__}: {exc})") from None
    dtype = np.dtype(array.dtype)
    endian = getattr(array.serializer, "endian", None)
    if dtype.itemsize > 1 and endian is not None and getattr(endian, "value", endian) == "big":
        dtype = dtype.newbyteorder(">")
    expected = int(np.prod(array.chunks)) * dtype.itemsize
    if len(payload) != expected:
        raise ChunkError(f"chunk holds {len(payload)} bytes after decompression, expected {expected}")
    return np.frombuffer(bytearray(payload), dtype=dtype).reshape(array.chunks)  # writable: torch wraps it


def single_chunk_bytes(array: Any) -> bytes | None:
    """The stored bytes of an array kept in one chunk (views, sample_tokens, teacher_head/*), None when absent."""
    return get_chunk_bytes(array, (0,) * array.ndim)


def decode_single_chunk(array: Any) -> np.ndarray:
    """The values of an array kept in one chunk, shape `array.shape`, read strictly (ChunkError when damaged)."""
    return decode_chunk(array, single_chunk_bytes(array)).reshape(array.shape)

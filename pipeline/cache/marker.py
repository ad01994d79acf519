"""Done markers that bind a sample-view's chunks to their place (schema 3).

A chunk's CRC32C says its bytes are whole, not that they belong where they are: a chunk copied over another
sample-view's key, one view's int8 scale beside another view's features, a store merged by hand from two, or a
writer that lost its lease overwriting a chunk all pass it. So the done marker of sample-view (s, v), one chunk of
`done` (S, V, D) uint8, is not a bare 1 but

    bytes  0..31   SHA-256 of (a domain tag, the store id, bytes 32..D-1)
    bytes 32..39   the store's tag: the first 8 bytes of its id (`store_id`, `manifest.store_identity`)
    bytes 40..47   s and v, uint32 little-endian each
    bytes 48..     the CRC32C of each of the sample-view's N chunks as stored (each chunk's last 4 bytes), in
                   the sorted order of the array names (features, scales and offsets, attention, heatmap, occupancy)

so D = 48 + 4 N; all zero means "not done". A reader checks the marker (one small read) and compares the CRC of
each chunk it reads with the one recorded: a chunk that is not the one written for this sample-view, or a marker
written for another sample-view or store, is refused, naming where the marker says it belongs. A schema-2 store's
markers are a bare 1 (`MarkerFormat.bound` False): taken as "done, unbound".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...cache_schemas import v2
from .chunks import CRC_BYTES

DOMAIN = b"distillbev done marker\0"
DIGEST_BYTES = 32
TAG_BYTES = 8


def stored_crc(raw: bytes) -> bytes:
    """The CRC32C a stored chunk ends with (4 bytes, as stored)."""
    return bytes(raw[-CRC_BYTES:])


@dataclass(frozen=True)
class MarkerFormat:
    """How the done markers of one store are written and checked.

    store_id: the manifest's `store_id` (None: a schema-2 store, bare markers); arrays: the per-sample-view arrays
    whose chunks a marker binds, in marker order (sorted names).
    """

    store_id: str | None
    arrays: tuple[str, ...]

    @classmethod
    def of(cls, manifest: dict[str, Any], arrays: Sequence[str]) -> "MarkerFormat":
        """The format of a store with `manifest` whose per-sample-view arrays are `arrays` (any order)."""
        store_id = manifest[v2.STORE_ID_KEY] if v2.binds_chunks(manifest) else None
        return cls(store_id, tuple(sorted(arrays)))

    @property
    def bound(self) -> bool:
        return self.store_id is not None

    @property
    def width(self) -> int:
        """D, the bytes of one marker."""
        return v2.DONE_HEADER_BYTES + CRC_BYTES * len(self.arrays)

    @property
    def shape_tail(self) -> tuple[int, ...]:
        """The marker array's shape after (S, V): (D,), or () for bare markers."""
        return (self.width,) if self.bound else ()

    @property
    def tag(self) -> bytes:
        return bytes.fromhex(self.store_id)[:TAG_BYTES]

    def _digest(self, body: bytes) -> bytes:
        return hashlib.sha256(DOMAIN + bytes.fromhex(self.store_id) + body).digest()

    def encode(self, sample: int, view: int, crcs: dict[str, bytes]) -> np.ndarray:
        """(D,) uint8: the marker of sample-view (sample, view) whose chunks end with `crcs` (array name -> CRC)."""
        if set(crcs) != set(self.arrays):
            raise ValueError(f"a done marker binds the chunks of {list(self.arrays)}, got {sorted(crcs)}")
        body = (self.tag + int(sample).to_bytes(4, "little") + int(view).to_bytes(4, "little")
                + b"".join(crcs[name] for name in self.arrays))
        return np.frombuffer(self._digest(body) + body, dtype=np.uint8)

    def problem(self, sample: int, view: int, marker: np.ndarray, describe=None) -> str | None:
        """Why `marker` (a set one) is not a marker written for sample-view (sample, view) of this store, or None.

        describe: sample index -> text naming the sample (default "sample <index>").
        """
        describe = describe or (lambda index: f"sample {index}")
        raw = np.asarray(marker, dtype=np.uint8).reshape(-1).tobytes()
        if len(raw) != self.width:
            return f"the done marker holds {len(raw)} bytes, this store's hold {self.width}"
        body = raw[DIGEST_BYTES:]
        tag, rest = body[:TAG_BYTES], body[TAG_BYTES:]
        if tag != self.tag:
            return (f"the done marker was written by another store (store id {tag.hex()}..., this store's is "
                    f"{self.tag.hex()}...): this sample-view was copied from another store")
        written = (int.from_bytes(rest[:4], "little"), int.from_bytes(rest[4:8], "little"))
        if written != (sample, view):
            return (f"the done marker was written for {describe(written[0])} view {written[1]}: this sample-view "
                    f"was copied from there")
        if self._digest(body) != raw[:DIGEST_BYTES]:
            return "the done marker does not match its own digest (altered, or written by another tool)"
        return None

    def recorded(self, marker: np.ndarray) -> dict[str, bytes]:
        """Array name -> the CRC32C a (checked) marker records for that array's chunk."""
        raw = np.asarray(marker, dtype=np.uint8).reshape(-1).tobytes()[v2.DONE_HEADER_BYTES:]
        return {name: raw[i * CRC_BYTES:(i + 1) * CRC_BYTES] for i, name in enumerate(self.arrays)}

    def chunk_problems(self, marker: np.ndarray, crcs: dict[str, bytes]) -> dict[str, str]:
        """Array name -> why its chunk (ending with crcs[name]) is not the one the marker records, for each of
        `crcs` (a subset of the arrays) that differs."""
        recorded = self.recorded(marker)
        return {name: (f"not the chunk written for this sample-view (its CRC32C {crc.hex()}, the done marker "
                       f"records {recorded[name].hex()}): copied from another sample-view or store, or written by "
                       f"another extraction")
                for name, crc in crcs.items() if crc != recorded[name]}


def is_set(marker: np.ndarray) -> bool:
    """Whether a decoded marker (bound or bare) says "done"."""
    return bool(np.asarray(marker).any())

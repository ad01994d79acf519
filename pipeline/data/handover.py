"""One shared-memory block per DataLoader batch.

A DataLoader worker hands every tensor of a batch to the training process as its own shared-memory segment, and each
segment's file descriptor crosses a socket from the worker: about 0.25 ms of the training process's wall time (0.16 ms
of CPU) per tensor on this project's 2-core machines, whatever its size (`benchmarks/handover.py`;
`docs/benchmarks.md`, "What handing a batch over from a DataLoader worker costs"). A distilled batch of the main job
holds about 45 tensors (the teacher's maps and attention, the region masks and scales of every layer), a baseline
batch 15. `share_one_block` copies the tensors of a collated batch into one shared-memory block and returns the same
structure holding views into it, so the batch crosses with one descriptor. The copy replaces the one the worker made
anyway when it moved each tensor into shared memory.

The views share one block: a view the training process keeps alive keeps the whole batch's block alive.

For a CUDA device the loader pins its batches (`pin_memory=True`): the collate returns a `HandedOverBatch`, whose
`pin_memory` copies the block into one page-locked block in the loader's pin-memory thread, so the step's
`.to(device, non_blocking=True)` copies run asynchronously.

Each block lives in /dev/shm until the training process has taken it: up to workers x prefetch factor batches at a
time. Docker gives a container 64 MB there unless run with `--shm-size`, so `check_shared_memory` compares what the
loader will hold with the free space before the first epoch and says what to change. `loader_workers` turns the
`auto` worker count into a number from the cores of this rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import torch
from torch.utils.data import get_worker_info

from ..errors import ConfigError

log = logging.getLogger(__name__)

ALIGNMENT = 64  # bytes: every view starts on a cache line, so any dtype's elements are aligned
MAX_AUTO_WORKERS = 8  # `auto` never starts more DataLoader workers than this per rank (the reference's 8 per GPU)
SHARED_MEMORY = "/dev/shm"


def _tensors(tree, found: list[torch.Tensor]) -> None:
    """Append the CPU tensors of a batch structure (dataclasses, dicts, lists, tuples) to `found`, depth first."""
    if isinstance(tree, torch.Tensor):
        if tree.device.type == "cpu":
            found.append(tree)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for field in dataclasses.fields(tree):
            _tensors(getattr(tree, field.name), found)
    elif isinstance(tree, dict):
        for value in tree.values():
            _tensors(value, found)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _tensors(value, found)


def _replace(tree, views: dict[int, torch.Tensor]):
    """The batch structure with each tensor swapped for its view (keyed by id); other values kept as they are."""
    if isinstance(tree, torch.Tensor):
        return views.get(id(tree), tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {field.name: _replace(getattr(tree, field.name), views)
                   for field in dataclasses.fields(tree) if field.init}
        return dataclasses.replace(tree, **changes)
    if isinstance(tree, dict):
        return {key: _replace(value, views) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_replace(value, views) for value in tree]
    if isinstance(tree, tuple):
        return tuple(_replace(value, views) for value in tree)
    return tree


def _unique_tensors(tree) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _tensors(tree, found)
    return list({id(tensor): tensor for tensor in found}.values())


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def block_bytes(tree) -> int:
    """The bytes of the one block `share_one_block` copies the batch structure's CPU tensors into."""
    return sum(_aligned(tensor.numel() * tensor.element_size()) for tensor in _unique_tensors(tree))


def share_one_block(tree, shared: bool = True, pinned: bool = False):
    """The batch structure with every CPU tensor copied into one block (shared memory when `shared`, page-locked
    memory when `pinned`), as views.

    Values, shapes and dtypes are kept; the views are contiguous, except that a channels_last (B, C, Y, X) tensor
    keeps its layout. A tensor that appears twice in the structure gets one view.
    """
    unique = _unique_tensors(tree)
    if len(unique) < 2 and not pinned:
        return tree
    offsets, total = [], 0
    for tensor in unique:
        offsets.append(total)
        total += _aligned(tensor.numel() * tensor.element_size())
    if pinned:
        block = torch.empty(total, dtype=torch.uint8, pin_memory=True).untyped_storage()
    else:
        block = torch.UntypedStorage._new_shared(total) if shared else torch.UntypedStorage(total)
    views = {}
    for tensor, offset in zip(unique, offsets):
        view = torch.empty(0, dtype=tensor.dtype).set_(block, offset // tensor.element_size(), tensor.shape,
                                                        _dense_strides(tensor))
        views[id(tensor)] = view.copy_(tensor)
    return _replace(tree, views)


def _dense_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides of the tensor's view in the block: a channels_last (B, C, Y, X) tensor keeps its layout, any
    other tensor gets the contiguous strides."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.stride()
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def share_one_block_in_worker(tree):
    """`share_one_block` inside a DataLoader worker; in the training process itself (no workers) the batch as is."""
    return tree if get_worker_info() is None else share_one_block(tree)


class HandedOverBatch(tuple):
    """A collated (batch, targets) pair whose tensors are views of one block. The DataLoader's pin-memory thread
    (pin_memory=True) calls `pin_memory`, which copies them into one page-locked block; unpacked like any pair."""

    def pin_memory(self, device=None) -> "HandedOverBatch":
        return HandedOverBatch(share_one_block(tuple(self), shared=False, pinned=True))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ranks_on_node() -> int:
    """The processes torchrun started on this node (LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(setting: int | str) -> int:
    """DataLoader workers for a `num_workers` setting: a number as given; `auto` = min(8, cores per rank - 1), the
    cores of this process shared by the torchrun ranks of its node, one left for the rank itself."""
    if setting != "auto":
        return int(setting)
    return max(0, min(MAX_AUTO_WORKERS, available_cores() // ranks_on_node() - 1))


def shared_memory_free(path: str = SHARED_MEMORY) -> int | None:
    """Free bytes of the shared-memory file system (None where there is none, e.g. not Linux)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_shared_memory(batch_bytes: int, workers: int, prefetch_factor: int = 2, ranks: int | None = None,
                        what: str = "train.num_workers", path: str = SHARED_MEMORY) -> int:
    """ConfigError when the batches the loaders hold in shared memory do not fit its free space; returns the bytes
    needed (0 without workers: then nothing goes through shared memory).

    Each rank's loader holds up to workers x prefetch_factor batches in /dev/shm, and the rank one more while it
    takes the next; `batch_bytes` is one batch's block (`block_bytes`), `ranks` the ranks sharing the node's
    /dev/shm (default: `ranks_on_node`).
    """
    if workers <= 0:
        return 0
    ranks = ranks_on_node() if ranks is None else ranks
    needed = batch_bytes * (workers * prefetch_factor + 1) * ranks
    free = shared_memory_free(path)
    if free is None:
        return needed
    if needed > free:
        per_rank = f" per rank x {ranks} ranks" if ranks > 1 else ""
        raise ConfigError(
            f"{path}: {free / 2**20:.0f} MiB free, but {workers} DataLoader worker(s) x prefetch {prefetch_factor} "
            f"(+1 being taken){per_rank} hold {needed / 2**20:.0f} MiB of batches there ({batch_bytes / 2**20:.1f} "
            f"MiB per batch); in Docker run the container with a larger --shm-size (e.g. --shm-size="
            f"{_suggested_size(needed)}, or --ipc=host), or lower {what} or train.batch_size")
    log.info("shared memory: %.1f MiB per batch, up to %.0f MiB of %.0f MiB free in %s", batch_bytes / 2**20,
             needed / 2**20, free / 2**20, path)
    return needed


def _suggested_size(needed: int) -> str:
    """A --shm-size that fits `needed` bytes with room to spare: the next power of two in GiB (at least 1g)."""
    gib = 1
    while gib * 2**30 < 2 * needed:
        gib *= 2
    return f"{gib}g"

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
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import get_worker_info

ALIGNMENT = 64  # bytes: every view starts on a cache line, so any dtype's elements are aligned


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


def share_one_block(tree, shared: bool = True):
    """The batch structure with every CPU tensor copied into one block (shared memory when `shared`), as views.

    Values, shapes and dtypes are kept; the views are contiguous, except that a channels_last (B, C, Y, X) tensor
    keeps its layout. A tensor that appears twice in the structure gets one view.
    """
    found: list[torch.Tensor] = []
    _tensors(tree, found)
    unique = list({id(tensor): tensor for tensor in found}.values())
    if len(unique) < 2:
        return tree
    offsets, total = [], 0
    for tensor in unique:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT
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

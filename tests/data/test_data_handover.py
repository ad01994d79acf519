"""share_one_block: a collated batch's tensors become views of one block, values, dtypes and structure kept, and a
DataLoader worker's batch reaches the training process as one shared-memory block."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distillbev.pipeline.data.handover import ALIGNMENT, share_one_block, share_one_block_in_worker


@dataclass
class Inner:
    mask: torch.Tensor
    scale: torch.Tensor | None


@dataclass
class Outer:
    tokens: list[str]
    points: list[torch.Tensor]
    inner: dict[str, Inner]
    pose: np.ndarray
    count: int = 3
    derived: int = field(default=0, init=False)


def make_batch() -> tuple[Outer, None]:
    g = torch.Generator().manual_seed(0)
    points = [torch.randn(5, 5, generator=g), torch.randn(0, 5, generator=g)]  # a sample may have no points
    inner = {"neck": Inner(torch.rand(2, 3, 3, generator=g) > 0.5, None),
             "backbone1": Inner(torch.arange(7, dtype=torch.int64), torch.randn(2, 4, 6, 6, generator=g)
                                .contiguous(memory_format=torch.channels_last))}
    return Outer(["a", "b"], points, inner, np.eye(4)), None


def tensors_of(batch: tuple[Outer, None]) -> list[torch.Tensor]:
    outer = batch[0]
    return [*outer.points, outer.inner["neck"].mask, outer.inner["backbone1"].mask, outer.inner["backbone1"].scale]


def test_values_dtypes_and_structure_are_kept():
    batch = make_batch()
    packed = share_one_block(batch, shared=False)
    assert packed[1] is None
    outer = packed[0]
    assert outer.tokens == ["a", "b"] and outer.count == 3 and outer.pose is batch[0].pose
    assert outer.inner["neck"].scale is None
    for before, after in zip(tensors_of(batch), tensors_of(packed)):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(after, before) and after.stride() == before.stride()
    assert outer.inner["backbone1"].scale.is_contiguous(memory_format=torch.channels_last)


def test_every_tensor_is_an_aligned_view_of_one_block():
    packed = share_one_block(make_batch(), shared=False)
    tensors = tensors_of(packed)
    block = tensors[0].untyped_storage()
    assert all(t.untyped_storage().data_ptr() == block.data_ptr() for t in tensors)
    starts = sorted(t.storage_offset() * t.element_size() for t in tensors)
    assert all(start % ALIGNMENT == 0 for start in starts)
    # 5x5 float32 = 100 B -> 128; 0 B -> 0; 18 bool -> 64; 7 int64 = 56 B -> 64; 2x4x6x6 float32 = 1152 B
    assert starts == [0, 128, 128, 192, 256] and block.nbytes() == 128 + 0 + 64 + 64 + 1152
    # the views do not overlap: writing one leaves the others as they were
    tensors[2].fill_(True)
    assert torch.equal(tensors[3], torch.arange(7)) and torch.equal(tensors_of(make_batch())[0], tensors[0])


def test_a_tensor_twice_in_the_batch_gets_one_view():
    shared = torch.ones(3)
    packed = share_one_block({"a": shared, "b": [shared, torch.zeros(2)]}, shared=False)
    assert packed["a"].data_ptr() == packed["b"][0].data_ptr()
    assert packed["a"].untyped_storage().nbytes() == 2 * ALIGNMENT


def test_shared_block_and_the_training_process_keeps_its_batch():
    batch = make_batch()
    assert tensors_of(share_one_block(batch))[0].is_shared()
    assert share_one_block_in_worker(batch) is batch  # no worker here: nothing to hand over


class _Batches(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        return index


def _collate(items):
    return share_one_block_in_worker(make_batch())


def test_a_worker_batch_arrives_as_one_block():
    loader = DataLoader(_Batches(), batch_size=1, num_workers=1, collate_fn=_collate,
                        multiprocessing_context="fork")
    for received in loader:
        tensors = tensors_of(received)
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        for before, after in zip(tensors_of(make_batch()), tensors):
            assert torch.equal(after, before)

"""The int8 handover's device half on a CUDA device: a handed-over batch pinned as one page-locked block (what the
training loader's pin-memory thread does for a CUDA device), and int8 feature maps dequantised on the device to the
CPU's float32 values exactly (a multiply and an add, each rounded, no fused multiply-add)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cuda_helpers import cuda_devices, on_cuda
from torch.utils.data import DataLoader

from distillbev.pipeline.cache.quantize import QuantizedFeatures, quantize_per_channel
from distillbev.pipeline.data.handover import HandedOverBatch
from distillbev.pipeline.distill.targets import TargetsBatch

pytestmark = pytest.mark.cuda


@pytest.fixture(params=cuda_devices())
def device(request) -> str:
    if not on_cuda(request.param):
        pytest.skip("page-locked memory and device arithmetic need a CUDA device")
    return request.param


def stored_maps(seed: int = 0) -> QuantizedFeatures:
    """(2, 64, 32, 32) int8 maps of ReLU'd random features with their (2, 64) scales and offsets."""
    rng = np.random.default_rng(seed)
    parts = [quantize_per_channel(np.maximum(rng.standard_normal((64, 32, 32)).astype(np.float32), 0), 0.03)
             for _ in range(2)]
    return QuantizedFeatures.stack([QuantizedFeatures.from_numpy(*part) for part in parts])


def test_int8_maps_dequantise_on_the_device_to_the_cpus_values(device):
    stored = stored_maps()
    on_device = stored.to(device).dequantize()
    assert on_device.device.type == "cuda" and on_device.dtype == torch.float32
    assert torch.equal(on_device.cpu(), stored.dequantize())


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return index


def _collate(indices: list[int]) -> HandedOverBatch:
    return HandedOverBatch((torch.full((3, 4), float(indices[0])), TargetsBatch({"neck": stored_maps()}, None, None)))


def test_a_pinned_loader_hands_over_page_locked_batches(device):
    loader = DataLoader(_Batches(), batch_size=1, num_workers=1, collate_fn=_collate, pin_memory=True)
    for index, (batch, targets) in enumerate(loader):
        features = targets.features["neck"]
        assert isinstance(features, QuantizedFeatures)
        for tensor in (batch, features.values, features.scale, features.offset):
            assert tensor.is_pinned()
        assert float(batch[0, 0]) == index
        moved = targets.to(device).dequantized()
        assert torch.equal(moved.features["neck"].cpu(), stored_maps().dequantize())

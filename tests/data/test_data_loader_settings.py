"""How a training loader hands batches to the device, against hand-computed expectations: the `auto` worker count
from the cores of a rank, the shared-memory check (its free-space probe monkeypatched) and its error, the stored int8
form of a feature map and its dequantisation, the bytes of a batch's block, and the pinning switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillbev.pipeline.cache.quantize import QuantizedFeatures, dequantize_per_channel, quantize_per_channel
from distillbev.pipeline.data import handover
from distillbev.pipeline.data.handover import (HandedOverBatch, block_bytes, check_shared_memory, loader_workers,
                                               share_one_block)
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.targets import TargetsBatch
from distillbev.pipeline.distill.train import train_loader
from distillbev.pipeline.errors import ConfigError

MIB = 2**20


@pytest.mark.parametrize("cores,ranks,expected", [(2, None, 1), (1, None, 0), (4, None, 3), (16, None, 8),
                                                  (64, None, 8), (16, "8", 1), (128, "8", 8), (16, "2", 7)])
def test_auto_workers_follow_the_cores_of_a_rank(monkeypatch, cores, ranks, expected):
    """min(8, cores // ranks on the node - 1), never below 0."""
    monkeypatch.setattr(handover, "available_cores", lambda: cores)
    if ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    assert loader_workers("auto") == expected


def test_an_explicit_worker_count_is_kept(monkeypatch):
    monkeypatch.setattr(handover, "available_cores", lambda: 64)
    assert [loader_workers(count) for count in (0, 1, 3, 12)] == [0, 1, 3, 12]


def test_the_default_worker_count_is_auto():
    assert StudentExperimentConfig().train.num_workers == "auto"


def free_space(monkeypatch, mib: float) -> None:
    monkeypatch.setattr(handover, "shared_memory_free", lambda path=handover.SHARED_MEMORY: int(mib * MIB))


def test_batches_that_fit_in_shared_memory_pass(monkeypatch):
    free_space(monkeypatch, 64)
    # 2 workers x prefetch 2 + 1 being taken = 5 batches of 10 MiB
    assert check_shared_memory(10 * MIB, workers=2, prefetch_factor=2, ranks=1) == 50 * MIB
    assert check_shared_memory(10 * MIB, workers=0, prefetch_factor=2, ranks=1) == 0  # no workers: no shm


def test_docker_default_shared_memory_is_refused_with_the_shm_size_to_pass(monkeypatch):
    """Docker's default 64 MB /dev/shm against 8 workers x 2 + 1 batches of 38 MiB, on each of 8 ranks."""
    free_space(monkeypatch, 64)
    with pytest.raises(ConfigError) as raised:
        check_shared_memory(38 * MIB, workers=8, prefetch_factor=2, ranks=8)
    message = str(raised.value)
    needed = 38 * 17 * 8  # MiB: 5168 MiB, under 16 GiB with room to spare, so --shm-size=16g
    assert "--shm-size=16g" in message and f"hold {needed} MiB" in message and "64 MiB free" in message
    assert "8 ranks" in message and "train.num_workers" in message and "/dev/shm" in message


def test_ranks_default_to_the_ranks_on_the_node(monkeypatch):
    free_space(monkeypatch, 1024)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert check_shared_memory(MIB, workers=1, prefetch_factor=2) == 3 * 4 * MIB


def test_no_shared_memory_file_system_is_not_checked(monkeypatch):
    monkeypatch.setattr(handover, "shared_memory_free", lambda path=handover.SHARED_MEMORY: None)
    assert check_shared_memory(10**12, workers=8, prefetch_factor=2, ranks=1) == 10**12 * 17


def test_quantized_features_dequantise_to_the_readers_float32_values():
    rng = np.random.default_rng(0)
    maps = np.maximum(rng.standard_normal((5, 7, 9)).astype(np.float32) * 3, 0)
    q, scale, offset = quantize_per_channel(maps, error=0.03)
    stored = QuantizedFeatures.from_numpy(q, scale, offset)
    assert stored.values.dtype == torch.int8 and stored.shape == (5, 7, 9)
    assert torch.equal(stored.dequantize(), torch.from_numpy(dequantize_per_channel(q, scale, offset)))
    batch = QuantizedFeatures.stack([stored, stored])
    assert batch.values.shape == (2, 5, 7, 9) and batch.scale.shape == (2, 5)
    assert torch.equal(batch.dequantize()[1], stored.dequantize())


def test_a_targets_batch_dequantises_only_int8_maps():
    values = torch.tensor([[[[-128, 0], [1, 127]]]], dtype=torch.int8)  # (B=1, C=1, 2, 2)
    stored = QuantizedFeatures(values, torch.tensor([[0.5]]), torch.tensor([[64.0]]))
    floats = torch.ones(1, 1, 2, 2)
    targets = TargetsBatch({"int8": stored, "float": floats}, None, None).dequantized()
    assert torch.equal(targets.features["int8"], torch.tensor([[[[0.0, 64.0], [64.5, 127.5]]]]))
    assert targets.features["float"] is floats
    plain = TargetsBatch({"float": floats}, None, None)
    assert plain.dequantized() is plain


def test_block_bytes_align_every_tensor_to_a_cache_line():
    stored = QuantizedFeatures(torch.zeros(2, 3, 4, 4, dtype=torch.int8), torch.zeros(2, 3), torch.zeros(2, 3))
    tree = (torch.zeros(10), {"maps": stored})  # 40 B -> 64; 96 B -> 128; 24 B -> 64 twice
    assert block_bytes(tree) == 64 + 128 + 64 + 64
    shared = share_one_block(tree, shared=False)
    assert isinstance(shared[1]["maps"], QuantizedFeatures) and shared[1]["maps"].values.dtype == torch.int8
    assert shared[0].untyped_storage().nbytes() == block_bytes(tree)


def test_a_handed_over_batch_unpacks_as_a_pair_and_can_be_pinned():
    pair = HandedOverBatch((torch.zeros(3), None))
    batch, targets = pair
    assert batch.shape == (3,) and targets is None
    assert callable(getattr(pair, "pin_memory"))  # what the DataLoader's pin-memory thread calls


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_the_train_loader_pins_its_batches_for_a_cuda_device(device, pinned):
    cfg = StudentExperimentConfig()
    loader = train_loader(cfg, list(range(16)), epoch=0, device=torch.device(device), workers=0)
    assert loader.pin_memory is pinned and loader.num_workers == 0


def test_the_train_loader_keeps_the_worker_count_and_prefetch():
    class Items(list):
        worker_start_method = None

    loader = train_loader(StudentExperimentConfig(), Items(range(16)), epoch=0, device=torch.device("cpu"), workers=2)
    assert loader.num_workers == 2 and loader.prefetch_factor == 2


def test_the_teacher_loader_follows_the_cores_and_pins_on_cuda(monkeypatch):
    from distillbev.pipeline.teacher.config import TeacherTrainConfig
    from distillbev.pipeline.teacher.train import _make_loader

    monkeypatch.setattr(handover, "available_cores", lambda: 5)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert TeacherTrainConfig().num_workers == "auto"
    on_cuda = _make_loader(list(range(4)), 2, True, "auto", 0, list, "cuda:0")
    on_cpu = _make_loader(list(range(4)), 2, True, 0, 0, list, "cpu")
    assert (on_cuda.num_workers, on_cuda.pin_memory) == (4, True)
    assert (on_cpu.num_workers, on_cpu.pin_memory) == (0, False)
    with pytest.raises(ValueError, match="num_workers: expected auto or a number >= 0"):
        TeacherTrainConfig(num_workers=-1)


def test_a_pinned_teacher_batch_pins_every_tensor(monkeypatch):
    from distillbev.pipeline.data.types import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: pinned.append(tuple(self.shape)) or self)
    batch = Batch(sample_tokens=["a", "b"], points=[torch.zeros(3, 5), torch.zeros(4, 5)],
                  gt_boxes=[torch.zeros(1, 9), torch.zeros(0, 9)], gt_labels=[torch.zeros(1), torch.zeros(0)],
                  gt_attributes=[torch.zeros(1), torch.zeros(0)], bev_aug=torch.eye(4).expand(2, 4, 4),
                  lidar_to_ego=[np.eye(4)] * 2, ego_to_global=[np.eye(4)] * 2)
    out = batch.pin_memory()
    assert isinstance(out, Batch) and out.sample_tokens == ["a", "b"] and out.lidar_to_ego is batch.lidar_to_ego
    assert sorted(pinned) == sorted([(3, 5), (4, 5), (1, 9), (0, 9), (1,), (0,), (1,), (0,), (2, 4, 4)])

"""The int8 handover on the tiny synthetic world (test_distill_equivalence.py) with an int8 cache: a batch that
crosses a DataLoader worker's boundary with the features in their stored int8 form (values, per-channel scale and
offset) and is dequantised in the training step gives the same targets and loss terms as the batch whose features
the worker dequantised to float32, in a quarter of the feature bytes; and the loader's shared-memory check sees
that batch's bytes.
"""

from __future__ import annotations

import pytest
import torch
from test_distill_equivalence import TinyWorld, build_tiny_world, student_loss_parts
from torch.utils.data import DataLoader

from distillbev.pipeline.cache.quantize import QuantizedFeatures
from distillbev.pipeline.data import handover
from distillbev.pipeline.data.handover import ALIGNMENT, block_bytes
from distillbev.pipeline.distill.targets import DistillationDataset, collate_with_targets, step_precompute
from distillbev.pipeline.distill.train import DistillationSetup, check_loader_memory, training_step
from distillbev.pipeline.errors import ConfigError

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-6  # relative; on the CPU both paths dequantise with the same float32 multiply and add


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("int8_handover"), views=2, dtype="int8")


@pytest.fixture(scope="module")
def parts(world):
    cfg, student, distill_loss, cache, dataset = student_loss_parts(world)
    assert cache.manifest["storage"]["dtype"] == "int8"
    return cfg, student, distill_loss, cache, dataset


def train_set(parts, world, int8_handover: bool, precompute: bool, use_cached_attention: bool = True,
              epoch: int = 1) -> DistillationDataset:
    cfg, _, distill_loss, cache, dataset = parts
    pairs = DistillationDataset(dataset, mode="cache", cache=cache, seed=4, bev_extent=world.extent,
                                use_cached_attention=use_cached_attention, int8_handover=int8_handover,
                                precompute=step_precompute(distill_loss, cfg.model.head, cfg.model.head.grid)
                                if precompute else None)
    pairs.set_epoch(epoch)
    return pairs


def through_a_worker(pairs: DistillationDataset):
    """The first batch (B = 1) as a training loader's worker hands it over."""
    loader = DataLoader(pairs, batch_size=1, num_workers=1, collate_fn=collate_with_targets,
                        multiprocessing_context="fork")
    return next(iter(loader))


def feature_bytes(shape: torch.Size, element_size: int) -> int:
    count = 1
    for size in shape:
        count *= size
    return -(-count * element_size // ALIGNMENT) * ALIGNMENT


@pytest.mark.parametrize("precompute,use_cached_attention", [(True, True), (True, False), (False, True),
                                                             (False, False)])
def test_int8_features_dequantised_in_the_step_give_the_worker_dequantised_loss(parts, world, precompute,
                                                                                 use_cached_attention):
    cfg, student, distill_loss, _, _ = parts
    setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=None,
                              layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers])
    handed = {}
    for int8 in (False, True):
        handed[int8] = through_a_worker(train_set(parts, world, int8, precompute, use_cached_attention))
    (old_batch, old), (new_batch, new) = handed[False], handed[True]
    assert sorted(old.features) == sorted(new.features) == sorted({pair.teacher for pair in cfg.distill.layers})
    saved = 0
    for name, floats in old.features.items():
        quantized = new.features[name]
        assert isinstance(quantized, QuantizedFeatures) and floats.dtype == torch.float32
        assert quantized.values.dtype == torch.int8 and quantized.values.shape == floats.shape
        assert quantized.scale.shape == quantized.offset.shape == floats.shape[:2]  # (B, C)
        assert torch.equal(quantized.dequantize(), floats), name  # the same float32 values, bit for bit
        saved += feature_bytes(floats.shape, 4) - feature_bytes(floats.shape, 1) - 2 * feature_bytes(
            quantized.scale.shape, 4)
    # everything else is handed over as before; each int8 map takes a quarter of its float32 bytes
    assert block_bytes(tuple(handed[False])) - block_bytes(tuple(handed[True])) == saved > 0
    with torch.no_grad():
        terms = {int8: training_step(setup, batch, targets, cfg.model.head.grid)
                 for int8, (batch, targets) in handed.items()}
    assert set(terms[True]) == set(terms[False]) and "kd_neck_fp" in terms[True]
    for name, value in terms[False].items():
        expected, found = float(value), float(terms[True][name])
        assert abs(found - expected) <= LOSS_TOLERANCE * abs(expected), (name, found, expected)


def test_a_batch_of_two_views_stacks_the_int8_maps_and_their_scales(parts, world):
    """Two sample-views collated (the train split has one sample: the first epochs that replay view 0 and view 1)."""
    by_view = {}
    for epoch in range(16):
        sample, item = train_set(parts, world, True, precompute=True, epoch=epoch)[0]
        by_view.setdefault(sample.view_index, (sample, item))
    assert sorted(by_view) == [0, 1]
    items = [by_view[0], by_view[1]]
    _, targets = collate_with_targets(items)
    for name, quantized in targets.features.items():
        assert quantized.values.shape[0] == 2 and quantized.scale.shape[0] == 2
        for row, (_, item) in enumerate(items):
            assert torch.equal(quantized.values[row], item.features[name].values)
            assert torch.equal(quantized.dequantize()[row], item.features[name].dequantize())
    assert targets.dequantized().features[name].dtype == torch.float32


def test_the_shared_memory_check_sees_the_handed_over_batch(parts, world, monkeypatch):
    cfg, *_ = parts
    pairs = train_set(parts, world, True, precompute=True)
    batch_bytes = block_bytes(tuple(collate_with_targets([pairs[0]] * cfg.train.batch_size)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(handover, "shared_memory_free", lambda path=handover.SHARED_MEMORY: 10 * batch_bytes)
    # 2 workers x prefetch 2, +1 being taken: 5 batches fit in 10
    assert check_loader_memory(cfg, pairs, workers=2) == 5 * batch_bytes
    assert check_loader_memory(cfg, pairs, workers=0) == 0
    monkeypatch.setattr(handover, "shared_memory_free", lambda path=handover.SHARED_MEMORY: 4 * batch_bytes)
    with pytest.raises(ConfigError, match="--shm-size") as raised:
        check_loader_memory(cfg, pairs, workers=2)
    assert "train.num_workers" in str(raised.value) and "/dev/shm" in str(raised.value)

"""The DataLoader workers' part of the DistillBEV loss on the tiny synthetic world (test_distill_equivalence.py).

- Per sample, what `DistillationDataset` precomputes (region masks and scales, the GT heatmap of the FP rule) equals
  what the rules give on the view the sample replays: the sample's boxes rebuilt with `dataset.get` under the cached
  view's BEV augmentation, and that view's cached teacher heatmap.
- A training step fed those worker inputs gives the loss terms of the step that computes everything itself, to 1e-6,
  for cached targets (cached attention, or attention recomputed at the run's temperature in the worker), for the
  identity view's maps warped into a fresh augmentation, and for the live teacher (where the workers give only the
  GT-only parts).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distill_equivalence import TinyWorld, build_tiny_world, student_loss_parts

from distillbev.pipeline.config import to_dict
from distillbev.pipeline.distill.run import build_distill_loss, live_teacher
from distillbev.pipeline.distill.targets import DistillationDataset, collate_with_targets, step_precompute
from distillbev.pipeline.distill.train import DistillationSetup, false_positive_gt_heatmap, training_step
from distillbev.pipeline.losses.regions import build_region_masks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("distill_precompute"), views=2)


@pytest.fixture(scope="module")
def parts(world):
    """The student config, a student, its loss, the cache and the train split (one sample)."""
    return student_loss_parts(world)


def distill_set(parts, world, mode, precompute: bool, **kwargs) -> DistillationDataset:
    cfg, _, distill_loss, cache, dataset = parts
    return DistillationDataset(dataset, mode=mode, cache=cache if mode in ("cache", "approximate") else None, seed=4,
                               bev_extent=world.extent, **kwargs,
                               precompute=step_precompute(distill_loss, cfg.model.head, cfg.model.head.grid)
                               if precompute else None)


def test_worker_inputs_are_those_of_the_replayed_view(parts, world):
    cfg, _, distill_loss, cache, dataset = parts
    train_set = distill_set(parts, world, "cache", precompute=True)
    index = cache.index_of(dataset.sample_tokens[0])
    views_seen = set()
    for epoch in range(8):
        train_set.set_epoch(epoch)
        sample, item = train_set[0]
        view = sample.view_index
        views_seen.add(view)
        augmentation = cache.bev_aug(index, view)
        np.testing.assert_allclose(np.asarray(sample.bev_aug, dtype=np.float64), augmentation.matrix(), atol=1e-6)
        replayed = dataset.get(0, bev_aug=augmentation, with_images=False)
        torch.testing.assert_close(sample.gt_boxes, replayed.gt_boxes, rtol=0, atol=0)
        gt_max = false_positive_gt_heatmap([replayed.gt_boxes], [replayed.gt_labels], cfg.model.head,
                                           cfg.model.head.grid)
        assert torch.equal(item.precomputed.gt_heatmap_max, gt_max)
        heatmap = cache.read(index, view).heatmap[None]
        for pair in distill_loss.pairs:
            grid = distill_loss.layers[pair.name].teacher_shape
            with_fp = distill_loss.uses_false_positive(pair)
            expected = build_region_masks([replayed.gt_boxes], grid, world.extent, device="cpu",
                                          teacher_heatmap=heatmap if with_fp else None,
                                          gt_heatmap_max=gt_max if with_fp else None)
            got = item.precomputed.layers[pair.name].regions
            for field in ("foreground", "background", "false_positive", "scale", "background_scale",
                          "false_positive_scale"):
                want = getattr(expected, field)
                assert (want is None) == (getattr(got, field) is None), (pair.name, field)
                if want is not None:
                    assert torch.equal(getattr(got, field), want), (pair.name, field, view)
            assert int(got.foreground.sum()) > 0  # the sample has boxes on every grid
    assert views_seen == {0, 1}  # the identity view and the augmented one
    assert not cache.bev_aug(index, 1).is_identity


def test_workers_read_only_the_distilled_layers_and_drop_the_heatmap(parts, world, monkeypatch):
    _, _, distill_loss, cache, _ = parts
    asked = []
    read = cache.read
    monkeypatch.setattr(cache, "read", lambda *where, layers=None, **options: asked.append(layers)
                        or read(*where, layers=layers, **options))
    sample, item = distill_set(parts, world, "cache", precompute=True)[0]
    teachers = sorted({pair.teacher for pair in distill_loss.pairs})
    assert asked == [teachers] and sorted(item.features) == teachers
    assert item.heatmap is None  # every layer's masks, the FP region's too, were built in the worker
    _, without = distill_set(parts, world, "cache", precompute=False)[0]
    assert asked[-1] is None and without.heatmap is not None  # the step builds the masks: it needs the heatmap


@pytest.mark.parametrize("mode,use_cached_attention", [("cache", True), ("cache", False), ("approximate", True),
                                                      ("online", True)])
def test_a_step_with_worker_inputs_gives_the_in_step_loss(parts, world, mode, use_cached_attention):
    cfg, student, distill_loss, _, _ = parts
    teacher = None
    if mode == "online":
        teacher = live_teacher(to_dict(world.teacher_config.model), world.checkpoint, torch.device("cpu"))
    setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=teacher,
                              layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers])
    results = {}
    for precompute in (False, True):
        train_set = distill_set(parts, world, mode, precompute, use_cached_attention=use_cached_attention)
        train_set.set_epoch(1)
        batch, targets = collate_with_targets([train_set[0]])
        assert (targets is not None and targets.precomputed is not None) == precompute
        if precompute and mode != "online":
            assert targets.attention is not None  # cached, or computed in the worker (from the warped maps)
        with torch.no_grad():
            results[precompute] = training_step(setup, batch, targets, cfg.model.head.grid)
    in_step, worker = results[False], results[True]
    assert set(in_step) == set(worker)
    assert "kd_neck_fp" in in_step
    for name, value in in_step.items():
        if name.startswith("kd_"):
            assert abs(float(worker[name]) - float(value)) <= 1e-6 * abs(float(value)), name
        else:  # the detection terms see the same batch
            assert float(worker[name]) == float(value), name


def test_train_adapter_precision_sets_the_adapters_arithmetic_in_a_bf16_step(parts, world):
    """A bf16 student step hands its bf16 features to the loss: with `train.adapter_precision` fp32 (the default)
    the adapters convolve their float32 copy, with bf16 the bf16 features themselves; the kd terms are float32."""
    import dataclasses

    cfg, student, _, cache, _ = parts
    assert cfg.train.adapter_precision == "fp32"
    train_set = distill_set(parts, world, "cache", precompute=True)
    train_set.set_epoch(1)
    batch, targets = collate_with_targets([train_set[0]])
    for adapter_precision in ("fp32", "bf16"):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, adapter_precision=adapter_precision))
        loss = build_distill_loss(run_cfg, student, cache.manifest["layers"])
        assert loss.precision == adapter_precision
        seen = []
        hooks = [module.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
                 for module in loss.modules() if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)]
        setup = DistillationSetup(student=student, distill_loss=loss, teacher=None, precision="bf16",
                                  layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers])
        with torch.no_grad():
            terms = training_step(setup, batch, targets, cfg.model.head.grid)
        for hook in hooks:
            hook.remove()
        expected = torch.float32 if adapter_precision == "fp32" else torch.bfloat16
        assert seen and set(seen) == {expected}
        kd_terms = [value for name, value in terms.items() if name.startswith("kd_")]
        assert kd_terms and all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in kd_terms)

"""The BEVFormer student distilled from a cached CenterPoint teacher: one training step on the tiny synthetic world
(tests/distill/test_distill_equivalence.py) has finite losses and the KD terms of exactly one pair, and a short
`train_student` run trains from the cache, skips the head inheritance and writes a devkit evaluation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_distill_equivalence import HALF_EXTENT, TinyWorld, build_tiny_world, tiny_student_config

from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.config import to_dict
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import build_distill_loss, live_teacher, train_student
from distillbev.pipeline.distill.targets import DistillationDataset, collate_with_targets
from distillbev.pipeline.distill.train import DistillationSetup, training_step
from distillbev.pipeline.geometry.bev import BEVRange
from distillbev.pipeline.heads.detr.config import BEVFormerHeadConfig
from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig
from distillbev.pipeline.student.bevformer.config import BEVFormerConfig, BEVFormerEncoderConfig
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.student.config import ImageBackboneConfig, StudentModelConfig
from distillbev.pipeline.teacher.config import TeacherDecoderConfig

pytestmark = pytest.mark.slow


TINY_HEAD = BEVFormerHeadConfig(num_queries=20, num_layers=2, num_heads=2, num_points=2, feedforward_channels=32,
                                post_center_range=(-20.0, -20.0, -10.0, 20.0, 20.0, 10.0))


def tiny_bevformer_config(world: TinyWorld) -> StudentExperimentConfig:
    """A tiny BEVFormer on the tiny world's 64x192 images, BEV 40x40 at 0.8 m = the tiny teacher's pre-head grid, with
    DistillBEV's BEVFormer recipe (one neck pair, 1x1 conv, teacher attention, no FP)."""
    base = tiny_student_config(world.dataroot)
    bev = BEVRange(-HALF_EXTENT, HALF_EXTENT, -HALF_EXTENT, HALF_EXTENT, 0.8, -5.0, 3.0)
    transformer = BEVFormerConfig(
        embed_dims=16, bev=bev,
        encoder=BEVFormerEncoderConfig(num_layers=1, num_heads=2, num_levels=2, spatial_points=2, temporal_points=2,
                                       num_z_anchors=2, feedforward_channels=32),
        head=TINY_HEAD)
    model = StudentModelConfig(variant="bevformer", image_size=base.model.image_size,
                               backbone=ImageBackboneConfig(depth=18, width_multiplier=0.25), bev=bev,
                               head=base.model.head, bevformer=transformer)
    distill = DistillConfig(layers=[LayerPairConfig("neck", "neck", "conv1x1", False)], foreground_weight=5e-3,
                            background_weight=4e-3, false_positive_weight=0.0, false_positive=False,
                            spatial_l1_weight=5e-4, student_attention_ratio=0.0)
    train = dataclasses.replace(base.train, epochs=1, batch_size=1, num_workers=0, warmup_iters=1)
    return dataclasses.replace(base, model=model, distill=distill, train=train)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("bevformer_distill"), views=2)


@pytest.fixture(scope="module")
def decoder_world(tmp_path_factory) -> TinyWorld:
    """A teacher with a DETR decoder of the tiny student's head shapes; its cache holds neck and bev_embed."""
    return build_tiny_world(tmp_path_factory.mktemp("bevformer_decoder"), views=2,
                            decoder=TeacherDecoderConfig(embed_dims=16, head=TINY_HEAD), layers="neck,bev_embed")


def test_a_distilled_step_has_finite_losses_and_the_terms_of_one_pair(world):
    cfg = tiny_bevformer_config(world)
    torch.manual_seed(0)
    student = build_student(cfg.model)
    cache = TeacherCache.open(world.cache_path)
    distill_loss = build_distill_loss(cfg, student, cache.manifest["layers"])
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="train")
    train_set = DistillationDataset(dataset, mode="cache", cache=cache, bev_extent=world.extent)
    batch, targets = collate_with_targets([train_set[0]])
    setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=None, layers=[("neck", "neck")])
    losses = training_step(setup, batch, targets, cfg.model.head.grid)
    kd = sorted(name for name in losses if name.startswith("kd_"))
    assert kd == ["kd_neck_bg", "kd_neck_fg", "kd_neck_spatial"]  # one pair, no FP region
    assert {"loss_cls", "loss_box", "d0.loss_cls", "d0.loss_box"} <= set(losses)
    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["kd_neck_bg"] > 0 and losses["kd_neck_spatial"] > 0
    sum(losses.values()).backward()
    assert distill_loss.layers["neck"].adapter.conv.weight.grad.abs().sum() > 0
    assert student.encoder.bev_queries.weight.grad.abs().sum() > 0


def test_train_student_distils_from_the_cache_and_evaluates_with_the_devkit(world, tmp_path, caplog):
    cfg = tiny_bevformer_config(world)
    assert cfg.inherit_teacher_head  # left on: the run must skip it for this student instead of failing
    out = tmp_path / "run"
    summary = train_student(cfg, out, cache_path=world.cache_path, teacher_checkpoint=world.checkpoint)
    assert "skipped for the BEVFormer student" in caplog.text
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 1  # one train sample at batch 1
    assert sorted(k for k in records[0] if k.startswith("kd_")) == ["kd_neck_bg", "kd_neck_fg", "kd_neck_spatial"]
    assert all(math.isfinite(v) for k, v in records[0].items() if isinstance(v, float))
    results = json.loads((out / "eval" / "results_nusc.json").read_text())["results"]
    val = NuScenesDetectionDataset(cfg.data, cfg.data.val_split, mode="test")
    assert sorted(results) == sorted(val.sample_tokens)
    # NMS-free decode: at most top-k over 20 queries x 10 classes per sample
    assert all(len(boxes) <= 200 for boxes in results.values()) and sum(map(len, results.values())) > 0
    assert 0.0 <= summary["mean_ap"] <= 1.0 and "tp_errors" in summary
    state = torch.load(out / "latest.pth", weights_only=False)
    assert any(key.startswith("encoder.") for key in state["state_dict"])


def test_two_torchrun_ranks_train_the_bevformer_student_through_ddp(world, tmp_path):
    """2 CPU ranks (gloo): the DDP wrapper of the student and the DistillBEV loss takes a step on each rank (the one
    train sample is padded to 2 positions, so each rank trains once at batch 1), the matched-box normaliser is
    all-reduced across them, and rank 0 writes the log and the evaluation."""
    import os
    import subprocess
    import sys

    from distillbev.pipeline.config import dump_config

    config = tmp_path / "student.yaml"
    dump_config(tiny_bevformer_config(world), config)
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "distillbev.cli"]
    result = subprocess.run([*launcher, "train-student", "--config", str(config), "--cache", str(world.cache_path),
                             "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 1 and all(math.isfinite(records[0][k]) for k in ("loss", "kd_neck_fg", "loss_cls"))
    assert (out / "eval" / "metrics_summary.json").is_file()


def test_a_decoder_teacher_caches_bev_embed_and_its_decoder(decoder_world):
    """bev_embed read back from the fp16 store is the live teacher's on view 1's cloud, and the cache's teacher head
    holds the decoder under `detr.` beside the CenterHead."""
    cache = TeacherCache.open(decoder_world.cache_path)
    assert cache.manifest["layers"]["bev_embed"]["channels"] == 16
    assert tuple(cache.manifest["layers"]["bev_embed"]["shape"]) == (40, 40)  # the head grid, 32 m / 0.8 m
    teacher = live_teacher(to_dict(decoder_world.teacher_config.model), decoder_world.checkpoint, torch.device("cpu"))
    dataset = NuScenesDetectionDataset(decoder_world.teacher_config.data, "synth_train", mode="test")
    sample = dataset.get(0, bev_aug=cache.bev_aug(0, 1), with_images=False)
    with torch.no_grad():
        live = teacher([sample.points]).features["bev_embed"][0]
    stored = cache.read(0, 1).features["bev_embed"]
    assert 0 < float((stored - live).abs().max()) <= float(live.abs().max()) * 2 ** -10
    head = cache.read_teacher_head()
    for key, value in teacher.pts_detr_head.state_dict().items():
        assert torch.equal(head["detr." + key], value), key
    assert any(key.startswith("task_heads.") for key in head)


def test_train_student_inherits_the_decoder_and_imitates_bev_embed(decoder_world, tmp_path, caplog):
    cfg = tiny_bevformer_config(decoder_world)
    cfg.distill.layers = [LayerPairConfig("neck", "bev_embed", "conv1x1", False)]
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        train_student(cfg, out, cache_path=decoder_world.cache_path, teacher_checkpoint=decoder_world.checkpoint)
    state = torch.load(decoder_world.checkpoint, weights_only=False)["state_dict"]
    inherited = [k for k in state if k.startswith(("pts_detr_head.class_branches.", "pts_detr_head.box_branches.",
                                                   "pts_detr_head.decoder."))]
    assert f"student head initialised from the teacher's ({len(inherited)} tensors)" in caplog.text
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sorted(k for k in records[0] if k.startswith("kd_")) == ["kd_neck_bev_embed_bg", "kd_neck_bev_embed_fg",
                                                                 "kd_neck_bev_embed_spatial"]
    assert all(math.isfinite(v) for k, v in records[0].items() if isinstance(v, float))

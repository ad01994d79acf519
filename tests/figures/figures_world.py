"""Helpers of the figures tests: the tiny synthetic world and the student config trained on it.

Imported by the figures tests as `figures_world` (a unique module name: tests/ has no packages)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from module_loader import load_tests_module

EPOCHS = 3
EVAL_EVERY = 2
ATTENTION_SAMPLES = 2


def tiny_module():
    """tests/distill/test_distill_equivalence.py: the tiny teacher and student configs (+-16 m, 40x40 head)."""
    return load_tests_module("distill/test_distill_equivalence.py")


@contextlib.contextmanager
def one_thread():
    """Train on one CPU thread: multi-threaded kernels may sum in another order from run to run (and the 2 cores
    are shared), so runs compared bit for bit need it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class World:
    dataroot: Path
    cache_path: Path
    folder: Path


def student_config(world: World, distilled: bool, epochs: int = EPOCHS, eval_every: int = EVAL_EVERY,
                   snapshots: bool = True):
    """The tiny BEVDet, batch 1 (3 steps per epoch), no workers; KD weights scaled like the synthetic configs."""
    cfg = tiny_module().tiny_student_config(world.dataroot)
    cfg.distillation = distilled
    cfg.train = dataclasses.replace(cfg.train, epochs=epochs, batch_size=1, num_workers=0, warmup_iters=2,
                                    lr=1e-3, eval_every=eval_every, attention_snapshots=snapshots,
                                    attention_samples=ATTENTION_SAMPLES)
    for name in ("foreground_weight", "background_weight", "false_positive_weight", "spatial_l1_weight"):
        setattr(cfg.distill, name, getattr(cfg.distill, name) * 0.01)
    return cfg


def build_world(folder: Path) -> World:
    """3 train and 3 val key frames (2 scenes), a random tiny teacher and its 2-view cache. World 1, like the cache
    tests' tiny world (tests/distill/test_distill_equivalence.py): the DDP test that shares it compares near-tied
    scores of a barely trained student between one and two processes."""
    from click.testing import CliRunner

    from distillbev.pipeline.config import dump_config
    from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
    from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
    from distillbev.pipeline.teacher.model import CenterPointTeacher
    from distillbev.stages.extract_teacher import command as extract_command

    module = tiny_module()
    dataroot = folder / "synthetic"
    generate_dataset(dataroot, SyntheticConfig.boxes(num_scenes=2, samples_per_scene=3, val_scenes=1,
                                                     sweeps_per_key_frame=module.NUM_SWEEPS, objects_per_scene=16,
                                                     visibility_range=20.0, lidar_azimuth_steps=512), progress=False)
    teacher_config = module.tiny_teacher_config(dataroot)
    dump_config(teacher_config, folder / "teacher.yaml")
    torch.manual_seed(0)
    checkpoint = save_teacher_checkpoint(CenterPointTeacher(teacher_config.model), folder / "teacher.pth",
                                         config=teacher_config.model)
    cache_path = folder / "cache.zarr"
    result = CliRunner().invoke(extract_command, [
        "--config", str(folder / "teacher.yaml"), "--dataroot", str(dataroot), "--checkpoint", str(checkpoint),
        "--cache", str(cache_path), "--split", "synth_train", "--views", "2", "--seed", "3",
        # fp16 targets: the DDP-evaluation test compares near-tied scores of a barely trained student, whose boxes
        # were chosen on fp16 targets (int8 targets train other weights and another tie order)
        "--dtype", "fp16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return World(dataroot, cache_path, folder)

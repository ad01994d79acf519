"""A checkpoint's SHA-256 is that of the bytes that were loaded: `train-teacher` replaces `latest.pth` every epoch,
so a hash taken by a second read could name the next epoch's file for this epoch's weights."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from module_loader import load_tests_module
from teacher_helpers import tiny_model_config

from distillbev.pipeline.teacher.checkpoint import (checkpoint_sha256, load_teacher_checkpoint,
                                                    save_teacher_checkpoint)
from distillbev.pipeline.teacher.model import CenterPointTeacher


def teacher(seed: int) -> CenterPointTeacher:
    torch.manual_seed(seed)
    return CenterPointTeacher(tiny_model_config()).eval()


def replace_after_load(monkeypatch, path, replacement) -> list[bytes]:
    """Make the next torch.load replace `path` by `replacement` (a save landing right after the load) and record
    the bytes `path` held when it was loaded."""
    real_load = torch.load
    loaded: list[bytes] = []

    def load_then_replace(*args, **kwargs):
        if not loaded and path.is_file():
            loaded.append(path.read_bytes())
            payload = real_load(*args, **kwargs)
            os.replace(replacement, path)
            return payload
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_then_replace)
    return loaded


def test_the_report_names_the_sha_of_the_bytes_that_were_loaded(tmp_path, monkeypatch):
    path = save_teacher_checkpoint(teacher(1), tmp_path / "latest.pth", tiny_model_config(), {"epoch": 1})
    next_epoch = save_teacher_checkpoint(teacher(2), tmp_path / "next.pth", tiny_model_config(), {"epoch": 2})
    loaded = replace_after_load(monkeypatch, path, next_epoch)
    target = teacher(3)
    report = load_teacher_checkpoint(target, path)
    assert len(loaded) == 1 and report.meta == {"epoch": 1}
    assert report.sha256 == hashlib.sha256(loaded[0]).hexdigest()
    assert checkpoint_sha256(path) != report.sha256  # the file on disk is the next epoch's now
    for name, tensor in teacher(1).state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


@pytest.mark.slow
def test_extract_teacher_records_the_sha_of_the_checkpoint_it_loaded(tmp_path, monkeypatch):
    """A tiny extraction whose checkpoint is replaced right after it was loaded: the store names the loaded one."""
    import zarr  # not in the mmdet3d venv, which collects tests/teacher

    world = load_tests_module("distill/test_distill_equivalence.py")
    folder = tmp_path / "world"
    folder.mkdir()
    next_epoch = tmp_path / "next.pth"
    torch.manual_seed(5)
    config = world.tiny_teacher_config(folder / "synthetic", "lidar").model
    save_teacher_checkpoint(CenterPointTeacher(config), next_epoch, config=config, meta={"epoch": 2})
    loaded = replace_after_load(monkeypatch, folder / "teacher.pth", next_epoch)
    built = world.build_tiny_world(folder, views=1)
    manifest = dict(zarr.open_group(str(built.cache_path), mode="r").attrs)
    assert len(loaded) == 1
    assert manifest["teacher"]["checkpoint_sha256"] == hashlib.sha256(loaded[0]).hexdigest()
    assert manifest["teacher"]["checkpoint_sha256"] != checkpoint_sha256(built.checkpoint)

"""train-student --verify-data: before step 1 the dataset's input files are re-hashed and compared with the bytes the
cache was extracted from (its input_digest), on a tiny synthetic world with a real extract-teacher store."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from module_loader import load_tests_module

from distillbev.cache_schemas import v2
from distillbev.cli import main
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.config import dump_config
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.distill.run import open_cache_targets
from distillbev.pipeline.distributed import World

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world (one train sample: a key frame and one sweep) and its one-view cache."""
    module = load_tests_module("distill/test_distill_equivalence.py")
    return module.build_tiny_world(tmp_path_factory.mktemp("verify_data"), views=1)


@pytest.fixture
def dataroot(world, tmp_path) -> Path:
    """A private copy of the world's dataroot, which a test may edit."""
    copy = tmp_path / "dataroot"
    shutil.copytree(world.dataroot, copy)
    return copy


def student_config(dataroot: Path):
    cfg = load_tests_module("distill/test_distill_equivalence.py").tiny_student_config(dataroot)
    cfg.train.num_workers, cfg.train.batch_size = 1, 1
    return cfg


def key_frame_of_the_train_sample(cfg) -> Path:
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="test")
    return Path(dataset.index.path(dataset.index.lidar, 0))


def permute_rows(path: Path) -> None:
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    points[::-1].copy().tofile(path)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `distillbev ARGV`."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_train_student_refuses_a_train_file_rewritten_with_the_same_size(world, dataroot, tmp_path, capsys):
    cfg = student_config(dataroot)
    config = tmp_path / "student.yaml"
    dump_config(cfg, config)
    key_frame = key_frame_of_the_train_sample(cfg)
    size = key_frame.stat().st_size
    permute_rows(key_frame)
    assert key_frame.stat().st_size == size  # the fingerprint (names, sizes, poses) cannot tell
    code, err = run(["train-student", "--config", str(config), "--cache", str(world.cache_path), "--out",
                     str(tmp_path / "run"), "--max-steps", "1"], capsys)  # the default: 32 random samples
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1, err
    token = TeacherCache.open(world.cache_path).sample_tokens[0]
    assert f"sample {token}: {key_frame}" in errors[0] and "extracted from" in errors[0]
    assert "--overwrite" in errors[0]
    assert not (tmp_path / "run" / "latest.pth").exists()


def test_unchanged_files_pass_and_the_log_states_what_was_hashed(world, dataroot, tmp_path, caplog):
    cfg = student_config(dataroot)
    with caplog.at_level(logging.INFO, logger="distillbev"):
        targets = open_cache_targets(cfg, world.cache_path, None, tmp_path, False, World(), "all")
    assert targets.cache is not None
    # one train sample: its key frame and its one sweep
    assert "--verify-data all: re-hashed the 2 input files" in caplog.text and "of 1 of 1 samples in" in caplog.text


def test_verify_data_none_and_a_store_without_digests_skip_the_comparison(world, dataroot, tmp_path, caplog):
    cfg = student_config(dataroot)
    permute_rows(key_frame_of_the_train_sample(cfg))
    with caplog.at_level(logging.INFO, logger="distillbev"):
        open_cache_targets(cfg, world.cache_path, None, tmp_path, False, World(), "none")
    assert "--verify-data none: the dataset's files are not compared" in caplog.text
    old = tmp_path / "old.zarr"
    shutil.copytree(world.cache_path, old)
    shutil.rmtree(old / v2.INPUT_DIGEST)  # a store created before input digests were recorded
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distillbev"):
        open_cache_targets(cfg, old, None, tmp_path, False, World(), "all")
    assert "no input_digest array, the dataset's files cannot be compared" in caplog.text


def test_a_verify_data_value_that_is_not_all_none_or_a_count_is_refused(world, tmp_path, capsys):
    code, err = run(["train-student", "--config", str(tmp_path / "any.yaml"), "--out", str(tmp_path / "run"),
                     "--verify-data", "some"], capsys)
    assert code == 2 and any("expected all, none or a positive number of samples" in line for line in err)

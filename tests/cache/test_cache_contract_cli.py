"""The cache contract at the command line, on a tiny synthetic dataroot with the real extract-teacher stage.

Each fault gives exactly one `error:` line (no traceback) naming what is wrong and what to run, deletes nothing
good, and the named repair ends in a store whose chunks equal a clean extraction's, byte for byte.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from module_loader import load_tests_module

from distillbev.cli import main
from distillbev.pipeline.config import dump_config
from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
from distillbev.pipeline.teacher.model import CenterPointTeacher

pytestmark = pytest.mark.slow

NOT_CHUNKS = ("zarr.json", "distillbev_cache.json", "distillbev.lock")


def _equivalence_module():
    """tests/distill/test_distill_equivalence.py: its tiny world (dataroot, random teacher, configs)."""
    return load_tests_module("distill/test_distill_equivalence.py")


def chunks_of(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name not in NOT_CHUNKS}


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of `distillbev ARGV` as the console script runs it."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def error_line(stderr: list[str]) -> str:
    errors = [line for line in stderr if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(stderr), stderr
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The dataroot, a random teacher checkpoint and its config, and the extract-teacher argv of a clean store."""
    module = _equivalence_module()
    folder = tmp_path_factory.mktemp("contract")
    world = module.build_tiny_world(folder, views=2)
    config_path = folder / "teacher.yaml"
    argv = ["extract-teacher", "--config", str(config_path), "--dataroot", str(world.dataroot), "--checkpoint",
            str(world.checkpoint), "--split", "synth_train", "--views", "2", "--seed", "3", "--dtype", "fp16"]
    return world, argv, chunks_of(world.cache_path)


@pytest.fixture
def store(world, tmp_path):
    """A private copy of the clean store."""
    copy = tmp_path / "cache.zarr"
    shutil.copytree(world[0].cache_path, copy)
    return copy


def test_verify_names_the_repair_command_and_it_restores_the_exact_store(world, store, capsys):
    _, argv, clean = world
    feature = next(p for p in sorted((store / "features" / "neck" / "c").rglob("*")) if p.is_file())
    data = bytearray(feature.read_bytes())
    data[-9] ^= 0x10
    feature.write_bytes(bytes(data))
    # the store was extracted under another path: the recorded command names that one; use this store's
    code, out, err = run(["inspect-cache", str(store), "--verify"], capsys)
    line = error_line(err)
    assert code == 1 and "1 problems in 1 sample-views" in line and "--repair" in line
    assert "features/neck: CRC32C checksum mismatch" in out
    repair = shlex.split(line.split("`")[1])
    assert repair[:2] == ["distillbev", "extract-teacher"] and repair[-1] == "--repair"
    repair[repair.index("--cache") + 1] = str(store)
    code, out, err = run(repair[1:], capsys)
    assert code == 0 and "re-extracted 1 damaged sample-views" in out, err
    assert chunks_of(store) == clean
    code, out, _ = run(["inspect-cache", str(store), "--verify"], capsys)
    assert code == 0 and "verify: OK" in out


def test_deleted_chunk_is_redone_by_the_same_command(world, store, capsys):
    _, argv, clean = world
    next(p for p in sorted((store / "heatmap" / "c").rglob("*")) if p.is_file()).unlink()
    code, out, err = run([*argv, "--cache", str(store)], capsys)
    assert code == 0 and "re-extracted 1 damaged sample-views" in out, err
    assert chunks_of(store) == clean


def test_moved_dataroot_is_accepted_and_an_edited_one_refused_before_anything_is_written(world, store, tmp_path,
                                                                                         capsys):
    _, argv, clean = world
    moved = tmp_path / "moved_dataroot"
    shutil.copytree(world[0].dataroot, moved)
    at = argv.index("--dataroot") + 1
    moved_argv = [*argv[:at], str(moved), *argv[at + 1:], "--cache", str(store)]
    code, out, err = run(moved_argv, capsys)
    assert code == 0 and "already complete" in out, err
    poses_path = next(moved.glob("v1.0-*/ego_pose.json"))
    poses = json.loads(poses_path.read_text())
    poses[0]["translation"][0] += 0.25  # the same tokens, another trajectory: the teacher would see other points
    poses_path.write_text(json.dumps(poses))
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.name != "distillbev.lock"}
    code, _, err = run(moved_argv, capsys)
    line = error_line(err)
    assert code == 1 and "dataset.fingerprint: " in line and "nothing was changed" in line
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.name != "distillbev.lock"} == stamps
    assert chunks_of(store) == clean


def test_preflight_reports_every_bad_input_before_any_compute(world, tmp_path, capsys):
    _, argv, _ = world
    broken = tmp_path / "broken_dataroot"
    shutil.copytree(world[0].dataroot, broken)
    key_frames = sorted((broken / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))
    sweep = sorted((broken / "sweeps" / "LIDAR_TOP").glob("*.pcd.bin"))[0]
    for frame in key_frames:
        frame.unlink()
    sweep.write_bytes(sweep.read_bytes()[:-3])
    cache = tmp_path / "never.zarr"
    at = argv.index("--dataroot") + 1
    code, _, err = run([*argv[:at], str(broken), *argv[at + 1:], "--cache", str(cache)], capsys)
    line = error_line(err)
    assert code == 1 and line.startswith("error: pre-flight found ") and "nothing was computed or written" in line
    # the split's one key frame is gone and one of its sweeps is cut: both named, in one line
    assert "found 2 problems" in line and sum(frame.name in line for frame in key_frames) == 1
    assert f"{sweep}: {sweep.stat().st_size} bytes" in line and "expected a positive multiple of 20" in line
    assert not cache.exists()
    table = next(broken.glob("v1.0-*/sample_annotation.json"))
    table.write_text(table.read_text()[:-100])
    code, _, err = run([*argv[:at], str(broken), *argv[at + 1:], "--cache", str(cache)], capsys)
    assert code == 1 and "sample_annotation.json: not valid JSON" in error_line(err)


def _student_argv(world, folder: Path, cache: Path, checkpoint: Path | None = None) -> list[str]:
    module = _equivalence_module()
    cfg = module.tiny_student_config(world.dataroot)
    cfg.train.num_workers = 1
    cfg.train.batch_size = 1
    config = folder / "student.yaml"
    dump_config(cfg, config)
    return ["train-student", "--config", str(config), "--cache", str(cache), "--out", str(folder / "run"),
            "--max-steps", "1", "--teacher-checkpoint", str(checkpoint or world.checkpoint)]


def test_training_on_a_damaged_store_stops_with_one_line_naming_the_chunk(world, store, tmp_path, capsys):
    for view in (0, 1):  # every view of the one training sample: whichever the loader draws is missing
        (store / "attention" / "neck" / "c" / "0" / str(view) / "0" / "0").unlink()
    code, _, err = run(_student_argv(world[0], tmp_path, store), capsys)
    line = error_line(err)
    assert code == 1 and "attention/neck: chunk missing" in line and "sample " in line and "--repair" in line


def test_training_refuses_another_teacher_or_dataset_before_step_one(world, store, tmp_path, capsys):
    torch.manual_seed(1)
    other = save_teacher_checkpoint(CenterPointTeacher(world[0].teacher_config.model), tmp_path / "other.pth",
                                    config=world[0].teacher_config.model)
    code, _, err = run(_student_argv(world[0], tmp_path, store, checkpoint=other), capsys)
    line = error_line(err)
    assert code == 1 and "teacher.checkpoint_sha256: " in line and not (tmp_path / "run" / "latest.pth").exists()


def test_extract_teacher_under_torchrun_equals_one_process(world, tmp_path):
    import subprocess

    _, argv, clean = world
    store = tmp_path / "ranks.zarr"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "distillbev.cli", *argv, "--cache", str(store)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("complete: 2 sample-views") == 1  # rank 0 alone reports
    assert chunks_of(store) == clean
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "distillbev.cli", *argv, "--cache", str(store), "--workers", "2"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "under torchrun every rank is one extraction process" in refused.stderr

"""A resume or repair computes sample-views beside stored ones, so `extract-teacher` refuses one whose compute
settings (device, precision, TF32, batch size, threads, torch) differ from those the store records, naming each and
--allow-settings-change, before anything is written; a plain rerun of a complete store computes nothing and is not
refused."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_cache_stage import CONFIG

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.manifest import manifest_diff, settings_changes
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.state import read_done, read_manifest
from distillbev.pipeline.cache.writer import set_done, set_status
from distillbev.pipeline.errors import CacheError

BATCH = "batch size (--batch-size)"
THREADS = "threads per extraction process (OMP_NUM_THREADS / --workers)"


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    folder = tmp_path_factory.mktemp("teacher")
    config_path = folder / "teacher.yaml"
    config_path.write_text(CONFIG)
    torch.manual_seed(0)
    checkpoint = folder / "teacher.pth"
    torch.save(CenterPointTeacher(load_config(TeacherExperimentConfig, config_path).model).state_dict(), checkpoint)
    return config_path, checkpoint


@pytest.fixture
def threads():
    """Set this process's torch threads for one test (the extraction records and uses them)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def extract(tiny_slice, teacher_files, store, *extra: str):
    from distillbev.stages.extract_teacher import command

    config_path, checkpoint = teacher_files
    return CliRunner().invoke(command, ["--config", str(config_path), "--dataroot", str(tiny_slice.dataroot),
                                        "--checkpoint", str(checkpoint), "--cache", str(store), "--split",
                                        "tiny_train", "--views", "2", "--dtype", "fp16", *extra])


def files_of(store) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "distillbev.lock"}


@pytest.mark.slow
def test_a_resume_with_another_batch_size_is_refused_unless_allowed(tmp_path, tiny_slice, teacher_files, threads,
                                                                     caplog):
    threads(1)
    store = tmp_path / "cache.zarr"
    result = extract(tiny_slice, teacher_files, store)
    assert result.exit_code == 0, result.output + repr(result.exception)
    recorded = read_manifest(store)["extraction"]
    assert recorded["batch_size"] == 1 and recorded["threads"] == 1 and recorded["workers"] == 1
    assert recorded["device"] == "cpu" and recorded["precision"] == "fp32" and recorded["tf32"] is None
    assert recorded["device_model"] == torch.backends.cpu.get_cpu_capability()
    assert recorded["matmul_precision"] == torch.get_float32_matmul_precision()
    set_status(store, v2.STATUS_WRITING)  # as if killed before its last sample-view
    set_done(store, [(1, 1)], 0)
    before = files_of(store)

    refused = extract(tiny_slice, teacher_files, store, "--batch-size", "2")
    assert isinstance(refused.exception, CacheError), refused.output
    text = str(refused.exception)
    assert "resuming would compute sample-views with other settings than the store's" in text
    assert f"(recorded -> now: {BATCH}: 1 -> 2)" in text
    assert "--allow-settings-change" in text and "nothing was changed" in text
    assert files_of(store) == before  # not even the generation changed

    caplog.set_level("WARNING")
    allowed = extract(tiny_slice, teacher_files, store, "--batch-size", "2", "--allow-settings-change")
    assert allowed.exit_code == 0, allowed.output + repr(allowed.exception)
    assert "complete: 4 sample-views (2 samples x 2 views), 1 written, 3 resumed" in allowed.output
    assert f"resuming with other settings than the store's sample-views were computed with (recorded -> now: " \
           f"{BATCH}: 1 -> 2)" in caplog.text
    assert read_done(store).all() and TeacherCache.open(store).manifest["status"] == v2.STATUS_COMPLETE


@pytest.mark.slow
def test_a_repair_with_another_thread_count_is_refused_unless_allowed(tmp_path, tiny_slice, teacher_files,
                                                                       threads):
    threads(1)
    store = tmp_path / "cache.zarr"
    result = extract(tiny_slice, teacher_files, store)
    assert result.exit_code == 0, result.output + repr(result.exception)
    chunk = next(p for p in sorted((store / "heatmap" / "c").rglob("*")) if p.is_file())
    damaged = bytearray(chunk.read_bytes())
    damaged[-9] ^= 0x10
    chunk.write_bytes(bytes(damaged))
    before = files_of(store)

    threads(2)
    refused = extract(tiny_slice, teacher_files, store, "--repair")
    assert isinstance(refused.exception, CacheError), refused.output
    assert "repairing would compute" in str(refused.exception)
    assert f"(recorded -> now: {THREADS}: 1 -> 2)" in str(refused.exception)
    assert files_of(store) == before  # still complete, the damaged chunk untouched

    allowed = extract(tiny_slice, teacher_files, store, "--repair", "--allow-settings-change")
    assert allowed.exit_code == 0, allowed.output + repr(allowed.exception)
    assert "re-extracted 1 damaged sample-views" in allowed.output
    assert chunk.read_bytes() != bytes(damaged)


@pytest.mark.slow
def test_a_plain_rerun_of_a_complete_store_with_other_settings_is_not_refused(tmp_path, tiny_slice, teacher_files,
                                                                              threads, caplog):
    threads(1)
    store = tmp_path / "cache.zarr"
    assert extract(tiny_slice, teacher_files, store).exit_code == 0
    before = files_of(store)
    threads(2)
    again = extract(tiny_slice, teacher_files, store, "--batch-size", "2", "--workers", "2")
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "already complete (4 sample-views" in again.output
    assert files_of(store) == before
    # should its quick check find a chunk missing, the rerun repairs it with the settings given, and says so
    next(p for p in sorted((store / "heatmap" / "c").rglob("*")) if p.is_file()).unlink()
    caplog.set_level("WARNING")
    repaired = extract(tiny_slice, teacher_files, store, "--batch-size", "2")
    assert repaired.exit_code == 0 and "re-extracted 1 damaged sample-views" in repaired.output
    assert (f"the 1 re-extracted sample-views were computed with other settings than the rest of the store "
            f"(recorded -> now: {BATCH}: 1 -> 2; {THREADS}: 1 -> 2)") in caplog.text


def _manifest(**extraction) -> dict:
    return {"extraction": extraction, "software": {"torch": "2.13.0"}}


def test_settings_are_compared_by_what_decides_the_computed_values():
    cpu = _manifest(device="cpu", device_model="AVX512", precision="fp32", matmul_precision="highest", tf32=None,
                    batch_size=1, workers=2, threads=4, ranks=1, command="distillbev extract-teacher ...")
    # the ranks, the command and the device index do not change what a process computes; 4 threads over 2 workers
    # is 2 threads per process, as 2 threads in 1
    same = {**cpu["extraction"], "workers": 1, "threads": 2, "ranks": 8, "command": "other"}
    assert settings_changes(cpu, _manifest(**same)) == []
    cuda = _manifest(device="cuda:1", device_model="NVIDIA H100 80GB HBM3", precision="fp32",
                     matmul_precision="high", tf32={"matmul": True, "cudnn": True}, batch_size=4, workers=1,
                     threads=2)
    assert settings_changes(cuda, _manifest(**{**cuda["extraction"], "device": "cuda:0"})) == []
    assert settings_changes(cpu, cuda) == [
        'device (--device): "cpu" -> "cuda"',
        'device model: "AVX512" -> "NVIDIA H100 80GB HBM3"',
        'float32 matmul precision (torch.set_float32_matmul_precision): "highest" -> "high"',
        'TF32 (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32): null -> '
        '{"matmul": true, "cudnn": true}',
        f"{BATCH}: 1 -> 4",
    ]
    newer = {**cuda, "software": {"torch": "2.14.0"}}
    assert settings_changes(cuda, newer) == ['torch version: "2.13.0" -> "2.14.0"']
    # a store written before the precision entries were recorded: only what both sides record is compared
    old = _manifest(device="cpu", batch_size=1, workers=1, threads=2, ranks=1)
    assert settings_changes(old, cpu) == []
    assert settings_changes(old, _manifest(**{**cpu["extraction"], "threads": 2})) == [f"{THREADS}: 2 -> 1"]
    # none of them is the store's identity
    assert manifest_diff(cpu, cuda) == [] and manifest_diff(cuda, newer) == []


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_on_a_settings_change(tmp_path, tiny_slice, teacher_files, threads):
    """Rank 0 compares the settings under the store's lock; its refusal reaches rank 1, and nothing is written."""
    import subprocess
    import sys

    threads(1)  # torchrun's ranks compute with 1 thread each (OMP_NUM_THREADS=1): the same as recorded
    store = tmp_path / "cache.zarr"
    assert extract(tiny_slice, teacher_files, store).exit_code == 0
    set_status(store, v2.STATUS_WRITING)
    set_done(store, [(0, 1), (1, 1)], 0)
    before = files_of(store)
    config_path, checkpoint = teacher_files
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "distillbev.cli", "extract-teacher", "--config", str(config_path), "--dataroot", str(tiny_slice.dataroot),
         "--checkpoint", str(checkpoint), "--cache", str(store), "--split", "tiny_train", "--views", "2", "--dtype",
         "fp16", "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]  # one line from each rank
    assert all(f"{BATCH}: 1 -> 2" in line and "--allow-settings-change" in line for line in errors)
    assert files_of(store) == before


def test_the_settings_recorded_on_cuda_name_the_gpu_and_its_tf32_switches(monkeypatch):
    """The CUDA branch of what extraction records, on a CPU machine: the device's name is asked of torch."""
    from distillbev.pipeline.cache.run import compute_settings

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: asked.append(device) or "NVIDIA H100")
    monkeypatch.setenv("WORLD_SIZE", "8")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # not plain attributes
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
    try:
        recorded = compute_settings("cuda:3", batch_size=2, workers=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert asked == ["cuda:3"]
    assert recorded["device"] == "cuda:3" and recorded["device_model"] == "NVIDIA H100"
    assert recorded["tf32"] == {"matmul": True, "cudnn": False} and recorded["precision"] == "fp32"
    assert recorded["batch_size"] == 2 and recorded["ranks"] == 8 and recorded["threads"] == torch.get_num_threads()
    on_cpu = compute_settings("cpu", batch_size=1, workers=2)
    assert on_cpu["tf32"] is None and on_cpu["device_model"] == torch.backends.cpu.get_cpu_capability()

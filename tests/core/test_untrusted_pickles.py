"""No untrusted pickle runs code: teacher checkpoints, resume files and MVP virtual-point files are unpickled with
an allow list (pipeline/safe_pickle.py); a file that needs anything else is refused unless --trust-checkpoint.

The malicious files below carry an object whose unpickling creates a canary file (`open(path, "w")`), so a test can
see whether the pickle ran: refused means no canary; trusted means the canary exists (the test can fail)."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from module_loader import load_tests_module

from distillbev.pipeline.data.virtual_points import VirtualPoints, read_virtual_points, write_virtual_points
from distillbev.pipeline.distill.train import load_resume
from distillbev.pipeline.errors import CheckpointError, DataError
from distillbev.pipeline.safe_pickle import HistoryBufferRecord, load_checkpoint
from distillbev.pipeline.teacher.checkpoint import load_teacher_checkpoint
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.pipeline.teacher.train import load_run_state
from distillbev.stages.extract_teacher import command as extract_command

REPOSITORY = Path(__file__).resolve().parents[2]
OPEN_NAMES = ("io.open", "builtins.open")  # how a pickle names `open`


class Canary:
    """Unpickles as open(path, "w"): creating the file is the proof that the pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def tiny_teacher() -> CenterPointTeacher:
    helpers = load_tests_module("teacher/teacher_helpers.py")
    torch.manual_seed(0)
    return CenterPointTeacher(helpers.tiny_model_config())


def malicious_teacher_file(path: Path, canary: Path, model: CenterPointTeacher) -> Path:
    """A teacher checkpoint whose keys and shapes fit `model`, with the canary in its meta."""
    torch.save({"state_dict": model.state_dict(), "meta": {"mmdet3d_version": "1.0.0rc4", "note": Canary(canary)}},
               path)
    return path


def assert_refused(message: str, path: Path, canary: Path) -> None:
    assert message.startswith(f"{path}: refused to load the ")
    assert any(name in message for name in OPEN_NAMES), message
    assert not canary.exists()


def test_the_teacher_loader_refuses_a_pickle_that_runs_code_and_trust_loads_it(tmp_path):
    model, canary = tiny_teacher(), tmp_path / "canary"
    path = malicious_teacher_file(tmp_path / "teacher.pth", canary, model)
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(tiny_teacher(), path)
    assert_refused(str(error.value), path, canary)
    assert "--trust-checkpoint" in str(error.value)

    loaded = tiny_teacher()
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.zero_()
    report = load_teacher_checkpoint(loaded, path, trust_checkpoint=True)
    assert canary.exists()  # full unpickling ran the file's code, as --trust-checkpoint says it may
    assert report.num_loaded == len(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_extract_teacher_refuses_it_and_its_flag_trusts_it(tmp_path, caplog):
    model, canary = tiny_teacher(), tmp_path / "canary"
    path = malicious_teacher_file(tmp_path / "teacher.pth", canary, model)
    args = ["--config", str(REPOSITORY / "configs" / "synthetic" / "teacher.yaml"), "--dataroot",
            str(tmp_path / "no_dataroot"), "--checkpoint", str(path), "--cache", str(tmp_path / "cache.zarr"),
            "--split", "synth_train"]
    refused = CliRunner().invoke(extract_command, args)
    assert refused.exit_code != 0
    assert f"{path}: refused to load the teacher checkpoint" in str(refused.exception)
    assert "--trust-checkpoint" in str(refused.exception)
    assert not canary.exists()

    trusted = CliRunner().invoke(extract_command, [*args, "--trust-checkpoint"])
    assert trusted.exit_code != 0  # the dataroot does not exist, and the synthetic config is another model
    assert "refused to load" not in str(trusted.exception)
    assert canary.exists()
    assert any("--trust-checkpoint" in record.getMessage() and record.levelname == "WARNING"
               for record in caplog.records)


def test_resume_loaders_refuse_it(tmp_path):
    model, canary = tiny_teacher(), tmp_path / "canary"
    run = tmp_path / "teacher_run"
    run.mkdir()
    torch.save({"state_dict": model.state_dict(), "format": "distillbev-teacher",
                "training": {"epoch": 1, "rng": Canary(canary)}}, run / "latest.pth")
    with pytest.raises(CheckpointError) as error:
        load_run_state(run, model, optimizer=None, scheduler=None)
    assert_refused(str(error.value), run / "latest.pth", canary)
    assert "drop --resume" in str(error.value)

    student = tmp_path / "student_latest.pth"
    torch.save({"state_dict": {}, "torch_rng": Canary(canary), "epoch": 1, "iteration": 2}, student)
    with pytest.raises(CheckpointError) as error:
        load_resume(student, setup=None, optimizer=None)
    assert_refused(str(error.value), student, canary)


@pytest.fixture
def fake_mmengine(monkeypatch):
    """A stand-in for mmengine's HistoryBuffer, pickled under mmengine's name (mmengine is not in this venv)."""

    class HistoryBuffer:
        def __init__(self):
            self.max_length = 1000000
            self._log_history = np.array([0.01, 0.02])
            self._count_history = np.array([1, 1])
            self._statistics_methods = {"min": HistoryBuffer.min, "mean": HistoryBuffer.mean}

        def min(self):
            return self._log_history.min()

        def mean(self):
            return self._log_history.mean()

    HistoryBuffer.__module__ = "mmengine.logging.history_buffer"
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    for method in (HistoryBuffer.min, HistoryBuffer.mean):
        method.__qualname__, method.__module__ = f"HistoryBuffer.{method.__name__}", HistoryBuffer.__module__
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    return HistoryBuffer


def test_an_mmengine_checkpoint_with_its_meta_classes_loads(tmp_path, fake_mmengine, caplog):
    # what mmengine's Runner.save_checkpoint writes besides the weights: meta with numpy scalars and a dtype, and a
    # message_hub of OrderedDicts holding HistoryBuffers
    model = tiny_teacher()
    path = tmp_path / "epoch_20.pth"
    torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items()),
                "meta": {"mmengine_version": "0.10.7", "seed": np.int64(7), "lr": np.float64(0.5),
                         "dtype": np.dtype("float32"), "epoch": 20},
                "message_hub": {"log_scalars": OrderedDict([("train/lr", fake_mmengine())]),
                                "runtime_info": OrderedDict([("eta", np.float64(0.0)), ("iter", 1000)])}}, path)
    report = load_teacher_checkpoint(tiny_teacher(), path)
    assert report.source == "mmdet3d" and report.num_loaded == len(model.state_dict())
    assert report.box_convention.startswith("mmengine 0.10.7 file")
    assert report.meta["seed"] == 7 and isinstance(report.meta["seed"], np.int64)
    assert report.meta["lr"] == 0.5 and report.meta["dtype"] == np.dtype("float32")
    buffer = load_checkpoint(path)["message_hub"]["log_scalars"]["train/lr"]
    assert isinstance(buffer, HistoryBufferRecord)
    np.testing.assert_array_equal(buffer._log_history, [0.01, 0.02])
    assert buffer._statistics_methods == {"min": "HistoryBuffer.min", "mean": "HistoryBuffer.mean"}
    assert not any(record.levelname == "WARNING" and "--trust-checkpoint" in record.getMessage()
                   for record in caplog.records)


class _ReachInit:
    """Unpickles as getattr(HistoryBuffer, "__init__"): an attribute outside the statistics methods."""

    def __init__(self, owner):
        self.owner = owner

    def __reduce__(self):
        return getattr, (self.owner, "__init__")


def test_getattr_reaches_only_history_buffer_statistics(tmp_path, fake_mmengine):
    path = tmp_path / "reach.pth"
    torch.save({"meta": {"x": _ReachInit(fake_mmengine)}}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: refused to load the checkpoint")
    assert "getattr(HistoryBufferRecord, '__init__') is not allowed" in message


def test_an_object_dtype_array_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"meta": {"names": np.array(["a", 1], dtype=object)}}, path)
    with pytest.raises(CheckpointError, match=r"objects.pth: refused .*numpy\.dtypes\.ObjectDType"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------------- MVP
def test_an_mvp_file_with_a_malicious_pickle_is_refused(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "n008.pcd.bin.pkl.npy"
    np.save(path, np.array({"virtual_points": np.zeros((0, 14)), "note": Canary(canary)}, dtype=object),
            allow_pickle=True)
    with pytest.raises(DataError) as error:
        read_virtual_points(path, "sd_token")
    message = str(error.value)
    assert message.startswith(f"{path}: refused: the pickle in this virtual-point file of LIDAR_TOP sample_data "
                              f"sd_token names ")
    assert any(name in message for name in OPEN_NAMES), message
    assert not canary.exists()


def test_our_and_mvp_layout_files_read_as_np_load_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    ours = VirtualPoints(rng.normal(size=(5, 14)).astype(np.float32), rng.normal(size=(3, 15)).astype(np.float32),
                         np.array([4, 0, 9], np.int64))
    write_virtual_points(tmp_path / "ours.pkl.npy", ours)
    # MVP's empty sweep: float64 zeros, written by np.save of the dict with numpy's default pickle protocol
    np.save(tmp_path / "mvp_empty.pkl.npy", {"virtual_points": np.zeros((0, 14)), "real_points": np.zeros((0, 15)),
                                             "real_points_indice": np.zeros(0)}, allow_pickle=True)
    for name in ("ours.pkl.npy", "mvp_empty.pkl.npy"):
        read = read_virtual_points(tmp_path / name)
        trusted = np.load(tmp_path / name, allow_pickle=True).item()  # the files are ours: np.load is fine here
        for got, key in ((read.virtual, "virtual_points"), (read.real, "real_points"),
                         (read.real_indices, "real_points_indice")):
            np.testing.assert_array_equal(got, trusted[key].astype(got.dtype))
    assert read_virtual_points(tmp_path / "mvp_empty.pkl.npy").real.shape == (0, 15)
    np.testing.assert_array_equal(read_virtual_points(tmp_path / "ours.pkl.npy").real_indices, [4, 0, 9])


def test_a_plain_npy_array_is_not_an_mvp_file(tmp_path):
    path = tmp_path / "plain.pkl.npy"
    np.save(path, np.zeros((2, 14), np.float32))
    with pytest.raises(DataError, match=r"expected a 0-d object array holding a dict"):
        read_virtual_points(path)

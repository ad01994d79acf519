"""`train-student --targets online`: where the live teacher's model config and data settings come from.

A teacher run's latest.pth records both (`config`, `training.experiment.data`); an mmdet3d file records neither and
a checkpoints/epoch_N.pth file only the model, so those need `--teacher-config` (a teacher experiment YAML) and are
refused without it. The student's own sweeps and point features are never used for the teacher: the tiny student
here loads 0 sweeps, the tiny teacher was trained with 1, and the points the live teacher is fed must carry that
sweep's time lag.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
import torch
from click.testing import CliRunner
from test_distill_equivalence import tiny_student_config, tiny_teacher_config

from distillbev.pipeline.config import dump_config, to_dict
from distillbev.pipeline.distill import run as run_module
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import online_teacher_settings
from distillbev.pipeline.errors import CheckpointError, ConfigError
from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.stages.train_student import command as train_student_command

TEACHER_SWEEPS = 1  # what the tiny teacher was trained with (tiny_teacher_config)


def student_config(dataroot: Path) -> StudentExperimentConfig:
    """The tiny student, loading the key frame only (no sweep) for one step of one sample."""
    cfg = tiny_student_config(dataroot)
    cfg.data.num_sweeps = cfg.data.sweep_candidates = 0
    cfg.targets = "online"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.num_workers = 1, 1, 0
    return cfg


def write_mmdet3d_file(path: Path, teacher: CenterPointTeacher, pickled_meta: bool) -> Path:
    """An mmengine-era mmdet3d checkpoint: a DDP-prefixed state_dict and meta, no model config; with
    `pickled_meta` its meta also holds an object that only full unpickling restores (as mmengine's files do)."""
    meta = {"mmengine_version": "0.10.7", "dataset_meta": {"classes": ["car"]}}
    if pickled_meta:
        meta["work_dir"] = PurePosixPath("work_dirs/centerpoint_pillar02")
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}, "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny teacher's config, its weights in four files (mmdet3d with plain and pickled meta, epoch_N-like,
    latest-like), and a student and a teacher YAML. The dataroot the configs name is made by `dataroot`."""
    folder = tmp_path_factory.mktemp("online_teacher")
    dataroot = folder / "synthetic"
    teacher_cfg = tiny_teacher_config(dataroot)
    assert teacher_cfg.data.num_sweeps == TEACHER_SWEEPS
    torch.manual_seed(0)
    teacher = CenterPointTeacher(teacher_cfg.model)
    epoch = save_teacher_checkpoint(teacher, folder / "checkpoints" / "epoch_1.pth", config=teacher_cfg.model)
    latest = folder / "latest.pth"
    torch.save({**torch.load(epoch, weights_only=True), "training": {"experiment": to_dict(teacher_cfg)}}, latest)
    student_yaml, teacher_yaml = folder / "student.yaml", folder / "teacher.yaml"
    dump_config(student_config(dataroot), student_yaml)
    dump_config(teacher_cfg, teacher_yaml)
    return {"folder": folder, "dataroot": dataroot, "teacher_cfg": teacher_cfg, "teacher": teacher,
            "mmdet3d": write_mmdet3d_file(folder / "mmdet3d.pth", teacher, pickled_meta=False),
            "mmdet3d_pickled": write_mmdet3d_file(folder / "mmdet3d_pickled.pth", teacher, pickled_meta=True),
            "epoch": epoch, "latest": latest, "student_yaml": student_yaml, "teacher_yaml": teacher_yaml}


@pytest.fixture(scope="module")
def dataroot(files):
    """The synthetic dataroot of the configs: one train and one val key frame, each with one sweep before it."""
    generate_dataset(files["dataroot"], SyntheticConfig.boxes(num_scenes=2, samples_per_scene=1, val_scenes=1,
                                                              sweeps_per_key_frame=TEACHER_SWEEPS,
                                                              objects_per_scene=16, visibility_range=20.0,
                                                              lidar_azimuth_steps=512), progress=False)
    return files["dataroot"]


def invoke(files, out: Path, checkpoint: str, *extra: str):
    return CliRunner().invoke(train_student_command, [
        "--config", str(files["student_yaml"]), "--targets", "online", "--teacher-checkpoint",
        str(files[checkpoint]), "--out", str(out), "--max-steps", "1", *extra])


@pytest.mark.parametrize("checkpoint", ["mmdet3d", "mmdet3d_pickled"])
def test_an_mmdet3d_file_without_teacher_config_is_refused_naming_the_fix(files, tmp_path, checkpoint):
    result = invoke(files, tmp_path / "run", checkpoint)
    assert isinstance(result.exception, CheckpointError), result.output
    message = str(result.exception)
    assert message.startswith(f"{files[checkpoint]}: ")
    assert "--teacher-config" in message
    if checkpoint == "mmdet3d":
        assert "records no teacher model config (no 'config' entry" in message
    else:  # never unpickled here: it cannot be ours
        assert "it needs the class(es) pathlib.PurePosixPath" in message and "--trust-checkpoint" in message
    assert not (tmp_path / "run" / "latest.pth").exists()


def test_an_epoch_checkpoint_without_data_settings_is_refused(files):
    cfg = student_config(files["dataroot"])
    with pytest.raises(CheckpointError) as error:
        online_teacher_settings(cfg, files["epoch"])
    message = str(error.value)
    assert message.startswith(f"{files['epoch']}: records the teacher's model config but not the data settings")
    assert "training.experiment.data.num_sweeps / point_features missing" in message
    assert "--teacher-config" in message and "student's settings are no substitute" in message


def test_a_teacher_runs_latest_checkpoint_gives_its_recorded_settings_without_touching_the_student(files):
    cfg = student_config(files["dataroot"])
    settings = online_teacher_settings(cfg, files["latest"])
    assert settings.model == to_dict(files["teacher_cfg"].model)
    assert (settings.data.num_sweeps, settings.data.sweep_candidates, settings.data.point_features) == (1, 1, "lidar")
    assert (cfg.data.num_sweeps, cfg.data.sweep_candidates) == (0, 0)  # the student's config is not written
    assert settings.data.final_size == cfg.data.final_size and settings.data.load_images  # the rest is the student's


def test_teacher_config_gives_the_model_and_data_settings(files):
    cfg = student_config(files["dataroot"])
    teacher_cfg = TeacherExperimentConfig(data=tiny_teacher_config(files["dataroot"]).data,
                                          model=files["teacher_cfg"].model)
    teacher_cfg.data.num_sweeps, teacher_cfg.data.sweep_candidates = 3, 5
    settings = online_teacher_settings(cfg, files["mmdet3d_pickled"], teacher_cfg)  # the file is not read
    assert settings.model == to_dict(teacher_cfg.model) and settings.source == "--teacher-config"
    # 3 sweeps drawn from the student's candidates, at least 3 of them
    assert (settings.data.num_sweeps, settings.data.sweep_candidates) == (3, 3)
    assert (cfg.data.num_sweeps, cfg.data.sweep_candidates) == (0, 0)


def test_teacher_config_is_refused_without_online_targets(files, tmp_path):
    result = CliRunner().invoke(train_student_command, [
        "--config", str(files["student_yaml"]), "--targets", "cache", "--teacher-config", str(files["teacher_yaml"]),
        "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception).startswith(f"--teacher-config {files['teacher_yaml']}: only --targets online")


@pytest.mark.slow
def test_an_mmdet3d_file_with_teacher_config_trains_one_step_on_the_teachers_sweeps(files, dataroot, tmp_path,
                                                                                   monkeypatch):
    fed: list[list[torch.Tensor]] = []  # the point clouds of every live-teacher forward
    build = run_module.live_teacher

    def recording_live_teacher(config_dict, checkpoint, device, **options):
        teacher = build(config_dict, checkpoint, device, **options)
        teacher.register_forward_pre_hook(lambda module, args: fed.append([p.clone() for p in args[0]]))
        return teacher

    monkeypatch.setattr(run_module, "live_teacher", recording_live_teacher)
    out = tmp_path / "run"
    # its meta holds a class outside the weights-only allow list: loaded because the flag says it is trusted
    result = invoke(files, out, "mmdet3d_pickled", "--trust-checkpoint", "--teacher-config", str(files["teacher_yaml"]),
                    "--set", "train.attention_snapshots=true", "--set", "train.attention_samples=1")
    assert result.exit_code == 0, (result.output, result.exception)
    # one step of batch 1, then the teacher's attention for the snapshot of the one train sample
    assert [len(clouds) for clouds in fed] == [1, 1]
    for cloud in (fed[0][0], fed[1][0]):
        assert cloud.shape[1] == 5
        time_lags = cloud[:, 4]
        # the key frame (lag 0) and the one sweep the teacher was trained with (lag > 0), which the student's own
        # settings (0 sweeps) would have left out
        assert int((time_lags == 0).sum()) > 0 and int((time_lags > 0).sum()) > 0
    assert list(out.glob("attention/*")), sorted(p.name for p in out.iterdir())
    info = json.loads((out / "run_info.json").read_text())
    assert info["teacher_data"] == {"num_sweeps": 1, "sweep_candidates": 1, "point_features": "lidar"}
    assert info["config"]["data"]["num_sweeps"] == 0  # the student's data config is what it was
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(key.startswith("kd_") for record in steps for key in record)

"""`distillbev make-synthetic`: writes a dataroot, prints a summary, refuses a foreign non-empty folder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from distillbev.pipeline.errors import DataError
from distillbev.pipeline.synthetic.generate import MANIFEST_NAME, SyntheticConfig, generate_dataset
from distillbev.stages.make_synthetic import command


@pytest.mark.slow
def test_cli_writes_dataroot_and_summary(tmp_path):
    out = tmp_path / "root"
    args = ["--out", str(out), "--scenes", "2", "--samples-per-scene", "1", "--seed", "4", "--version", "v1.0-tiny",
            "--no-progress"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "2 scenes" in line and "2 samples" in line and "annotations" in line and "bytes" in line
    assert (out / "v1.0-tiny" / "sample.json").is_file()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["config"]["seed"] == 4
    # A previous synthetic dataroot is regenerated in place without --overwrite.
    again = CliRunner().invoke(command, args)
    assert again.exit_code == 0, again.output


def test_cli_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    result = CliRunner().invoke(command, ["--out", str(tmp_path), "--scenes", "2", "--samples-per-scene", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, DataError)
    assert "--overwrite" in str(result.exception)
    assert (tmp_path / "notes.txt").read_text() == "not a dataset"
    assert not (tmp_path / "v1.0-synthetic").exists()


def test_invalid_config_is_rejected_before_writing(tmp_path):
    from distillbev.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="val_split"):
        generate_dataset(tmp_path / "x", SyntheticConfig(val_split="val"), progress=False)
    with pytest.raises(ConfigError, match="val_scenes"):
        generate_dataset(tmp_path / "y", SyntheticConfig(num_scenes=2, val_scenes=2), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_overwrite_clears_only_generated_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "stale.bin").write_bytes(b"old")
    with pytest.raises(DataError):
        generate_dataset(tmp_path, SyntheticConfig(num_scenes=2, samples_per_scene=1, val_scenes=1, sweeps_per_key_frame=0,
                                                   objects_per_scene=12), progress=False)
    generate_dataset(tmp_path, SyntheticConfig(num_scenes=2, samples_per_scene=1, val_scenes=1, sweeps_per_key_frame=0,
                                               objects_per_scene=12), progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert not (tmp_path / "samples" / "stale.bin").exists()
    assert (tmp_path / "v1.0-synthetic" / "scene.json").is_file()


def test_interrupted_run_is_detectable_and_can_be_regenerated(tmp_path, monkeypatch):
    from distillbev.pipeline.synthetic import generate

    config = SyntheticConfig(num_scenes=2, samples_per_scene=1, val_scenes=1, sweeps_per_key_frame=0,
                             objects_per_scene=12)

    def interrupted(image, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "save_jpeg", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, config, progress=False)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["complete"] is False
    assert not (tmp_path / "v1.0-synthetic").exists()  # tables are written last
    assert not (tmp_path / "synthetic_summary.json").exists()
    monkeypatch.undo()
    generate_dataset(tmp_path, config, progress=False)  # recognised as ours: no --overwrite needed
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["complete"] is True
    assert (tmp_path / "synthetic_summary.json").is_file()

"""Every user-fixable data problem is one `DataError` line naming the path; the CLI prints `error:` and exits 1."""

from __future__ import annotations

import json

import pytest

from distillbev.cli import main
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.errors import DataError


def dataset_for(tiny, split="tiny_val", version=None, **overrides):
    config = DataConfig(dataroot=str(tiny.dataroot), version=version or tiny.version,
                        **{"load_images": False, "num_sweeps": 9, **overrides})
    return NuScenesDetectionDataset(config, split, "test")


def assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_dataroot(tmp_path):
    config = DataConfig(dataroot=str(tmp_path / "nowhere"), version="v1.0-mini")
    with pytest.raises(DataError) as exc_info:
        NuScenesDetectionDataset(config, "mini_val", "test")
    assert_one_line(exc_info, str(tmp_path / "nowhere"), "dataroot not found")


def test_missing_version_folder(tiny_slice):
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice, version="v1.0-trainval")
    assert_one_line(exc_info, "v1.0-trainval", "version folder not found", "v1.0-tiny")


def test_missing_table_file(tiny_slice_copy):
    (tiny_slice_copy.dataroot / tiny_slice_copy.version / "visibility.json").unlink()
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice_copy)
    assert_one_line(exc_info, "visibility.json", "table file missing")


def test_broken_table_json(tiny_slice_copy):
    path = tiny_slice_copy.dataroot / tiny_slice_copy.version / "sample.json"
    path.write_text("[{")
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice_copy)
    assert_one_line(exc_info, f"{path}: not valid JSON (")


def test_missing_map_png(tiny_slice_copy):
    for png in (tiny_slice_copy.dataroot / "maps").glob("*.png"):
        png.unlink()
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice_copy)
    assert_one_line(exc_info, "map")


def test_unknown_split_lists_available(tiny_slice):
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice, split="no_such_split")
    assert_one_line(exc_info, "no_such_split", "tiny_train", "tiny_val")


def test_predefined_split_on_wrong_version(tiny_slice):
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice, split="val")
    assert_one_line(exc_info, "'val'", "trainval", "tiny_val")


def test_split_naming_unknown_scene(tiny_slice_copy):
    path = tiny_slice_copy.dataroot / tiny_slice_copy.version / "splits.json"
    path.write_text(json.dumps({"tiny_val": ["scene-9999"]}))
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice_copy)
    assert_one_line(exc_info, "scene-9999", "splits.json")


def test_missing_sweep_file_names_file_and_sample(tiny_slice_copy):
    sweep = next(p for p in tiny_slice_copy.lidar_files.values() if "sweeps" in str(p))
    sweep.unlink()
    dataset = dataset_for(tiny_slice_copy)
    with pytest.raises(DataError) as exc_info:
        for index in range(len(dataset)):
            dataset[index]
    assert_one_line(exc_info, str(sweep), "not found", "sample ")
    assert any(token in str(exc_info.value) for token in tiny_slice_copy.sample_tokens)


def test_truncated_point_cloud(tiny_slice_copy):
    path = tiny_slice_copy.key_lidar_files[0]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError) as exc_info:
        dataset_for(tiny_slice_copy)[0]
    assert_one_line(exc_info, str(path), "multiple of 20", tiny_slice_copy.sample_tokens[0])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_image(tiny_slice_copy, damage):
    path = tiny_slice_copy.camera_files[0]
    if damage == "garbage":
        path.write_bytes(b"this is not a jpeg")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:400])
    else:
        path.unlink()
    dataset = dataset_for(tiny_slice_copy, load_images=True, final_size=(32, 88))
    with pytest.raises(DataError) as exc_info:
        dataset[0]
    assert_one_line(exc_info, str(path), tiny_slice_copy.sample_tokens[0])


def test_cli_prints_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--dataroot", str(tmp_path / "nowhere"), "--version", "v1.0-mini", "--split", "mini_val",
              "--out", str(tmp_path / "out"), "--gt-as-prediction"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]


def test_cli_unknown_split_and_missing_results(tiny_slice, tmp_path, capsys):
    common = ["evaluate", "--dataroot", str(tiny_slice.dataroot), "--version", tiny_slice.version,
              "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--split", "bogus", "--gt-as-prediction"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0] and "tiny_val" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--split", "tiny_val", "--results", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.json" in err[0]

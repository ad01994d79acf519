"""`distillbev figures`: the three PNGs from trained runs, boxes drawn where the hand-made dataroot puts them, and
what a user sees when an input is missing."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distillbev.cli import cli
from distillbev.pipeline.config import dump_config
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.errors import CacheError, ConfigError
from distillbev.pipeline.geometry.transforms import yaw_to_quaternion


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_figures_of_trained_runs(trained_runs, tmp_path):
    from distillbev.pipeline.distill.progress import attention_similarity, load_snapshot, snapshot_paths

    out = tmp_path / "figures"
    result = CliRunner().invoke(cli, ["figures", "--out", str(out), "--samples", "2", str(trained_runs["baseline"]),
                                      str(trained_runs["distilled"])], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # 100 dpi: curves 11 x 4.25 in; attention 3 x 3.75 in wide, 2 runs x 3.5 in + 0.5 in; qualitative 14 in wide,
    # 2 samples x 5.25 in + 0.75 in
    assert png_size(out / "curves.png") == (1100, 425)
    assert png_size(out / "attention.png") == (1125, 750)
    assert png_size(out / "qualitative.png") == (1400, 1125)
    # the baseline is compared with the teacher maps saved by the distilled run (same samples, view 0)
    teacher = load_snapshot(snapshot_paths(trained_runs["distilled"])[-1]).teacher_maps
    for name, run in (("bevdet_baseline", trained_runs["baseline"]), ("bevdet_distilled", trained_runs["distilled"])):
        r = [float(np.nanmean(attention_similarity(load_snapshot(p).maps, teacher))) for p in snapshot_paths(run)]
        assert f"{name}: attention vs teacher, Pearson r epoch 1 {r[0]:.3f}, epoch 3 {r[1]:.3f}" in result.output
    assert "input(s) missing" not in result.output


def fake_run(folder: Path, tiny_slice, name: str, records: list[dict] | None, distilled: bool) -> Path:
    """A run directory on the hand-made dataroot: config.yaml, run_info.json and (unless None) eval/results."""
    run = folder / name
    run.mkdir(parents=True)
    cfg = StudentExperimentConfig()
    cfg.data.dataroot, cfg.data.version = str(tiny_slice.dataroot), tiny_slice.version
    cfg.data.train_split, cfg.data.val_split = "tiny_train", "tiny_val"
    dump_config(cfg, run / "config.yaml")
    (run / "run_info.json").write_text(json.dumps({"targets": "cache" if distilled else "none", "cache": None}))
    if records is not None:
        (run / "eval").mkdir()
        results = {token: [] for token in tiny_slice.sample_tokens}
        results[tiny_slice.sample_tokens[0]] = records
        (run / "eval" / "results_nusc.json").write_text(json.dumps({"meta": {}, "results": results}))
    return run


def truck_record(score: float) -> dict:
    """The hand-made truck at T0 as a prediction: global (110, 215, 1.7), [w, l, h] = [2.5, 7, 3], yaw 0.3."""
    return {"sample_token": "", "translation": [110.0, 215.0, 1.7], "size": [2.5, 7.0, 3.0],
            "rotation": [float(v) for v in yaw_to_quaternion(0.3)], "velocity": [0.0, 0.0],
            "detection_name": "truck", "detection_score": score, "attribute_name": "vehicle.parked"}


def test_boxes_are_drawn_where_the_hand_made_scene_puts_them(tiny_slice, tmp_path):
    from distillbev.pipeline.report.figures import draw_figures

    distilled = fake_run(tmp_path, tiny_slice, "distilled", [truck_record(0.9), truck_record(0.1)], True)
    unfinished = fake_run(tmp_path, tiny_slice, "unfinished", None, False)
    report = draw_figures([distilled, unfinished], tmp_path / "out", samples=1, score_threshold=0.3)
    assert [d.token for d in report.drawn] == [tiny_slice.sample_tokens[0]]
    drawn = report.drawn[0]
    # ego yaw 90 deg and LIDAR_TOP yaw -90 deg: the LiDAR axes are the global ones, its origin at global
    # (100, 200 + 0.943713, 1.84023); the truck's centre is at (10, 14.056287) and its yaw stays 0.3
    c, s = math.cos(0.3), math.sin(0.3)
    truck = np.array([[10 + 3.5 * c - 1.25 * s, 14.056287 + 3.5 * s + 1.25 * c],
                      [10 - 3.5 * c - 1.25 * s, 14.056287 - 3.5 * s + 1.25 * c],
                      [10 - 3.5 * c + 1.25 * s, 14.056287 - 3.5 * s - 1.25 * c],
                      [10 + 3.5 * c + 1.25 * s, 14.056287 + 3.5 * s - 1.25 * c]])
    assert len(drawn.bev["GT"]) == 10  # one box of every detection class; the 0-point pedestrian is not GT
    assert min(np.abs(outline - truck).max() for outline in drawn.bev["GT"]) < 1e-9
    # the prediction above the threshold is the truck itself, through the global frame and back
    assert len(drawn.bev["distilled"]) == 1 and np.abs(drawn.bev["distilled"][0] - truck).max() < 1e-9
    assert "unfinished" not in drawn.bev
    # CAM_FRONT at 10 ms: ego at global (100, 200.06), camera 1.7 m ahead and 1.5 m up, looking along global +y;
    # a global point g is at camera (right, down, forward) = (g_x - 100, 1.5 - g_z, g_y - 200.06 - 1.7).
    # The car (global (95, 210, 1.5), l 4.5, w 2, h 1.6, yaw 120 deg): corner 2 is its rear-right bottom corner
    cos, sin = math.cos(math.radians(120)), math.sin(math.radians(120))
    corner = np.array([95 - 2.25 * cos + 1.0 * sin, 210 - 2.25 * sin - 1.0 * cos, 1.5 - 0.8])
    right, down, forward = corner[0] - 100, 1.5 - corner[2], corner[1] - 200.06 - 1.7
    fx, cx, cy = 1266.417203046554, 816.2670197447984, 491.50706579294757
    pixel = np.array([fx * right / forward + cx, fx * down / forward + cy])
    assert 0 < pixel[0] < 1600 and 0 < pixel[1] < 900
    assert min(np.abs(box[2] - pixel).max() for box in drawn.camera["GT"]) < 1e-6
    # what is missing is named with the option or config field that produces it
    notes = " | ".join(report.notes)
    assert "unfinished: no eval/results_nusc.json" in notes
    for name in ("distilled", "unfinished"):
        assert f"{name}: no eval_history.jsonl; train it with --set train.eval_every=N" in notes
        assert f"{name}: no attention/epoch_*.npz; train it with --set train.attention_snapshots=true" in notes
    assert png_size(tmp_path / "out" / "qualitative.png") == (1400, 600)  # 1 sample: 5.25 + 0.75 in
    assert png_size(tmp_path / "out" / "attention.png") == (1125, 750)


def test_inputs_that_cannot_be_drawn_are_one_line_errors(tiny_slice, tmp_path):
    from distillbev.cli import main

    run = fake_run(tmp_path, tiny_slice, "run", [], False)
    other = fake_run(tmp_path, tiny_slice, "other", [], False)
    config = StudentExperimentConfig()
    config.data.dataroot, config.data.version, config.data.val_split = str(tmp_path), "v1.0-other", "val"
    dump_config(config, other / "config.yaml")
    cases = [
        (["figures", "--out", str(tmp_path / "o"), str(tmp_path)], ConfigError, "not a student run directory"),
        (["figures", "--out", str(tmp_path / "o"), str(run), str(other)], ConfigError,
         "the runs evaluate on different val sets"),
        (["figures", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "none.zarr"), str(run)], CacheError,
         "no teacher cache at this path"),
    ]
    for argv, error, message in cases:
        result = CliRunner().invoke(cli, argv)
        assert isinstance(result.exception, error) and message in str(result.exception), argv
        assert "\n" not in str(result.exception)
    result = CliRunner().invoke(cli, ["figures", str(run), str(other)])
    assert result.exit_code == 2 and "pass --out DIR when drawing several runs" in result.output
    with pytest.raises(SystemExit) as exit_info:
        main(["figures", str(tmp_path)])
    assert exit_info.value.code == 1

"""`make-synthetic --version v1.0-mini`: the official mini layout, read by the devkit's own evaluation script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.eval import detections_to_results
from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

pytestmark = pytest.mark.slow


def test_official_mini_layout_passes_the_devkit_evaluation_script(tmp_path):
    import importlib.util

    from nuscenes.utils.splits import create_splits_scenes

    root = tmp_path / "mini"
    summary = generate_dataset(root, SyntheticConfig(version="v1.0-mini", num_scenes=10, val_scenes=2,
                                                     samples_per_scene=2, sweeps_per_key_frame=1), progress=False)
    assert summary["splits"] == ["mini_train", "mini_val"] and not (root / "v1.0-mini" / "splits.json").exists()
    scenes = {s["name"] for s in json.loads((root / "v1.0-mini" / "scene.json").read_text())}
    official = create_splits_scenes()
    assert scenes == set(official["mini_train"]) | set(official["mini_val"])

    # GT as prediction, written by this package, scored by the devkit's own script as a user would run it
    spec = importlib.util.spec_from_file_location("gt", __file__.replace(
        "synthetic/test_synthetic_mini_layout.py", "eval/test_eval_gt_as_prediction.py"))
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    dataset = NuScenesDetectionDataset(DataConfig(dataroot=str(root), version="v1.0-mini", num_sweeps=0,
                                                  load_images=False), "mini_val", "test")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(detections_to_results(gt.gt_detections(dataset), dataset, use_lidar=True)))
    run = subprocess.run([sys.executable, "-m", "nuscenes.eval.detection.evaluate", str(results),
                          "--output_dir", str(tmp_path / "eval"), "--eval_set", "mini_val", "--dataroot", str(root),
                          "--version", "v1.0-mini", "--plot_examples", "0", "--render_curves", "0", "--verbose", "0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    # World 2 keeps nuScenes' class frequencies, so a rare class may be absent from the two val scenes: the devkit
    # scores such a class AP 0. Every class the devkit keeps GT boxes of scores AP 1, the others 0.
    present = gt.evaluated_classes(root, "v1.0-mini", "mini_val", results, tmp_path / "classes")
    assert len(present) >= 6, present
    # vel_err is 1 when no box of the class has a velocity, each seen in one of the 2 key frames (the devkit's
    # cummean sets an all-NaN error to 1)
    gt.assert_perfect_on(metrics, present, velocity_ok=lambda error: error in (pytest.approx(0, abs=0.01), 1.0))


def test_the_mini_layout_needs_ten_scenes(tmp_path):
    with pytest.raises(ConfigError, match="official mini layout of 10 scenes, 2 of them val"):
        generate_dataset(tmp_path / "x", SyntheticConfig(version="v1.0-mini", num_scenes=4), progress=False)

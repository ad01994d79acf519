"""The segmenter's error model: its measured rates match its configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distillbev.pipeline.data.masks import MASK_FOLDER, read_truth_records
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.synthetic.generate import SyntheticConfig, check_config
from distillbev.pipeline.synthetic.masks import (DISTANCE_BANDS, CameraTruth, MaskErrorModel, band_name, mask_rates,
                                                 segment)

# 20 x 10 objects of 8 x 8 low-resolution pixels (1024 full-size pixels) on a 400 x 225 image
COLUMNS, ROWS, CELL, SIDE = 20, 10, 20, 8


def grid_truth(names: list[str], distances: np.ndarray, true: np.ndarray) -> CameraTruth:
    owners = np.full((225, 400), -1, dtype=np.int64)
    for slot in range(COLUMNS * ROWS):
        row, column = divmod(slot, COLUMNS)
        owners[row * CELL + 5:row * CELL + 5 + SIDE, column * CELL:column * CELL + SIDE] = slot
    count = COLUMNS * ROWS
    return CameraTruth(owners, names, true, distances, np.ones(count), np.full(count, SIDE * SIDE))


def binomial_tolerance(rate: float, count: int) -> float:
    return 4.0 * np.sqrt(max(rate * (1.0 - rate), 1e-3) / count)


def test_measured_recall_and_confusion_match_the_configuration() -> None:
    model = MaskErrorModel(miss_base=0.1, miss_far=0.6, miss_occluded=0.0, miss_small=0.0, min_pixels=0,
                           confusion=0.25, false_per_clutter=0.0, false_background=0.0, boundary_sigma=0.0,
                           jitter_sigma=0.0, ragged=0.0)
    count = COLUMNS * ROWS
    names = ["car" if k % 2 else "pedestrian" for k in range(count)]
    distances = np.linspace(1.0, 69.0, count)
    rng = np.random.default_rng(0)
    records = [segment(grid_truth(names, distances, np.ones(count, bool)), model, rng).truth for _ in range(30)]
    measured = mask_rates(records)
    expected_found = 1.0 - model.miss_probability(distances, np.ones(count), np.full(count, 1024))
    bands = np.array([band_name(d) for d in distances])
    for low, _ in DISTANCE_BANDS:
        name = band_name(low)
        expected = float(expected_found[bands == name].mean())
        row = measured["distance"][name]
        assert row["true"] == 30 * int((bands == name).sum())
        assert abs(row["recall"] - expected) < binomial_tolerance(expected, row["true"]), (name, row, expected)
    # a found car keeps its class with probability 1 - confusion; a pedestrian has no similar class
    car = measured["class"]["car"]
    assert abs(car["label_accuracy"] - 0.75) < binomial_tolerance(0.75, car["found"])
    assert measured["class"]["pedestrian"]["label_accuracy"] == 1.0
    # no false masks: every mask is found and correct exactly when its label is right
    total = measured["all"]["all"]
    assert total["masks"] == total["found"] and total["correct"] == total["right_label"]


def test_false_masks_on_clutter_and_background() -> None:
    model = MaskErrorModel(false_per_clutter=0.4, false_background=2.0, miss_base=0.0, miss_far=0.0,
                           miss_occluded=0.0, miss_small=0.0, min_pixels=0, confusion=0.0)
    count = COLUMNS * ROWS
    names = ["pole" if k % 4 == 0 else "car" for k in range(count)]
    true = np.array([name == "car" for name in names])
    rng = np.random.default_rng(1)
    results = [segment(grid_truth(names, np.full(count, 10.0), true), model, rng) for _ in range(20)]
    sources = [m["source"] for r in results for m in r.truth["masks"]]
    poles = 20 * int((~true).sum())
    assert abs(sources.count("clutter") / poles - 0.4) < binomial_tolerance(0.4, poles)
    assert abs(sources.count("background") / 20 - 2.0) < 4 * np.sqrt(2.0 / 20)
    labels = [m["label"] for r in results for m in r.truth["masks"] if m["source"] == "clutter"]
    assert set(labels) <= {"pedestrian", "traffic_cone"}  # what a pole is taken for
    measured = mask_rates([r.truth for r in results])
    assert measured["class"]["car"]["recall"] > 0.95  # found despite ragged, shifted, eroded or dilated edges
    assert measured["all"]["all"]["precision"] < 0.9  # the false masks count against precision


def test_world_one_has_no_masks_and_world_two_has_them_by_default() -> None:
    assert SyntheticConfig.boxes().instance_masks is False and SyntheticConfig().instance_masks is True
    check_config(SyntheticConfig.boxes(instance_masks=True))  # world 1 on request (make-synthetic --world 1 --masks)
    with pytest.raises(ConfigError, match="confusion"):
        check_config(SyntheticConfig(mask_errors=MaskErrorModel(confusion=1.5)))


@pytest.mark.slow
def test_world_one_masks_add_files_and_change_no_other_byte(tmp_path: Path) -> None:
    from distillbev.cli import main

    roots = {}
    for flag in ("--masks", "--no-masks"):
        roots[flag] = tmp_path / flag.strip("-")
        main(["make-synthetic", "--out", str(roots[flag]), "--world", "1", "--scenes", "2", "--samples-per-scene", "2",
              "--workers", "1", "--no-progress", flag])
    files = {flag: {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()} for flag, root in roots.items()}
    added = set(files["--masks"]) - set(files["--no-masks"])
    assert set(files["--no-masks"]) <= set(files["--masks"]) and added
    assert {Path(name).parts[0] for name in added} == {"masks", "masks_truth"}
    assert len([name for name in added if name.startswith("masks/") and name.endswith(".png")]) == 4 * 6
    changed = [name for name in files["--no-masks"]
               if files["--masks"][name].read_bytes() != files["--no-masks"][name].read_bytes()]
    assert sorted(changed) == ["synthetic_manifest.json", "synthetic_summary.json"]  # they record the config


@pytest.mark.slow
def test_measured_miss_rates_on_a_tiny_street_world(street_dataroot: Path, street_config) -> None:
    """On the generated masks, the measured recall of each distance band is the mean configured detection
    probability of the true instances in it (within 4 binomial standard deviations)."""
    model = street_config.mask_errors
    records = read_truth_records(street_dataroot)
    assert len(records) == 2 * 2 * 6
    instances = [i for r in records for i in r["instances"]]
    measured = mask_rates(records)
    probabilities = 1.0 - model.miss_probability(np.array([i["distance"] for i in instances]),
                                                 np.array([i["visible_fraction"] for i in instances]),
                                                 np.array([i["pixels"] for i in instances]))
    bands = np.array([band_name(i["distance"]) for i in instances])
    checked = 0
    for low, _ in DISTANCE_BANDS:
        name = band_name(low)
        chosen = bands == name
        if chosen.sum() < 20:
            continue
        expected = float(probabilities[chosen].mean())
        spread = 4.0 * np.sqrt(float((probabilities[chosen] * (1 - probabilities[chosen])).sum())) / chosen.sum()
        assert abs(measured["distance"][name]["recall"] - expected) <= spread + 1e-9, (name, expected)
        checked += 1
    assert checked >= 2
    # the mask files carry only what a segmenter gives: ids, a label and a score
    meta = sorted((street_dataroot / MASK_FOLDER).glob("CAM_*/*.json"))
    assert len(meta) == 24
    for path in meta:
        for instance in json.loads(path.read_text())["instances"]:
            assert set(instance) == {"id", "label", "score"}

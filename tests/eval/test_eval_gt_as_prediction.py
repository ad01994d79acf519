"""GT boxes taken through the project's path (dataset LiDAR frame -> detections_to_results -> devkit) score ~1.

On the hand-made tiny dataroot (fast) and on a generated synthetic dataroot (slow).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from distillbev.cli import main
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.types import Detections
from distillbev.pipeline.errors import DataError
from distillbev.pipeline.eval import detections_to_results, distinct_gt_scores, evaluate_results
from distillbev.pipeline.eval.nuscenes_eval import devkit_evaluator


def gt_detections(dataset) -> list[Detections]:
    """Each sample's GT as detections, read through `dataset[i]` (test mode: identity augmentation), with
    distinct scores so that the devkit's TP errors average over every matched box."""
    samples = [dataset[index] for index in range(len(dataset))]
    scores = distinct_gt_scores([len(sample.gt_boxes) for sample in samples])
    return [Detections(sample.sample_token, sample.gt_boxes.double().numpy(), score, sample.gt_labels.numpy(),
                       sample.gt_attributes.numpy()) for sample, score in zip(samples, scores)]


def evaluated_classes(dataroot, version: str, split: str, results_path, out_dir) -> set[str]:
    """The detection classes of which the devkit's DetectionEval keeps GT boxes in `split` (after its class-range
    and zero-point filters), for a results file of that split."""
    from nuscenes import NuScenes

    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    evaluator, _ = devkit_evaluator(results_path, (nusc, split), out_dir)
    return {box.detection_name for box in evaluator.gt_boxes.all}


def assert_perfect_on(metrics, present: set[str], velocity_ok) -> None:
    """A devkit metrics summary of GT as prediction: AP 1 for exactly the `present` classes (0 for the absent ones),
    and TP errors under 0.01 for each present class, its velocity error judged by `velocity_ok`."""
    assert {name for name, ap in metrics["mean_dist_aps"].items() if ap >= 0.99} == present, metrics["mean_dist_aps"]
    assert metrics["mean_ap"] == pytest.approx(len(present) / 10)
    for name in present:
        errors = {k: v for k, v in metrics["label_tp_errors"][name].items() if v == v}  # NaN: attr of cones, barriers
        assert velocity_ok(errors.pop("vel_err", 0.0)), (name, metrics["label_tp_errors"][name])
        assert max(errors.values()) < 0.01, (name, errors)


def evaluate_gt(dataroot, version, split, out_dir) -> dict:
    config = DataConfig(dataroot=str(dataroot), version=version, num_sweeps=0, load_images=False)
    dataset = NuScenesDetectionDataset(config, split, "test")
    results_path = out_dir / "results.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(detections_to_results(gt_detections(dataset), dataset, use_lidar=True)))
    return evaluate_results(results_path, dataset, out_dir / "eval")


def test_gt_as_prediction_on_tiny_dataroot(tiny_slice, tmp_path):
    summary = evaluate_gt(tiny_slice.dataroot, tiny_slice.version, "tiny_val", tmp_path)
    assert summary["mean_ap"] >= 0.99 and summary["nd_score"] >= 0.99
    assert all(ap >= 0.99 for ap in summary["mean_dist_aps"].values())
    assert (tmp_path / "eval" / "metrics_summary.json").is_file()


def test_wrong_prediction_is_penalised(tiny_slice, tmp_path):
    """The check can fail: shifting every box by 3 m (beyond the 2 m TP threshold) loses most of the AP."""
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, num_sweeps=0,
                        load_images=False)
    dataset = NuScenesDetectionDataset(config, "tiny_val", "test")
    detections = gt_detections(dataset)
    for item in detections:
        item.boxes[:, 0] += 3.0
    path = tmp_path / "shifted.json"
    path.write_text(json.dumps(detections_to_results(detections, dataset)))
    summary = evaluate_results(path, (dataset.devkit(), "tiny_val"), tmp_path / "eval")
    assert summary["mean_ap"] < 0.6


def test_results_must_cover_the_split(tiny_slice, tmp_path):
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, load_images=False)
    dataset = NuScenesDetectionDataset(config, "tiny_val", "test")
    results = detections_to_results([], dataset)
    del results["results"][dataset.sample_tokens[1]]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(results))
    with pytest.raises(DataError, match="1 of the 2 samples"):
        evaluate_results(path, dataset, tmp_path / "eval")
    # Entries of samples outside the split are ignored; an empty prediction set scores 0.
    results = detections_to_results([], dataset)
    results["results"]["not-in-split"] = []
    path.write_text(json.dumps(results))
    summary = evaluate_results(path, dataset, tmp_path / "eval")
    assert summary["mean_ap"] == 0.0 and summary["nd_score"] == 0.0


def test_devkit_rejection_is_a_data_error(tiny_slice, tmp_path):
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, load_images=False)
    dataset = NuScenesDetectionDataset(config, "tiny_val", "test")
    results = detections_to_results(gt_detections(dataset), dataset)
    results["results"][dataset.sample_tokens[0]][0]["attribute_name"] = "vehicle.flying"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(results))
    with pytest.raises(DataError, match="devkit rejected"):
        evaluate_results(path, dataset, tmp_path / "eval")


def test_cli_gt_as_prediction_and_results(tiny_slice, tmp_path, capsys):
    common = ["evaluate", "--dataroot", str(tiny_slice.dataroot), "--version", tiny_slice.version,
              "--split", "tiny_val"]
    main(common + ["--out", str(tmp_path / "gt"), "--gt-as-prediction"])
    out = capsys.readouterr().out
    assert "mAP:  1.0000" in out and "NDS:" in out and "traffic_cone" in out
    results_path = tmp_path / "gt" / "results_gt_as_prediction.json"
    main(common + ["--out", str(tmp_path / "again"), "--results", str(results_path)])
    assert "mAP:  1.0000" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "metrics_summary.json").read_text())["nd_score"] >= 0.99
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--out", str(tmp_path / "x")])  # neither --results nor --gt-as-prediction
    assert exit_info.value.code == 2


@pytest.fixture(scope="session")
def synthetic_dataroot(tmp_path_factory):
    generate = pytest.importorskip("distillbev.pipeline.synthetic.generate")
    root = tmp_path_factory.mktemp("synthetic") / "dataroot"
    # 2 scenes x 4 key frames: the val scene's objects are seen in several key frames, so velocities exist.
    generate.generate_dataset(root, generate.SyntheticConfig(num_scenes=2, samples_per_scene=4, seed=0,
                                                             val_scenes=1), progress=False)
    return root


@pytest.mark.slow
def test_gt_as_prediction_on_synthetic_dataroot(synthetic_dataroot, tmp_path):
    """World 2 keeps nuScenes' class frequencies, so a rare class may be absent from the val scene (the devkit
    scores it AP 0): every class of which the devkit keeps GT boxes scores AP 1 and TP errors near 0."""
    summary = evaluate_gt(synthetic_dataroot, "v1.0-synthetic", "synth_val", tmp_path)
    present = evaluated_classes(synthetic_dataroot, "v1.0-synthetic", "synth_val", tmp_path / "results.json",
                                tmp_path / "classes")
    assert len(present) >= 6, present
    # A velocity crosses the LiDAR frame as (vx, vy), as in mmdet3d's converter: where the ego pitches and rolls on
    # world 2's slopes, the round trip leaves a few cm/s
    assert_perfect_on(summary, present, velocity_ok=lambda error: error < 0.05)


def test_distinct_gt_scores_by_hand():
    scores = distinct_gt_scores([2, 0, 3])
    assert [len(s) for s in scores] == [2, 0, 3]
    assert np.allclose(np.concatenate(scores), [1.0, 0.8, 0.6, 0.4, 0.2], rtol=0, atol=1e-15)


@pytest.mark.slow
def test_an_error_on_part_of_the_boxes_is_seen(synthetic_dataroot, tmp_path):
    """Every other car (by score rank) moved 1 m in x: its TP error is 1 m, the others' 0, so the car mATE lies
    near their mean (0.5) instead of the error of one match (0 or 1) that tied scores give."""
    config = DataConfig(dataroot=str(synthetic_dataroot), version="v1.0-synthetic", num_sweeps=0, load_images=False)
    dataset = NuScenesDetectionDataset(config, "synth_val", "test")
    detections = gt_detections(dataset)
    car = 0  # class id of "car"
    cars = sorted(((float(d.scores[k]), i, k) for i, d in enumerate(detections) for k in range(len(d.boxes))
                   if d.labels[k] == car), reverse=True)
    assert len(cars) >= 10
    for rank, (_, i, k) in enumerate(cars):
        if rank % 2 == 1:
            detections[i].boxes[k, 0] += 1.0
    path = tmp_path / "half_shifted.json"
    path.write_text(json.dumps(detections_to_results(detections, dataset, use_lidar=True)))
    summary = evaluate_results(path, dataset, tmp_path / "eval")
    car_error = summary["label_tp_errors"]["car"]["trans_err"]
    assert 0.35 < car_error < 0.65, car_error
    aps = {float(k): v for k, v in summary["label_aps"]["car"].items()}
    assert min(aps[1.0], aps[2.0], aps[4.0]) >= 0.99  # 1 m is within these thresholds: every car matches


def test_attribute_from_speed_by_hand():
    from distillbev.pipeline.data.classes import attribute_from_speed

    table = {("car", 0.5): "vehicle.moving", ("car", 0.1): "vehicle.parked", ("bus", 0.1): "vehicle.stopped",
             ("bus", 3.0): "vehicle.moving", ("trailer", 0.2): "vehicle.parked", ("bicycle", 1.0): "cycle.with_rider",
             ("motorcycle", 0.0): "cycle.without_rider", ("pedestrian", 1.2): "pedestrian.moving",
             ("pedestrian", 0.05): "pedestrian.standing", ("barrier", 0.0): "", ("traffic_cone", 5.0): ""}
    assert {key: attribute_from_speed(*key) for key in table} == table


@pytest.mark.slow
def test_attribute_sources_on_perfect_boxes(synthetic_dataroot, tmp_path):
    """GT boxes scored by the devkit under three attribute sources. The devkit's attr_err of a class is close to
    the fraction of its GT boxes whose attribute the source gets wrong (worked out here from the GT itself):
    the true attributes give 0, mmdet3d's speed rule gives less than one fixed attribute per class."""
    from distillbev.pipeline.data.classes import ATTRIBUTES, DETECTION_CLASSES, attribute_from_speed

    config = DataConfig(dataroot=str(synthetic_dataroot), version="v1.0-synthetic", num_sweeps=0, load_images=False)
    dataset = NuScenesDetectionDataset(config, "synth_val", "test")
    truth = gt_detections(dataset)
    fixed = {"car": "vehicle.parked", "truck": "vehicle.parked", "construction_vehicle": "vehicle.parked",
             "bus": "vehicle.moving", "trailer": "vehicle.parked", "motorcycle": "cycle.without_rider",
             "bicycle": "cycle.without_rider", "pedestrian": "pedestrian.standing"}
    sources = {"true": lambda name, box, true: true,
               "speed rule": lambda name, box, true: attribute_from_speed(name, float(np.hypot(box[7], box[8]))),
               "one per class": lambda name, box, true: fixed[name]}
    errors = {}
    for source, rule in sources.items():
        detections, wrong, total = [], {}, {}
        for item in truth:
            attributes = item.attributes.copy()
            for k, (box, label) in enumerate(zip(item.boxes, item.labels)):
                name = DETECTION_CLASSES[int(label)]
                if name in ("barrier", "traffic_cone"):
                    continue
                true = ATTRIBUTES[int(item.attributes[k])]
                chosen = rule(name, box, true)
                attributes[k] = ATTRIBUTES.index(chosen)
                wrong[name] = wrong.get(name, 0) + (chosen != true)
                total[name] = total.get(name, 0) + 1
            detections.append(Detections(item.sample_token, item.boxes, item.scores, item.labels, attributes))
        path = tmp_path / f"{source.replace(' ', '_')}.json"
        path.write_text(json.dumps(detections_to_results(detections, dataset, use_lidar=True)))
        summary = evaluate_results(path, dataset, tmp_path / source.replace(" ", "_"))
        # the mean over the classes present (an absent class's errors are the devkit's 1)
        errors[source] = float(np.mean([summary["label_tp_errors"][name]["attr_err"] for name in total]))
        for name in total:
            if total[name] >= 10:
                devkit = summary["label_tp_errors"][name]["attr_err"]
                assert abs(devkit - wrong[name] / total[name]) < 0.15, (source, name, devkit, wrong[name], total[name])
    assert errors["true"] == 0.0
    assert errors["speed rule"] < errors["one per class"]

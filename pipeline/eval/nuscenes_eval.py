"""Running the devkit's `DetectionEval` on a results JSON, and printing its summary.

The devkit computes every metric; this module only checks the inputs (so mistakes are one-line `DataError`s
rather than devkit assertions) and captures the devkit's own printing into the debug log.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

from ..data.loading import split_sample_tokens
from ..errors import DataError

logger = logging.getLogger(__name__)

EVAL_CONFIG_NAME = "detection_cvpr_2019"
TP_METRIC_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE",
                   "attr_err": "mAAE"}


def _load_results(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: results file not found; pass the JSON written by a model run")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); pass a nuScenes detection results file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "meta" not in data:
        raise DataError(f"{path}: expected a nuScenes results file {{'meta': {{...}}, 'results': {{sample_token: "
                        f"[boxes]}}}}; write it with detections_to_results")
    return data


def _out_of_range_placeholder(nusc, sample_token: str) -> dict:
    """A box 1 km from the ego: the devkit drops it (class range filter) before matching, so the metrics are those
    of no predictions. Needed because the devkit's loader fails on a results file without a single box."""
    sample = nusc.get("sample", sample_token)
    pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    x, y, z = pose["translation"]
    return {"sample_token": sample_token, "translation": [x + 1000.0, y, z], "size": [1.0, 1.0, 1.0],
            "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "detection_name": "car",
            "detection_score": 0.0, "attribute_name": "vehicle.parked"}


def evaluate_results(result_path: str | Path, source, out_dir: str | Path) -> dict:
    """Evaluate a results JSON with the devkit's DetectionEval and return its metrics summary.

    `source` is a `NuScenesDetectionDataset` (a devkit object of its dataroot is loaded for the call, and its split) or a `(nusc, split)` pair. Writes
    metrics_summary.json and metrics_details.json into `out_dir`. Every sample of the split must have an entry in
    the results; entries of other samples are dropped (into a filtered copy in `out_dir`) because the devkit
    rejects them for predefined splits. A file without any box scores mAP 0 / NDS 0 (the devkit cannot load it
    as is; an out-of-range placeholder box that the devkit itself filters out makes it loadable).
    """
    return run_devkit(*devkit_evaluator(result_path, source, out_dir))


def run_devkit(evaluator, captured: io.StringIO) -> dict:
    """The metrics summary of a `devkit_evaluator` (writes its metrics files); the evaluator can be reused."""
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            summary = evaluator.main(plot_examples=0, render_curves=False)
    except (AssertionError, KeyError, ValueError, TypeError) as exc:
        raise _rejected(evaluator.result_path, exc) from exc
    logger.debug("devkit output:\n%s", captured.getvalue())
    return summary


def _rejected(result_path, exc: Exception) -> DataError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"{result_path}: the nuScenes devkit rejected the results ({type(exc).__name__}: {message}); "
                     f"check detection_name, attribute_name, sizes > 0 and finite scores")


def devkit_evaluator(result_path: str | Path, source, out_dir: str | Path):
    """The devkit's `DetectionEval` of a checked results file (boxes loaded and class-range filtered), and the
    buffer its printing went to. See `evaluate_results` for `source` and what is checked."""
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval


    nusc, split = source if isinstance(source, tuple) else (source.devkit(), source.split)
    result_path, out_dir = Path(result_path), Path(out_dir)
    data = _load_results(result_path)
    expected = split_sample_tokens(nusc, split)
    missing = [token for token in expected if token not in data["results"]]
    if missing:
        raise DataError(f"{result_path}: {len(missing)} of the {len(expected)} samples of split {split!r} have no "
                        f"entry (e.g. {missing[0]}); every sample needs one, an empty list is fine")
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = set(data["results"]) - set(expected)
    rewrite = bool(extra)
    if extra:
        logger.info("ignoring %d result entries of samples outside split %r", len(extra), split)
        data = {"meta": data["meta"], "results": {token: data["results"][token] for token in expected}}
    if not any(data["results"].values()):
        logger.warning("%s has no boxes at all; every metric will be that of an empty prediction set", result_path)
        data["results"][expected[0]] = [_out_of_range_placeholder(nusc, expected[0])]
        rewrite = True
    if rewrite:
        result_path = out_dir / f"results_{split}.json"
        result_path.write_text(json.dumps(data))

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            evaluator = DetectionEval(nusc, config_factory(EVAL_CONFIG_NAME), str(result_path), eval_set=split,
                                      output_dir=str(out_dir), verbose=False)
    except (AssertionError, KeyError, ValueError, TypeError) as exc:
        raise _rejected(result_path, exc) from exc
    evaluator.result_path = result_path
    return evaluator, captured


def _number(value) -> str:
    return "   nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.4f}"


def format_metrics_table(summary: dict) -> str:
    """mAP, NDS, the five mean TP errors and a per-class table (AP averaged over distance thresholds)."""
    lines = [f"mAP:  {_number(summary['mean_ap'])}", f"NDS:  {_number(summary['nd_score'])}"]
    for key, label in TP_METRIC_NAMES.items():
        lines.append(f"{label}: {_number(summary['tp_errors'][key])}")
    lines.append("")
    lines.append(f"{'class':<22}{'AP':>8}" + "".join(f"{label[1:]:>8}" for label in TP_METRIC_NAMES.values()))
    for name, ap in summary["mean_dist_aps"].items():
        errors = summary["label_tp_errors"][name]
        lines.append(f"{name:<22}{_number(ap):>8}" + "".join(f"{_number(errors[key]):>8}" for key in TP_METRIC_NAMES))
    return "\n".join(lines)


def summary_metrics(summary: dict) -> dict[str, float]:
    """The headline metrics of a devkit metrics summary as fractions: mAP, NDS, mATE, mASE, mAOE, mAVE, mAAE."""
    return {"mAP": float(summary["mean_ap"]), "NDS": float(summary["nd_score"]),
            **{label: float(summary["tp_errors"][key]) for key, label in TP_METRIC_NAMES.items()}}

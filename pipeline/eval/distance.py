"""Detection AP by ego distance: the devkit's own matching and AP, run once per distance band.

The devkit loads the results and the GT and applies its per-class range filter (cars to 50 m, pedestrians to 40 m,
cones and barriers to 30 m, ...). Each band then keeps the GT boxes and the predictions whose ego distance
(`ego_dist`, the devkit's own) lies in [low, high), and the devkit's `evaluate` scores them. A prediction just
across a band edge from its object counts as a false positive in its band and leaves the object missed in the
other, as in any distance breakdown. A band's mAP is the mean AP over the classes that have GT in it (a class with
no GT there has no AP to average).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .nuscenes_eval import _rejected, devkit_evaluator

DEFAULT_EDGES = (0.0, 20.0, 30.0, 40.0)  # bands 0-20, 20-30, 30-40, >= 40 m


@dataclass
class DistanceBand:
    """One band's scores: AP per class with GT in the band, their mean, and GT counts."""

    low: float
    high: float  # math.inf for the last band
    gt_boxes: int
    predictions: int
    mean_ap: float  # over the classes with GT in the band (nan when there is none)
    class_ap: dict[str, float]  # classes with GT in the band
    class_gt: dict[str, int]

    @property
    def label(self) -> str:
        return f">= {self.low:g} m" if math.isinf(self.high) else f"{self.low:g}-{self.high:g} m"


def _within(boxes, low: float, high: float):
    from nuscenes.eval.common.data_classes import EvalBoxes

    kept = EvalBoxes()
    for token in boxes.sample_tokens:
        kept.add_boxes(token, [box for box in boxes[token] if low <= box.ego_dist < high])
    return kept


def evaluate_by_distance(result_path: str | Path, source, out_dir: str | Path,
                         edges: tuple[float, ...] = DEFAULT_EDGES) -> list[DistanceBand]:
    """AP by ego-distance band of a results JSON (bands [edges[i], edges[i + 1]) and [edges[-1], inf)); writes
    metrics_by_distance.json into out_dir. `source` as for `evaluate_results`."""
    return distance_bands(*devkit_evaluator(result_path, source, out_dir), out_dir, edges)


def distance_bands(evaluator, captured, out_dir: str | Path, edges: tuple[float, ...] = DEFAULT_EDGES
                   ) -> list[DistanceBand]:
    """`evaluate_by_distance` on a loaded `devkit_evaluator` (e.g. the one that scored the whole split), so the
    results and the GT are read once."""
    if len(edges) < 1 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"distance edges must be increasing and >= 0, found {edges}")
    all_gt, all_pred = evaluator.gt_boxes, evaluator.pred_boxes
    bands = []
    for low, high in zip(edges, (*edges[1:], math.inf)):
        gt, pred = _within(all_gt, low, high), _within(all_pred, low, high)
        class_gt: dict[str, int] = {}
        for box in gt.all:
            class_gt[box.detection_name] = class_gt.get(box.detection_name, 0) + 1
        evaluator.gt_boxes, evaluator.pred_boxes = gt, pred
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                metrics, _ = evaluator.evaluate()
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            raise _rejected(evaluator.result_path, exc) from exc
        aps = metrics.serialize()["mean_dist_aps"]
        class_ap = {name: float(aps[name]) for name in aps if class_gt.get(name, 0) > 0}
        mean_ap = sum(class_ap.values()) / len(class_ap) if class_ap else math.nan
        bands.append(DistanceBand(low, high, len(gt.all), len(pred.all), mean_ap, class_ap, class_gt))
    evaluator.gt_boxes, evaluator.pred_boxes = all_gt, all_pred
    rows = [{**asdict(band), "high": None if math.isinf(band.high) else band.high, "label": band.label}
            for band in bands]
    (Path(out_dir) / "metrics_by_distance.json").write_text(json.dumps(rows, indent=1))
    return bands


def format_distance_table(bands: list[DistanceBand], classes: tuple[str, ...] = ("car", "pedestrian",
                                                                                   "traffic_cone", "barrier")) -> str:
    """A markdown table: band, GT boxes, mAP over the classes present, AP of `classes` (x100)."""
    def number(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    lines = ["| distance | GT boxes | mAP (classes present) | " + " | ".join(f"{name} AP" for name in classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for band in bands:
        lines.append(f"| {band.label} | {band.gt_boxes} | {number(band.mean_ap)} | "
                     + " | ".join(number(band.class_ap.get(name)) for name in classes) + " |")
    return "\n".join(lines)

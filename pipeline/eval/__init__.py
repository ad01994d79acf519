"""nuScenes detection evaluation: LiDAR-frame detections -> results JSON -> the devkit's DetectionEval."""

from .nuscenes_eval import evaluate_results, format_metrics_table, summary_metrics
from .results import detections_to_results, distinct_gt_scores

__all__ = ["detections_to_results", "distinct_gt_scores", "evaluate_results", "format_metrics_table", "summary_metrics"]

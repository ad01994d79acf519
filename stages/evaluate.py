"""`distillbev evaluate`: score a nuScenes detection results JSON with the devkit (or the dataset's own GT)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from .options import infos_option, parse_distance_edges

logger = logging.getLogger(__name__)


@click.command("evaluate")
@click.option("--dataroot", required=True, type=click.Path(path_type=Path), help="nuScenes-format dataroot.")
@click.option("--version", "version", required=True, help="Table folder, e.g. v1.0-trainval or v1.0-synthetic.")
@click.option("--split", required=True, help="Split to evaluate (predefined, e.g. val, or a splits.json name).")
@click.option("--results", "results_path", type=click.Path(path_type=Path), default=None,
              help="Results JSON written by a model run (global frame, nuScenes format).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for metrics_summary.json and metrics_details.json.")
@click.option("--gt-as-prediction", is_flag=True,
              help="Evaluate the split's own GT boxes through the project's frames (a dataroot sanity check).")
@click.option("--by-distance", "distance_edges", default=None, metavar="EDGES",
              help="Also score AP by ego-distance band, e.g. 0,20,30,40 (bands 0-20, 20-30, 30-40, >= 40 m); "
                   "writes metrics_by_distance.json.")
@infos_option
def command(dataroot: Path, version: str, split: str, results_path: Path | None, out_dir: Path,
            gt_as_prediction: bool, distance_edges: str | None, infos: str | None) -> None:
    """Run the devkit's detection_cvpr_2019 evaluation and print mAP, NDS, the TP errors and per-class AP."""
    if (results_path is None) == (not gt_as_prediction):
        raise click.UsageError("pass exactly one of --results RESULTS.json or --gt-as-prediction")
    edges = parse_distance_edges(distance_edges)

    from ..pipeline.data.config import DataConfig
    from ..pipeline.data.dataset import NuScenesDetectionDataset
    from ..pipeline.data.loading import load_nuscenes, split_sample_tokens
    from ..pipeline.data.types import Detections
    from ..pipeline.eval import detections_to_results, distinct_gt_scores, evaluate_results, format_metrics_table

    start = time.perf_counter()
    if gt_as_prediction:
        config = DataConfig(dataroot=str(dataroot), version=version, num_sweeps=0, load_images=False,
                            infos=str(infos) if infos is not None else "")
        dataset = NuScenesDetectionDataset(config, split, mode="test")
        annotations = [dataset.annotations(index) for index in range(len(dataset))]
        scores = distinct_gt_scores([len(boxes) for boxes, _, _ in annotations])
        detections = [Detections(token, boxes, score, labels, attributes) for token, (boxes, labels, attributes), score
                      in zip(dataset.sample_tokens, annotations, scores)]
        out_dir.mkdir(parents=True, exist_ok=True)
        results_path = out_dir / "results_gt_as_prediction.json"
        results_path.write_text(json.dumps(detections_to_results(detections, dataset)))
        logger.info("wrote %d GT boxes of %d samples to %s", sum(len(d.boxes) for d in detections),
                    len(detections), results_path)
        source = dataset
    else:
        nusc = load_nuscenes(dataroot, version)
        split_sample_tokens(nusc, split)  # an unknown split fails here with the list of available ones
        source = (nusc, split)
    if edges is None:
        click.echo(format_metrics_table(evaluate_results(results_path, source, out_dir)))
    else:  # one devkit load (results and GT) for the whole split and every band
        from ..pipeline.eval.distance import distance_bands, format_distance_table
        from ..pipeline.eval.nuscenes_eval import devkit_evaluator, run_devkit

        evaluator, captured = devkit_evaluator(results_path, source, out_dir)
        click.echo(format_metrics_table(run_devkit(evaluator, captured)))
        click.echo("\nAP by ego distance (x100; a band's mAP averages the classes with GT in it):")
        click.echo(format_distance_table(distance_bands(evaluator, captured, out_dir, edges)))
    logger.info("evaluated %s in %.1f s; metrics in %s", results_path, time.perf_counter() - start,
                out_dir / "metrics_summary.json")

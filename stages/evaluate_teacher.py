"""`distillbev evaluate-teacher`: score a teacher checkpoint on a split with the devkit, as train-teacher does.

    distillbev evaluate-teacher --config configs/nuscenes/teacher_pillar02.yaml --dataroot /data/nuscenes \
        --version v1.0-trainval --split val --checkpoint centerpoint_02pillar_second_secfpn_circlenms_...pth

The checkpoint is one trained here (RUN/latest.pth, RUN/checkpoints/epoch_N.pth) or an mmdet3d file; it loads
strictly (pipeline/teacher/checkpoint.py: released files our teacher cannot run and files of mmdet3d's old box
convention are refused with the reason; docs/teacher_checkpoints.md). The prediction and scoring are train-teacher's
own post-training evaluation (`pipeline.teacher.train.evaluate_teacher`), so a checkpoint evaluated here gets the
numbers its training run printed. Writes into --out: results.json, metrics_summary.json, metrics_details.json
(the devkit's), evaluation.json (what was evaluated, with the headline metrics) and, with --by-distance,
metrics_by_distance.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from .options import infos_option, infos_override, parse_distance_edges

log = logging.getLogger(__name__)


def checked_device(device: str):
    """torch.device of --device (cpu, cuda, cuda:N); a ConfigError when it does not exist on this machine."""
    import torch

    from ..pipeline.distributed import check_device

    return torch.device(check_device(device))


def config_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "model.") -> list[str]:
    """"key: checkpoint -> config" for every leaf where a checkpoint's stored model config differs from the YAML's."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += config_differences(old, new, f"{prefix}{key}.")
        elif json.dumps(old) != json.dumps(new):
            differences.append(f"{prefix}{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return differences


@click.command("evaluate-teacher")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Teacher experiment YAML whose model fits the checkpoint (e.g. "
                   "configs/nuscenes/teacher_pillar02.yaml for the released mmdet3d pillar checkpoint, or "
                   "RUN/config.yaml of a train-teacher run).")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Teacher checkpoint: ours (RUN/latest.pth, RUN/checkpoints/epoch_N.pth) or an mmdet3d .pth.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load the teacher checkpoint with full unpickling, for a file that needs classes outside the "
                   "weights-only allow list (which is refused otherwise): unpickling runs any code the file carries, "
                   "so only for a file you made or whose source you trust. Logged as a warning.")
@click.option("--dataroot", required=True, type=click.Path(file_okay=False), help="nuScenes-format dataroot.")
@click.option("--version", "version", required=True, help="Table folder, e.g. v1.0-trainval, v1.0-mini.")
@click.option("--split", required=True, help="Split to evaluate, e.g. val, mini_val, synth_val.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for results.json and the metrics (default: eval_<checkpoint name>_<split> beside the "
                   "checkpoint).")
@click.option("--by-distance", "distance_edges", default=None, metavar="EDGES",
              help="Also score AP by ego-distance band, e.g. 0,20,30,40 (bands 0-20, 20-30, 30-40, >= 40 m); "
                   "writes metrics_by_distance.json.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per teacher forward pass (default: the config's train.batch_size, what train-teacher's "
                   "evaluation uses).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes (default: the config's train.num_workers).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set model.head.score_threshold=0.05 (repeatable).")
@infos_option
def command(config_path: str, checkpoint: Path, dataroot: str, version: str, split: str, out_dir: Path | None,
            distance_edges: str | None, device: str, batch_size: int | None, workers: int | None,
            overrides: tuple[str, ...], infos: str | None, trust_checkpoint: bool) -> None:
    """Evaluate a teacher checkpoint on a split: prints mAP, NDS, the TP errors and per-class AP."""
    edges = parse_distance_edges(distance_edges)

    import dataclasses
    import time

    from ..pipeline.config import from_dict, load_config, to_dict
    from ..pipeline.data.collate import collate_samples
    from ..pipeline.data.dataset import NuScenesDetectionDataset
    from ..pipeline.errors import ConfigError
    from ..pipeline.eval import format_metrics_table
    from ..pipeline.eval.nuscenes_eval import summary_metrics
    from ..pipeline.precision import set_memory_format
    from ..pipeline.teacher.checkpoint import load_teacher_checkpoint
    from ..pipeline.teacher.config import TeacherExperimentConfig, TeacherModelConfig
    from ..pipeline.teacher.model import CenterPointTeacher
    from ..pipeline.teacher.train import evaluate_teacher

    start = time.perf_counter()
    torch_device = checked_device(device)
    config = load_config(TeacherExperimentConfig, config_path, [*overrides, *infos_override(infos)])
    data = dataclasses.replace(config.data, dataroot=str(dataroot), version=version, load_images=False)
    # the checkpoint first: a file that cannot be used fails before the dataroot is read
    model = CenterPointTeacher(config.model)
    report = load_teacher_checkpoint(model, checkpoint, strict=True, trust_checkpoint=trust_checkpoint)
    if report.config is not None:
        try:  # through the loader, so values derived since the checkpoint was written compare as what they are
            stored = to_dict(from_dict(TeacherModelConfig, report.config, source=str(checkpoint)))
        except ConfigError:
            stored = report.config
        differences = config_differences(stored, to_dict(config.model))
        if differences:
            log.warning("%s was trained with another model config than %s (checkpoint -> config): %s; the "
                        "evaluation uses the config's", checkpoint, config_path, "; ".join(differences))
    model = set_memory_format(model.to(torch_device), config.train.channels_last).eval()

    dataset = NuScenesDetectionDataset(data, split, mode="test")
    out_dir = out_dir if out_dir is not None else checkpoint.parent / f"eval_{checkpoint.stem}_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = evaluate_teacher(model, dataset, collate_samples, torch_device, out_dir,
                               batch_size if batch_size is not None else config.train.batch_size,
                               workers if workers is not None else config.train.num_workers)
    click.echo(format_metrics_table(summary))
    decoder_summary = out_dir / "decoder" / "metrics_summary.json"
    if model.has_decoder and decoder_summary.is_file():
        click.echo("\nDETR decoder head:")
        click.echo(format_metrics_table(json.loads(decoder_summary.read_text())))
    if edges is not None:
        from ..pipeline.eval.distance import evaluate_by_distance, format_distance_table

        click.echo("\nAP by ego distance (x100; a band's mAP averages the classes with GT in it):")
        click.echo(format_distance_table(evaluate_by_distance(out_dir / "results.json", dataset, out_dir, edges)))
    record = {"checkpoint": str(checkpoint), "checkpoint_sha256": report.sha256,  # of the bytes loaded
              "checkpoint_source": report.source, "mmdet3d_version": report.mmdet3d_version,
              "box_convention": report.box_convention, "config": str(config_path), "dataroot": str(dataroot),
              "version": version, "split": split, "samples": len(dataset), "device": str(torch_device),
              "metrics": summary_metrics(summary), "metrics_summary": str(out_dir / "metrics_summary.json")}
    (out_dir / "evaluation.json").write_text(json.dumps(record, indent=1))
    log.info("evaluated %s on %d samples of %s in %.1f s; metrics in %s", checkpoint, len(dataset), split,
             time.perf_counter() - start, out_dir)

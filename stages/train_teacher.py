"""`distillbev train-teacher`: train the CenterPoint-pillar LiDAR teacher and evaluate it on the val split.

Under torchrun it trains with DistributedDataParallel, one process per rank:

    torchrun --standalone --nproc-per-node 8 -m distillbev.cli train-teacher --config ... --device cuda --sync-bn
    torchrun --standalone --nproc-per-node 8 --no-python distillbev train-teacher ...
"""

from __future__ import annotations

import json
import logging

import click

from .options import infos_option, infos_override

log = logging.getLogger(__name__)


@click.command("train-teacher")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Teacher experiment YAML (e.g. configs/synthetic/teacher.yaml).")
@click.option("--dataroot", required=True, type=click.Path(file_okay=False),
              help="nuScenes-format dataroot; overrides data.dataroot of the config.")
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory for checkpoints, logs and evaluation.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=2 (repeatable).")
@click.option("--device", default="cpu", show_default=True,
              help="torch device: cpu or cuda[:N]; under torchrun cpu or cuda (each rank takes cuda:LOCAL_RANK).")
@click.option("--resume", is_flag=True, help="Continue from RUN/latest.pth (model, optimiser, schedule, RNG); "
                                             "any world size.")
@click.option("--sync-bn", is_flag=True, help="Under torchrun on CUDA: synchronise BatchNorm across the ranks "
                                              "(mmdet3d's --sync-bn).")
@infos_option
def command(config_path: str, dataroot: str, run_dir: str, overrides: tuple[str, ...], device: str,
            resume: bool, sync_bn: bool, infos: str | None) -> None:
    """Train the LiDAR teacher; writes RUN/latest.pth and RUN/eval/metrics_summary.json."""
    from pathlib import Path

    from ..pipeline.config import load_config
    from ..pipeline.distributed import init_from_env
    from ..pipeline.errors import ConfigError
    from ..pipeline.teacher.config import TeacherExperimentConfig
    from ..pipeline.teacher.train import run_teacher_training

    import dataclasses

    config = load_config(TeacherExperimentConfig, config_path, [*overrides, *infos_override(infos)])
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, dataroot=str(dataroot)))
    run = Path(run_dir)
    if not resume and (run / "latest.pth").exists():
        raise ConfigError(f"{run}: already holds a teacher run (latest.pth); pass --resume to continue it "
                          f"or choose another --out")
    world, device = init_from_env(device)  # checks the device; a CUDA rank takes cuda:LOCAL_RANK
    summary = run_teacher_training(config, run, device=device, resume=resume, world=world, sync_bn=sync_bn)
    if not world.is_main:
        return
    metrics = summary.get("metrics") or {}
    line = {"run_dir": summary["run_dir"], "steps": summary["steps"], "checkpoint": summary["checkpoint"]}
    if metrics:
        line.update({"mAP": metrics.get("mean_ap"), "NDS": metrics.get("nd_score")})
    click.echo(json.dumps(line))

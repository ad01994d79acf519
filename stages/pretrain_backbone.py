"""`distillbev pretrain-backbone`: pretrain a camera student's image backbone on the train split's images.

The students' ResNets start from ImageNet (BEVDet, BEVDepth) or FCOS3D (BEVFormer) weights in the paper. Where those
cannot be downloaded, this stage trains the student's own backbone on 2D object centres and their depth over the
train split (pipeline/student/pretrain.py) and writes OUT/backbone.pth for the student's `backbone.pretrained`:

    distillbev pretrain-backbone --config configs/street/student_bevdet.yaml --dataroot DATA --out runs/backbone
    distillbev train-student --config configs/street/student_bevdet.yaml --dataroot DATA --baseline \\
        --set model.backbone.pretrained=runs/backbone/backbone.pth --out runs/baseline
"""

from __future__ import annotations

import json

import click

from .options import infos_option, infos_override


@click.command("pretrain-backbone")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Student experiment YAML; its data, model.backbone and pretrain sections are used.")
@click.option("--dataroot", required=True, type=click.Path(file_okay=False),
              help="nuScenes-format dataroot; overrides data.dataroot of the config.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for backbone.pth, pretrain_log.jsonl and config.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set pretrain.epochs=12 (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu or cuda[:N].")
@infos_option
def command(config_path: str, dataroot: str, out_dir: str, overrides: tuple[str, ...], device: str,
            infos: str | None) -> None:
    """Train the student's ResNet on 2D centres and depth of the train split's boxes; writes OUT/backbone.pth."""
    import dataclasses
    from pathlib import Path

    from ..pipeline.config import load_config
    from ..pipeline.distill.config import StudentExperimentConfig
    from ..pipeline.distributed import check_device
    from ..pipeline.student.pretrain_run import pretrain_backbone

    config = load_config(StudentExperimentConfig, config_path, [*overrides, *infos_override(infos)])
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, dataroot=str(dataroot)))
    device = check_device(device)
    click.echo(json.dumps(pretrain_backbone(config, Path(out_dir), device)))

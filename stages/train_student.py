"""`distillbev train-student`: a camera student, baseline or distilled from the cached teacher.

Under torchrun it trains with DistributedDataParallel, one process per rank (`train.batch_size` per rank):

    torchrun --standalone --nproc-per-node 8 -m distillbev.cli train-student --config ... --device cuda --sync-bn
    torchrun --standalone --nproc-per-node 8 --no-python distillbev train-student ...
"""

from __future__ import annotations

from pathlib import Path

import click

from .options import infos_option, infos_override, storage_option


@click.command("train-student")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Student experiment YAML (configs/synthetic/student_*.yaml, configs/nuscenes/student_*.yaml).")
@click.option("--dataroot", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="nuScenes-format dataroot (overrides data.dataroot).")
@click.option("--cache", "cache_path", default=None,
              help="Teacher-feature cache made by extract-teacher (targets cache / approximate): a folder or an "
                   "s3:// (fsspec) URL.")
@storage_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@click.option("--baseline", is_flag=True, help="Train without distillation (same schedule and seed).")
@click.option("--targets", type=click.Choice(["cache", "approximate", "online"]), default=None,
              help="Where teacher targets come from (default: the config's `targets`).")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Teacher checkpoint: the live teacher for --targets online; with --cache, the cache must have "
                   "been extracted from it (its SHA-256 is compared before the first step).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load the teacher checkpoint with full unpickling, for a file that needs classes outside the "
                   "weights-only allow list (which is refused otherwise): unpickling runs any code the file carries, "
                   "so only for a file you made or whose source you trust. Logged as a warning.")
@click.option("--teacher-config", "teacher_config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="--targets online: the live teacher's experiment YAML (configs/nuscenes/teacher_pillar02.yaml): "
                   "its model, and the sweeps and point features it reads (data.num_sweeps, data.point_features). "
                   "Needed for a checkpoint that does not record them (an mmdet3d file, a checkpoints/epoch_N.pth); "
                   "a teacher run's latest.pth records both.")
@click.option("--resume", is_flag=True, help="Continue from RUN/latest.pth (any world size).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N; under torchrun cpu or cuda (each rank takes cuda:LOCAL_RANK).")
@click.option("--sync-bn", is_flag=True, help="Under torchrun on CUDA: synchronise BatchNorm across the ranks "
                                              "(mmdet3d's --sync-bn).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (smoke runs).")
@click.option("--verify-data", default="32", show_default=True, metavar="N|all|none",
              help="With --cache: before step 1, re-hash the LiDAR (and virtual-point) files of N random train samples "
                   "and compare them with the bytes the cache was extracted from (its input_digest); `all` checks "
                   "every file (under torchrun each rank a share), `none` skips. The log line states the size and "
                   "time; a difference is an error naming the sample and file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
@infos_option
def command(config_path: Path, dataroot: Path | None, cache_path: str | None, storage_options: tuple[str, ...],
            out: Path, baseline: bool, targets: str | None, teacher_checkpoint: Path | None,
            teacher_config_path: Path | None, resume: bool, device: str, max_steps: int | None,
            overrides: tuple[str, ...], sync_bn: bool, infos: str | None, trust_checkpoint: bool,
            verify_data: str) -> None:
    """Train a BEVDet / BEVDepth / BEVDet4D / BEVDepth4D / BEVFormer student, then evaluate it with the devkit.

    Distilled runs read their targets from --cache (replaying each cached view's BEV augmentation); the cache is
    checked against the config before the first step. Writes RUN/config.yaml, RUN/train_log.jsonl (every loss
    term per step), RUN/checkpoints/, RUN/latest.pth and RUN/eval/metrics_summary.json. --targets online runs
    the frozen teacher of --teacher-checkpoint (with --teacher-config for a file that does not record its config)
    at every step instead.
    """
    import dataclasses
    import logging

    from ..pipeline.cache.input_digest import parse_verify_data
    from ..pipeline.cache.location import StoreLocation, parse_storage_options
    from ..pipeline.config import load_config
    from ..pipeline.distill.config import StudentExperimentConfig
    from ..pipeline.distributed import check_sync_bn, init_from_env
    from ..pipeline.distill.run import train_student
    from ..pipeline.errors import ConfigError
    from ..pipeline.eval import format_metrics_table
    from ..pipeline.teacher.config import TeacherExperimentConfig

    try:
        verify_data = parse_verify_data(verify_data)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--verify-data") from None
    sets = list(overrides)
    if baseline:
        sets.append("distillation=false")
    if targets is not None:
        sets.append(f"targets={targets}")
    sets += infos_override(infos)
    cfg = load_config(StudentExperimentConfig, config_path, sets)
    if dataroot is not None:  # a new config object: the loaded one is never written into
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataroot=str(dataroot)))
    teacher_config = None
    if teacher_config_path is not None:
        if not cfg.distillation or cfg.targets != "online":
            raise ConfigError(f"--teacher-config {teacher_config_path}: only --targets online runs a live teacher "
                              f"(this run: {'baseline' if not cfg.distillation else 'targets ' + cfg.targets}); "
                              f"drop --teacher-config, or pass --targets online")
        teacher_config = load_config(TeacherExperimentConfig, teacher_config_path)
    cache = None if cache_path is None else StoreLocation.parse(cache_path, parse_storage_options(storage_options))
    world, device = init_from_env(device)
    check_sync_bn(world, device, sync_bn)  # refused before anything is written
    if not world.is_main:  # rank 0 alone reports; the others say only what went wrong
        logging.getLogger("distillbev").setLevel(logging.WARNING)
    summary = train_student(cfg, out, cache_path=cache, device=device, resume=resume,
                            teacher_checkpoint=teacher_checkpoint, teacher_config=teacher_config, max_steps=max_steps,
                            world=world, sync_bn=sync_bn, trust_checkpoint=trust_checkpoint, verify_data=verify_data)
    if world.is_main:
        click.echo(format_metrics_table(summary))

"""`distillbev dataset-stats`: statistics of a nuScenes-format dataroot beside real nuScenes' figures.

    distillbev dataset-stats --dataroot data/synthetic --version v1.0-synthetic
    distillbev dataset-stats --dataroot /data/nuscenes --version v1.0-mini --json
"""

from __future__ import annotations

import click


@click.command("dataset-stats")
@click.option("--dataroot", required=True, type=click.Path(file_okay=False, exists=True),
              help="nuScenes-format dataroot.")
@click.option("--version", "version", default="v1.0-synthetic", show_default=True,
              help="Table folder: v1.0-mini, v1.0-trainval, v1.0-synthetic, ...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of markdown tables.")
def command(dataroot: str, version: str, as_json: bool) -> None:
    """Annotations per key frame, class shares, annotation range, LiDAR rows per key frame (returns, and rows near
    the sensor: rays without a return and the car's own body) and points per box, sweeps before each scene's first
    key frame and camera time offsets."""
    import json

    from ..pipeline.data.loading import load_nuscenes
    from ..pipeline.data.stats import dataset_statistics, format_statistics

    nusc = load_nuscenes(dataroot, version)
    stats = dataset_statistics(nusc, progress=not as_json)
    click.echo(json.dumps(stats.to_json(), indent=1) if as_json else format_statistics(stats))

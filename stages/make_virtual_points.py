"""`distillbev make-virtual-points`: MVP's virtual points beside the sweeps (samples|sweeps/LIDAR_TOP_VIRTUAL)."""

from __future__ import annotations

import click


@click.command(name="make-virtual-points")
@click.option("--dataroot", required=True, type=click.Path(file_okay=False), help="Dataroot that holds masks/.")
@click.option("--version", "version", default="v1.0-synthetic", show_default=True, help="Table folder name.")
@click.option("--split", default=None, help="Only the samples of this split (default: every sample).")
@click.option("--sweeps", type=int, default=10, show_default=True,
              help="Previous LIDAR_TOP records per key frame to cover (the loader's sweep candidates).")
@click.option("--workers", type=int, default=0, show_default=True, help="Worker processes (0: in this process).")
@click.option("--num-virtual", type=int, default=50, show_default=True, help="Pixels drawn per mask (MVP: 50).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pixel draws.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def command(dataroot: str, version: str, split: str | None, sweeps: int, workers: int, num_virtual: int, seed: int,
            no_progress: bool) -> None:
    """Lift the pixels of 2D instance masks to 3D virtual points (MVP) for every LiDAR key frame and sweep."""
    from distillbev.pipeline.errors import ConfigError
    from distillbev.pipeline.mvp.run import make_virtual_points

    if sweeps < 0 or workers < 0 or num_virtual < 1:
        raise ConfigError(f"make-virtual-points needs --sweeps >= 0, --workers >= 0 and --num-virtual >= 1, found "
                          f"{sweeps}, {workers} and {num_virtual}; fix the option")
    counts = make_virtual_points(dataroot, version, split, sweeps, workers, num_virtual, seed, not no_progress)
    click.echo(f"virtual points in {dataroot}: {counts['jobs']} LiDAR sample_data, {counts['written']} written, "
               f"{counts['skipped']} already done")

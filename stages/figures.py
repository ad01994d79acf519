"""`distillbev figures`: the poster's figures (training curves, attention maps, qualitative boxes) of student runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("figures")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs (default: RUN/figures when one run is given).")
@click.option("--cache", "cache_path", default=None,
              help="Teacher cache (a folder or an s3:// URL) for the teacher's attention maps (default: the maps "
                   "saved with a distilled run's snapshots, else the cache recorded in a distilled run's "
                   "run_info.json).")
@click.option("--samples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Val samples in the qualitative figure (evenly spaced over the split).")
@click.option("--score-threshold", type=click.FloatRange(0.0, 1.0), default=0.3, show_default=True,
              help="Predicted boxes below this score are not drawn.")
@click.option("--dataroot", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="nuScenes-format dataroot (overrides the runs' data.dataroot, e.g. after moving the data).")
def command(runs: tuple[Path, ...], out: Path | None, cache_path: str | None, samples: int,
            score_threshold: float, dataroot: Path | None) -> None:
    """Draw curves.png (val mAP / NDS per epoch), attention.png (student attention after the first and the last
    epoch next to the teacher's, with their Pearson correlation) and qualitative.png (GT and every run's boxes in
    BEV and on CAM_FRONT) for the student RUN directories.

    The runs need train.eval_every > 0 for the curves and train.attention_snapshots: true for the attention maps;
    what a run lacks is named on its panel and in the log.
    """
    from ..pipeline.report.figures import draw_figures

    if out is None:
        if len(runs) > 1:
            raise click.UsageError("pass --out DIR when drawing several runs")
        out = runs[0] / "figures"
    report = draw_figures(list(runs), out, cache=cache_path, samples=samples, score_threshold=score_threshold,
                          dataroot=None if dataroot is None else str(dataroot))
    for run, by_epoch in report.similarity.items():
        if by_epoch:
            click.echo(f"{run}: attention vs teacher, Pearson r " + ", ".join(
                f"epoch {epoch} {r:.3f}" for epoch, r in sorted(by_epoch.items())))
    click.echo("written: " + ", ".join(str(path) for path in report.paths.values()))
    if report.notes:
        click.echo(f"{len(report.notes)} input(s) missing, see the panels: " + "; ".join(report.notes))

"""`distillbev inspect-cache`: show, verify, measure, draw and compare a teacher-feature cache.

    distillbev inspect-cache runs/cache.zarr                       # readable summary (--json for machines)
    distillbev inspect-cache runs/cache.zarr --verify --workers 2  # read every chunk; exit 1 naming each bad one
    distillbev inspect-cache runs/cache.zarr --stats --subset 20   # per-layer fp32 statistics
    distillbev inspect-cache runs/cache.zarr --render 0 --out sample0.png --view 1
    distillbev inspect-cache runs/fp16.zarr --compare runs/int8.zarr

With --json every requested section is printed as one JSON object {"summary": ..., "verify": ..., ...}.
"""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

import click

from .options import storage_option


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def format_summary(summary: dict[str, Any]) -> str:
    """The text form of `CacheSummary.to_json()`."""
    s, grid, views, samples = summary, summary["bev_grid"], summary["views"], summary["samples"]
    config = summary["teacher"]["config"]
    leaves = [f"{k}={json.dumps(v)}" for k, v in config.items() if not isinstance(v, dict)]
    leaves += [f"{k}={{{len(v)} keys}}" for k, v in config.items() if isinstance(v, dict)]
    status = s["status"] if s["status"] == "complete" else (
        f"{s['status']} ({samples['sample_views_done']} of {samples['sample_views_total']} sample-views done)")
    lines = [
        f"store      {s['path']}",
        f"schema     v{s['schema_version']}  status {status}  created {s['created_at']}  "
        f"package {s['package_version']}",
        f"teacher    {s['teacher']['checkpoint_path']}  sha256 {s['teacher']['checkpoint_sha256_short']}",
        *textwrap.wrap(", ".join(leaves), 110, initial_indent="  config   ", subsequent_indent="           "),
        f"dataset    {s['dataset']['dataroot']}  version {s['dataset']['version']}  split {s['dataset']['split']}  "
        f"sweeps {s['dataset']['num_sweeps']}",
        f"BEV grid   x [{grid['x_min']:g}, {grid['x_max']:g}) y [{grid['y_min']:g}, {grid['y_max']:g}) m at "
        f"{grid['resolution']:g} m = {grid['shape'][0]}x{grid['shape'][1]} cells",
        "layers",
    ]
    for name, layer in s["layers"].items():
        lines.append(f"  {name:<14} C={layer['channels']:<5} {layer['shape'][0]}x{layer['shape'][1]:<6} "
                     f"{layer['resolution']:g} m/cell  {layer['dtype']}  {layer['codec']}")
    lines.append(f"  {'heatmap':<14} C={s['heatmap']['channels']:<5} {s['heatmap']['shape'][0]}x"
                 f"{s['heatmap']['shape'][1]:<6} {s['storage']['heatmap_dtype']}; attention "
                 f"{s['storage']['attention_dtype']} (tau {s['storage']['attention_temperature']:g}); occupancy "
                 f"{s['occupancy']['shape'][0]}x{s['occupancy']['shape'][1]}")
    lines += [
        f"views      {views['count']} per sample, seed {views['seed']}, rotation {views['rotation_range']} rad, "
        f"scale {views['scale_range']}, flip probabilities x {views['flip_x_prob']:g} y {views['flip_y_prob']:g}",
        f"samples    {samples['complete']} of {samples['total']} complete, {samples['missing']} missing; "
        f"sample-views {samples['sample_views_done']} / {samples['sample_views_total']} done",
    ]
    if samples["missing_tokens"]:
        lines.append(f"  missing: {', '.join(samples['missing_tokens'][:8])}"
                     f"{' ...' if samples['missing'] > 8 else ''}")
    lines.append(f"storage    {_size(s['stored_bytes'])} on disk, {_size(s['raw_bytes'])} raw, "
                 f"ratio {_ratio(s['compression_ratio'])}")
    lines.append(f"  {'array':<28} {'shape':<24} {'dtype':<8} {'on disk':>10} {'raw':>10} {'ratio':>7}")
    for array in s["arrays"]:
        if array["name"].startswith("teacher_head/"):
            continue
        lines.append(f"  {array['name']:<28} {str(tuple(array['shape'])):<24} {array['dtype']:<8} "
                     f"{_size(array['stored_bytes']):>10} {_size(array['raw_bytes']):>10} "
                     f"{_ratio(array['compression_ratio']):>7}")
    head = [a for a in s["arrays"] if a["name"].startswith("teacher_head/")]
    lines.append(f"  teacher_head: {len(head)} parameters, {_size(sum(a['stored_bytes'] for a in head))} on disk")
    return "\n".join(lines)


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"statistics over {stats['sample_views']} sample-views of {len(stats['samples'])} samples (fp32)",
             f"  {'map':<26} {'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'zeros':>7}"]
    for m in stats["maps"]:
        lines.append(f"  {m['name']:<26} {m['mean']:>10.4g} {m['std']:>10.4g} {m['min']:>10.4g} {m['max']:>10.4g} "
                     f"{m['zero_fraction']:>7.1%}")
        if m["name"].startswith("features/"):
            top = ", ".join(f"c{c} {e:.3g}" for c, e in m["top_channels"])
            lines.append(f"      channel energy (mean of squares): top {top}; near-dead "
                         f"{m['near_dead_channels']} of {len(m['channel_energy'])}")
        elif m["name"].startswith("attention/"):
            lines.append(f"      half of the attention mass sits on {m['extra']['half_mass_cell_fraction']:.1%} "
                         f"of the cells")
        else:
            extra = m["extra"]
            lines.append(f"      max-class probability > {extra['fp_threshold']:g} on "
                         f"{extra['above_fp_threshold']:.1%} of cells; occupancy {extra['occupied_cell_fraction']:.1%}")
            lines.append("      class max: " + " ".join(f"{v:.2f}" for v in extra["class_max"]))
    return "\n".join(lines)


def format_compare(report: dict[str, Any]) -> str:
    lines = [f"{report['path_a']}  vs  {report['path_b']}: {report['sample_views']} sample-views of "
             f"{report['common_samples']} common samples"
             + (f" ({report['skipped_views']} views skipped: different augmentation)" if report["skipped_views"]
                else ""),
             f"  {'map':<26} {'cos mean':>9} {'cos min':>9} {'max |a-b|':>10} {'mean |a-b|':>11}  worst view"]
    for a in report["arrays"]:
        lines.append(f"  {a['name']:<26} {a['cosine_mean']:>9.6f} {a['cosine_min']:>9.6f} {a['max_abs']:>10.4g} "
                     f"{a['mean_abs']:>11.4g}  {a['cosine_min_at'][0]} v{a['cosine_min_at'][1]}")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the output always parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@click.command("inspect-cache")
@click.argument("store")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")
@click.option("--verify", is_flag=True, help="Read and check every chunk; exit 1 listing each bad sample-view.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Threads reading samples during --verify.")
@click.option("--stats", is_flag=True, help="Per-layer statistics (fp32) of features, attention and heatmap.")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="--stats over view 0 of this many evenly spaced samples (default: every sample-view).")
@click.option("--render", "render_sample", metavar="SAMPLE", default=None,
              help="Draw one sample (token or integer index) into the PNG given by --out.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG path for --render.")
@click.option("--view", default=0, show_default=True, type=click.IntRange(min=0), help="View drawn by --render.")
@click.option("--dataroot", type=click.Path(file_okay=False), default=None,
              help="Dataroot for the GT boxes of --render (default: the one in the manifest).")
@click.option("--compare", "compare_store", default=None,
              help="Another store (path or URL, same storage options): per-layer cosine similarity and max-abs "
                   "difference over common sample-views.")
def command(store: str, storage_options: tuple[str, ...], as_json: bool, verify: bool, workers: int, stats: bool,
            subset: int | None, render_sample: str | None, out: str | None, view: int, dataroot: str | None,
            compare_store: str | None) -> None:
    """Show what a teacher-feature cache holds (default), or verify, measure, draw or compare it."""
    from ..pipeline.cache.inspect.compare import compare_caches
    from ..pipeline.cache.inspect.stats import cache_stats
    from ..pipeline.cache.inspect.summary import summarize_cache
    from ..pipeline.cache.inspect.verify import verify_cache
    from ..pipeline.cache.location import StoreLocation, parse_storage_options
    from ..pipeline.errors import CacheError

    if render_sample is not None and out is None:
        raise click.UsageError("--render needs --out PNG")
    if subset is not None and not stats:
        raise click.UsageError("--subset applies to --stats")
    options = parse_storage_options(storage_options)
    store = StoreLocation.parse(store, options)
    if compare_store is not None:
        compare_store = StoreLocation.parse(compare_store, options if "://" in compare_store else None)
    actions = verify or stats or render_sample is not None or compare_store is not None
    summary = summarize_cache(store).to_json()
    result: dict[str, Any] = {"summary": summary}
    if not as_json and not actions:
        click.echo(format_summary(summary))
    if stats:
        result["stats"] = cache_stats(store, subset=subset, progress=not as_json).to_json()
        if not as_json:
            click.echo(format_stats(result["stats"]))
    if compare_store is not None:
        result["compare"] = compare_caches(store, compare_store, progress=not as_json).to_json()
        if not as_json:
            click.echo(format_compare(result["compare"]))
    if render_sample is not None:
        from ..pipeline.report.cache_render import render_sample as draw

        drawn = draw(store, render_sample, out, view=view, dataroot=dataroot)
        result["render"] = {"path": str(drawn.path), "sample_token": drawn.sample_token,
                            "sample_index": drawn.sample_index, "view": drawn.view, "titles": drawn.titles,
                            "warnings": drawn.warnings}
        if not as_json:
            click.echo(f"wrote {drawn.path} (sample {drawn.sample_token}, view {drawn.view}, "
                       f"{len(drawn.titles)} panels)")
    report = None
    if verify:
        report = verify_cache(store, workers=workers, progress=True)
        result["verify"] = report.to_json()
        if not as_json:
            if report.ok:
                click.echo(f"verify: OK, {report.sample_views_checked} sample-views, {report.chunks_read} chunks "
                           f"read in {report.seconds:.1f} s")
            else:
                click.echo(f"verify: {len(report.problems)} problems")
                for problem in report.problems:
                    click.echo(f"  {problem.describe()}")
    if as_json:
        click.echo(json.dumps(_finite(result), indent=2, default=_json_default))
    if report is not None and not report.ok:
        bad = report.bad_sample_views
        raise CacheError(f"{store}: verification failed with {len(report.problems)} problems in {len(bad)} "
                         f"sample-views (listed above); repair the store with `{report.repair_command}` (it "
                         f"re-extracts exactly the damaged sample-views and rewrites damaged tokens, views or head)")

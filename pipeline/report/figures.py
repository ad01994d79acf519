"""The poster's figures from student run directories: training curves, attention maps, qualitative boxes.

    report = draw_figures([Path("runs/bevdet_baseline"), Path("runs/bevdet_distilled")], Path("figures"))
    report.paths  # {"curves": .../curves.png, "attention": .../attention.png, "qualitative": .../qualitative.png}

- curves.png: mAP and NDS (x100) per epoch from each run's eval_history.jsonl (`train.eval_every`), one line per
  run, dashed for baselines.
- attention.png: one row per run; the student's spatial attention after the first and the last epoch
  (RUN/attention/epoch_XXX.npz, `train.attention_snapshots`) and the teacher's for the same train sample at BEV
  view 0, each on its own colour scale with its maximum in the title (the mean is 1, so the maximum says how sharp
  it is). Each student panel gives the Pearson correlation r with the teacher map
  (`pipeline.distill.progress.attention_similarity`): for the sample shown and the mean over the snapshot's samples.
- qualitative.png: `pipeline/eval/qualitative.py`.

A run that lacks an input keeps its place: its line, row or boxes say what is missing and which option or config
field produces it, and the same sentence is logged as a warning (and returned in `report.notes`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.location import StoreLocation, store_exists
from ..cache.reader import TeacherCache
from ..config import load_config
from ..data.dataset import NuScenesDetectionDataset
from ..data.loading import load_nuscenes
from ..distill.config import StudentExperimentConfig
from ..distill.progress import (HISTORY_FILE, AttentionSnapshot, attention_similarity, load_snapshot, read_history,
                                snapshot_paths)
from ..errors import CacheError, ConfigError, DistillBEVError
from ..losses.attention import spatial_attention
from .qualitative import RUN_COLOURS, plot_qualitative

log = logging.getLogger(__name__)

DPI = 100
CURVES_SIZE = (11.0, 4.25)  # inches (1100 x 425 pixels)
ATTENTION_COLUMN_INCHES = 3.75  # attention.png: 3 columns, one row per run, 0.5 in for the title
ATTENTION_ROW_INCHES = 3.5


@dataclass
class StudentRun:
    """A train-student run directory: its config, whether it distils, and the cache it was trained from."""

    path: Path
    config: StudentExperimentConfig
    distilled: bool
    cache: StoreLocation | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return f"{self.name} ({'distilled' if self.distilled else 'baseline'})"


@dataclass
class FiguresReport:
    paths: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    similarity: dict[str, dict[int, float]] = field(default_factory=dict)  # run -> epoch -> mean Pearson r
    drawn: list = field(default_factory=list)  # qualitative.DrawnSample per row of qualitative.png


def load_run(path: Path) -> StudentRun:
    """Read RUN/config.yaml and RUN/run_info.json (written when the run finishes); ConfigError if not a run."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{path}: not a student run directory (no config.yaml); pass directories written by "
                          f"`distillbev train-student --out RUN`")
    try:
        cfg = load_config(StudentExperimentConfig, config_path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: config.yaml is not a student experiment config ({exc}); pass train-student "
                          f"run directories") from None
    info_path = path / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    targets = info.get("targets", cfg.targets if cfg.distillation else "none")
    cache = info.get("cache")
    return StudentRun(path, cfg, targets != "none", None if cache is None else StoreLocation.parse(cache))


def _warn(notes: list[str], message: str) -> None:
    notes.append(message)
    log.warning("%s", message)


def _message_panel(ax, message: str) -> None:
    import textwrap

    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 42)), ha="center", va="center", fontsize=8,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------------------ curves
def plot_curves(runs: list[StudentRun], out: Path, notes: list[str]) -> Path:
    """curves.png: mAP and NDS per evaluated epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=CURVES_SIZE, constrained_layout=True)
    histories = {run.name: read_history(run.path / HISTORY_FILE) for run in runs}
    for run in runs:
        if not histories[run.name]:
            _warn(notes, f"{run.name}: no {HISTORY_FILE}; train it with --set train.eval_every=N for a point every "
                         f"N epochs")
        elif len(histories[run.name]) == 1 and run.config.train.eval_every == 0:
            _warn(notes, f"{run.name}: {HISTORY_FILE} holds the final evaluation only; train it with --set "
                         f"train.eval_every=N for a point every N epochs")
    for ax, metric in zip(axes, ("mAP", "NDS")):
        if not any(histories.values()):
            _message_panel(ax, f"no run has a {HISTORY_FILE}: train with --set train.eval_every=N to evaluate the "
                               f"val split every N epochs")
            ax.set_title(metric)
            continue
        for i, run in enumerate(runs):
            history = histories[run.name]
            style = dict(color=RUN_COLOURS[i % len(RUN_COLOURS)], linestyle="-" if run.distilled else "--",
                         marker="o", markersize=4)
            if history:
                ax.plot([r["epoch"] for r in history], [100 * r[metric] for r in history], label=run.label, **style)
            else:
                ax.plot([], [], label=f"{run.label}: no {HISTORY_FILE}", **style)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (x100)")
        ax.set_title(f"val {metric} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------- attention
def _attention_panel(fig, ax, attention: np.ndarray, extent: tuple[float, float, float, float], title: str) -> None:
    """One (Y, X) attention map in metres, +y up, on its own colour scale (its mean is 1, so the maximum in the
    title says how sharp it is)."""
    image = ax.imshow(attention, origin="lower", extent=extent, cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8.5)
    ax.tick_params(labelsize=7)


def teacher_maps_from_cache(path: StoreLocation, snapshot: AttentionSnapshot,
                            run: StudentRun) -> tuple[np.ndarray, str]:
    """(S, Yt, Xt) teacher attention of the snapshot's samples at view 0 of the cache at `path`; CacheError naming
    what does not fit (grid, layer, sample, view 0 not the identity)."""
    cache = TeacherCache.open(path)
    bev = run.config.model.bev
    grid = cache.manifest["bev_grid"]
    expected = {"x_min": bev.x_min, "x_max": bev.x_max, "y_min": bev.y_min, "y_max": bev.y_max}
    differences = [f"{k}: {grid[k]} -> {v}" for k, v in expected.items() if float(grid[k]) != float(v)]
    if differences:
        raise CacheError(f"{path}: the cache's BEV grid is not the run's (cache -> run: {'; '.join(differences)})")
    if snapshot.teacher_layer not in cache.manifest["layers"]:
        raise CacheError(f"{path}: the cache holds no teacher layer {snapshot.teacher_layer!r} "
                         f"(it holds {sorted(cache.manifest['layers'])})")
    maps = []
    for token in snapshot.tokens:
        index = cache.index_of(token)
        if not cache.bev_aug(index, snapshot.view).is_identity:
            raise CacheError(f"{path}: view {snapshot.view} of sample {token} is not the identity view")
        targets = cache.read(index, snapshot.view)
        if cache.manifest["storage"]["attention_temperature"] == snapshot.temperature:
            maps.append(targets.attention[snapshot.teacher_layer].numpy())
        else:
            features = targets.features[snapshot.teacher_layer][None]
            maps.append(spatial_attention(features, snapshot.temperature)[0].numpy())
    return np.stack(maps).astype(np.float32), f"cache {path.name} (view {snapshot.view})"


def teacher_maps_for(snapshot: AttentionSnapshot, run: StudentRun, stored: list[AttentionSnapshot],
                     caches: list[StoreLocation]) -> tuple[np.ndarray | None, str]:
    """The teacher's maps for a snapshot's samples: stored with it or with another run's snapshot of the same
    samples, else read from the first cache that fits; (None, why not) otherwise."""
    for other in [snapshot, *stored]:
        if other.teacher_maps is not None and other.tokens == snapshot.tokens \
                and other.teacher_layer == snapshot.teacher_layer and other.temperature == snapshot.temperature:
            return other.teacher_maps, other.teacher_source
    problems = []
    for path in caches:
        try:
            return teacher_maps_from_cache(path, snapshot, run)
        except CacheError as exc:
            problems.append(str(exc))
    if problems:
        return None, "; ".join(problems)
    return None, (f"no teacher attention for {run.name}: pass --cache STORE (the teacher cache of split "
                  f"{run.config.data.train_split!r})")


def plot_attention(runs: list[StudentRun], out: Path, notes: list[str],
                   cache: StoreLocation | Path | str | None = None) -> dict[str, dict[int, float]]:
    """attention.png (rows = runs; early student, late student, teacher); returns run -> epoch -> mean r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = None if cache is None else StoreLocation.parse(cache)
    if cache is not None and not store_exists(cache):
        raise CacheError(f"{cache}: no teacher cache at this path; pass the store made by `distillbev "
                         f"extract-teacher` for the runs' train split")
    snapshots = {run.name: [load_snapshot(p) for p in snapshot_paths(run.path)] for run in runs}
    stored = [s for found in snapshots.values() for s in found]
    caches = [cache] if cache is not None else []
    caches += [run.cache for run in runs
               if run.cache is not None and store_exists(run.cache) and run.cache not in caches]
    fig, axes = plt.subplots(len(runs), 3, squeeze=False, constrained_layout=True,
                             figsize=(3 * ATTENTION_COLUMN_INCHES, ATTENTION_ROW_INCHES * len(runs) + 0.5))
    similarity: dict[str, dict[int, float]] = {}
    for row, run in enumerate(runs):
        found = snapshots[run.name]
        if not found:
            message = (f"{run.name}: no attention/epoch_*.npz; train it with --set train.attention_snapshots=true")
            _warn(notes, message)
            for ax in axes[row]:
                _message_panel(ax, message)
            continue
        early, late = (found[0], found[-1]) if len(found) > 1 else (None, found[-1])
        teacher, source = teacher_maps_for(late, run, stored, caches)
        if teacher is None:
            _warn(notes, f"{run.name}: {source}")
        bev = run.config.model.bev
        extent = (bev.x_min, bev.x_max, bev.y_min, bev.y_max)
        similarity[run.name] = {}
        for ax, snapshot in zip(axes[row][:2], (early, late)):
            if snapshot is None:
                _message_panel(ax, f"{run.name}: a single snapshot (epoch {late.epoch}); a run of two or more "
                                   f"epochs also has the one after its first epoch")
                continue
            title = f"{run.label}\nepoch {snapshot.epoch}, {snapshot.feature_label}, max {snapshot.maps[0].max():.1f}"
            if teacher is not None:
                r = attention_similarity(snapshot.maps, teacher)
                similarity[run.name][snapshot.epoch] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
                title += f"\nr = {r[0]:.2f} (mean of {len(r)} samples: {similarity[run.name][snapshot.epoch]:.2f})"
            _attention_panel(fig, ax, snapshot.maps[0], extent, title)
        if teacher is None:
            _message_panel(axes[row][2], source)
        else:
            _attention_panel(fig, axes[row][2], teacher[0], extent,
                             f"teacher {late.teacher_layer}, max {teacher[0].max():.1f}\n{source}")
    reference = next((s[-1] for s in snapshots.values() if s), None)
    if reference is not None:
        fig.suptitle(f"spatial attention Y*X*softmax(mean_c|F|/T), T = {reference.temperature:g}, of train sample "
                     f"{reference.tokens[0][:10]} at BEV view {reference.view}; r: Pearson correlation with the "
                     f"teacher's map", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return similarity


# ----------------------------------------------------------------------------------------------------- entry
def draw_figures(run_dirs: list[Path], out: Path, cache: StoreLocation | Path | str | None = None, samples: int = 3,
                 score_threshold: float = 0.3, dataroot: str | None = None) -> FiguresReport:
    """curves.png, attention.png and qualitative.png of the runs into `out`.

    dataroot overrides the runs' data.dataroot (for the qualitative figure). The runs must share their val set
    (dataroot, version, val split): the qualitative figure draws them on the same samples.
    """
    if not run_dirs:
        raise ConfigError("figures: pass at least one student run directory")
    runs = [load_run(Path(p)) for p in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"figures: run directory names label the figures and must differ, found {names}")
    for run in runs:
        if dataroot is not None:
            run.config.data.dataroot = str(dataroot)
    val_sets = {(run.config.data.dataroot, run.config.data.version, run.config.data.val_split) for run in runs}
    if len(val_sets) > 1:
        raise ConfigError(f"figures: the runs evaluate on different val sets (dataroot, version, split: "
                          f"{sorted(val_sets)}); pass runs of one dataset")
    out = Path(out)
    report = FiguresReport(paths={})
    report.paths["curves"] = plot_curves(runs, out / "curves.png", report.notes)
    report.similarity = plot_attention(runs, out / "attention.png", report.notes, cache)
    report.paths["attention"] = out / "attention.png"
    data = dataclasses.replace(runs[0].config.data, num_sweeps=0, sweep_candidates=0, load_images=False)
    try:
        dataset = NuScenesDetectionDataset(data, data.val_split, mode="test")  # poses and GT only
        nusc = load_nuscenes(data.dataroot, data.version)
    except DistillBEVError as exc:
        raise type(exc)(f"{exc} (the qualitative figure reads the runs' val split; pass --dataroot if the data "
                        f"moved)") from None
    bev = runs[0].config.model.bev
    figure = plot_qualitative(runs, out / "qualitative.png", dataset, nusc, samples, score_threshold,
                              (bev.x_min, bev.x_max, bev.y_min, bev.y_max))
    report.paths["qualitative"] = figure.path
    report.notes += figure.notes
    report.drawn = figure.drawn
    return report

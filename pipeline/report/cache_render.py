"""One figure of what the cache holds for a sample-view: features, attention, heatmap, regions and occupancy.

    result = render_sample("runs/cache.zarr", sample="3", out="sample3.png", view=1)
    result.titles  # the panel titles, in drawing order

Layout: one row per distilled layer with its channel-norm map (L2 norm over C) and its spatial attention; a third
column holds the head-grid panels: the teacher heatmap (max over classes) with the GT boxes, the foreground /
background / false-positive regions that the distillation loss would use (pipeline/losses/regions.py with the
DistillConfig thresholds), and the teacher's occupancy canvas. Every panel is drawn in metres in the (augmented)
LiDAR frame with origin='lower', so +y is up and +x to the right. GT comes from the dataset named in the manifest
(or `dataroot`), with the view's BEV augmentation applied; without it the GT panels say so and the rest is drawn.
A head cell is foreground when its lower CORNER lies in a box (the loss's rule), so the green cells of a box sit up
to one cell up and right of its outline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache.location import StoreLocation
from ..cache.reader import TeacherCache
from ..data.config import DataConfig
from ..data.dataset import NuScenesDetectionDataset
from ..errors import CacheError, DistillBEVError
from ..geometry.bev import BEVAugmentation, BEVGrid
from ..geometry.transforms import box_corners
from ..heads.targets import gt_heatmap_max
from ..losses.config import DistillConfig
from ..losses.regions import build_region_masks

logger = logging.getLogger(__name__)

REGION_COLOURS = ("#e4e6eb", "#2ca02c", "#d62728")  # background, foreground, false positive
PANEL_INCHES = 4.3


@dataclass
class RenderResult:
    path: Path
    sample_token: str
    sample_index: int
    view: int
    titles: list[str]  # panel titles in drawing order
    warnings: list[str]


@dataclass
class GroundTruth:
    """GT of one sample-view in the augmented LiDAR frame: boxes (K, 9) and labels (K,)."""

    boxes: np.ndarray
    labels: np.ndarray


def resolve_sample(cache: TeacherCache, sample: str | int) -> int:
    """A sample token, or an integer index (also given as a string of digits), -> sample index."""
    text = str(sample).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < cache.num_samples:
            raise CacheError(f"{cache.path}: sample index {index} is outside 0..{cache.num_samples - 1}; "
                             f"pass an index in range or a sample token")
        return index
    return cache.index_of(text)


def load_ground_truth(manifest: dict[str, Any], token: str, bev_aug: BEVAugmentation,
                      dataroot: str | None = None) -> GroundTruth:
    """The sample's GT boxes from the dataset the cache was extracted from, augmented like the cached view.

    Raises DistillBEVError (or KeyError for a token outside the split) when the data cannot be read.
    """
    dataset_info = manifest["dataset"]
    config = DataConfig(dataroot=str(dataroot or dataset_info["dataroot"]), version=dataset_info["version"],
                        num_sweeps=0, sweep_candidates=0, load_images=False)
    dataset = NuScenesDetectionDataset(config, dataset_info["split"], mode="test")
    boxes, labels, _ = dataset.annotations(dataset.index_of(token))
    return GroundTruth(bev_aug.apply_boxes(boxes), labels)


def region_labels(ground_truth: GroundTruth, heatmap: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """(Yh, Xh) int: 0 background, 1 foreground, 2 false positive, on the head grid of `heatmap` (10, Yh, Xh)."""
    import torch

    defaults = DistillConfig()
    head_grid = grid.with_shape(*heatmap.shape[-2:])
    boxes = torch.from_numpy(ground_truth.boxes.astype(np.float32))
    labels = torch.from_numpy(ground_truth.labels.astype(np.int64))
    gt_max = gt_heatmap_max([boxes], [labels], head_grid)  # (1, Yh, Xh)
    masks = build_region_masks([boxes], tuple(heatmap.shape[-2:]), (grid.x_min, grid.x_max, grid.y_min, grid.y_max),
                               device="cpu", teacher_heatmap=torch.from_numpy(heatmap)[None], gt_heatmap_max=gt_max,
                               fp_threshold=defaults.fp_threshold, gt_threshold=defaults.gt_threshold)
    out = masks.foreground[0].numpy().astype(np.int64)  # (Yh, Xh)
    out[masks.false_positive[0].numpy()] = 2
    return out


def _draw_boxes(ax: Any, boxes: np.ndarray, colour: str) -> None:
    """Rotated BEV rectangles with a tick from the centre to the front edge (the heading)."""
    from matplotlib.patches import Polygon


    for box, corners in zip(boxes, box_corners(boxes) if len(boxes) else []):
        ax.add_patch(Polygon(corners[:4, :2], closed=True, fill=False, edgecolor=colour, linewidth=1.2))
        front = box[:2] + 0.5 * box[3] * np.array([math.cos(box[6]), math.sin(box[6])])
        ax.plot([box[0], front[0]], [box[1], front[1]], color=colour, linewidth=1.2)


def _show(fig: Any, ax: Any, image: np.ndarray, extent: tuple[float, float, float, float], title: str,
          cmap: Any, colorbar: bool = True, **kwargs: Any) -> None:
    shown = ax.imshow(image, origin="lower", extent=extent, cmap=cmap, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9.5)
    ax.set_xlabel("x (m)", fontsize=8)
    ax.set_ylabel("y (m)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)


def _augmentation_text(bev_aug: BEVAugmentation) -> str:
    flips = [name for name, on in (("y->-y", bev_aug.flip_x), ("x->-x", bev_aug.flip_y)) if on]
    return (f"rotation {math.degrees(bev_aug.rotation):+.1f} deg, scale {bev_aug.scale:.3f}, "
            f"flip {', '.join(flips) if flips else 'none'}")


def render_sample(path: str | Path | StoreLocation, sample: str | int, out: str | Path, view: int = 0,
                  dataroot: str | None = None, dpi: int = 110) -> RenderResult:
    """Draw one sample-view of a store into a PNG at `out`; see the module docstring for the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cache = TeacherCache.open(path, allow_partial=True)
    index = resolve_sample(cache, sample)
    if not 0 <= view < cache.num_views:
        raise CacheError(f"{cache.path}: --view {view} is outside 0..{cache.num_views - 1}")
    targets = cache.read(index, view)
    manifest = cache.manifest
    grid = BEVGrid(**manifest["bev_grid"])
    extent = (grid.x_min, grid.x_max, grid.y_min, grid.y_max)
    warnings: list[str] = []
    ground_truth = None
    try:
        ground_truth = load_ground_truth(manifest, targets.sample_token, targets.bev_aug, dataroot)
    except (DistillBEVError, KeyError, OSError) as exc:
        source = dataroot or manifest["dataset"]["dataroot"]
        reason = f"GT unavailable: {' '.join(str(exc).split())[:200]}"
        warnings.append(f"{reason}; pass --dataroot with the {manifest['dataset']['version']} dataroot "
                        f"(tried {source}) to draw the GT boxes and regions")
        logger.warning("%s", warnings[-1])

    layers = cache.layers
    rows = max(len(layers), 3)
    fig, axes = plt.subplots(rows, 3, figsize=(3 * PANEL_INCHES + 0.6, rows * PANEL_INCHES * 0.86 + 0.5),
                             squeeze=False, constrained_layout=True)
    titles = []
    for row, layer in enumerate(layers):
        features = targets.features[layer.name].numpy()  # (C, Y, X)
        norm = np.sqrt((features.astype(np.float64) ** 2).sum(axis=0))  # (Y, X)
        titles.append(f"{layer.name}: L2 norm over C ({layer.channels}x{layer.shape[0]}x{layer.shape[1]}, "
                      f"{layer.resolution:g} m)")
        _show(fig, axes[row, 0], norm, extent, titles[-1], "viridis")
        titles.append(f"{layer.name}: attention ({layer.shape[0]}x{layer.shape[1]}, mean 1)")
        _show(fig, axes[row, 1], targets.attention[layer.name].numpy(), extent, titles[-1], "magma", vmin=0)
    heatmap = targets.heatmap.numpy()  # (10, Yh, Xh)
    head_shape = heatmap.shape[-2:]
    gt_note = "" if ground_truth is None else f", {len(ground_truth.boxes)} GT boxes"
    titles.append(f"heatmap: max over {heatmap.shape[0]} classes ({head_shape[0]}x{head_shape[1]}{gt_note})")
    _show(fig, axes[0, 2], heatmap.max(axis=0), extent, titles[-1], "inferno", vmin=0, vmax=1)
    if ground_truth is not None:
        _draw_boxes(axes[0, 2], ground_truth.boxes, "#7fdbff")
        regions = region_labels(ground_truth, heatmap, grid)
        counts = [int((regions == k).sum()) for k in range(3)]
        titles.append(f"regions on head grid ({head_shape[0]}x{head_shape[1]}): fg {counts[1]}, fp {counts[2]}, "
                      f"bg {counts[0]}")
        _show(fig, axes[1, 2], regions, extent, titles[-1], ListedColormap(REGION_COLOURS), colorbar=False,
              vmin=-0.5, vmax=2.5)
        _draw_boxes(axes[1, 2], ground_truth.boxes, "#1a1a1a")
        axes[1, 2].legend(handles=[Patch(color=c, label=n) for c, n in zip(
            REGION_COLOURS, ("background", "foreground", "false positive"))], loc="upper right", fontsize=7,
            framealpha=0.85)
    else:
        titles.append("regions: GT unavailable (dataroot not readable)")
        axes[1, 2].set_title(titles[-1], fontsize=9.5)
        axes[1, 2].text(0.5, 0.5, "\n".join(_wrap(warnings[-1], 48)), ha="center", va="center", fontsize=8,
                        transform=axes[1, 2].transAxes, wrap=True)
        axes[1, 2].set_xticks([])
        axes[1, 2].set_yticks([])
    occupancy = targets.occupancy.numpy()
    titles.append(f"occupancy ({occupancy.shape[0]}x{occupancy.shape[1]}, {occupancy.mean():.1%} of cells)")
    _show(fig, axes[2, 2], occupancy.astype(np.float32), extent, titles[-1], "Greys", colorbar=False, vmin=0, vmax=1)
    for row in range(len(layers), rows):  # fewer layers than head panels
        axes[row, 0].axis("off")
        axes[row, 1].axis("off")
    for row in range(3, rows):
        axes[row, 2].axis("off")
    fig.suptitle(f"{cache.path.name}  |  sample {targets.sample_token} (#{index})  |  view {view}: "
                 f"{_augmentation_text(targets.bev_aug)}  |  {manifest['storage']['dtype']}, teacher "
                 f"{manifest['teacher']['checkpoint_sha256'][:12]}", fontsize=10.5)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return RenderResult(out, targets.sample_token, index, view, titles, warnings)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)

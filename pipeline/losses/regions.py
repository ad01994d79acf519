"""Region masks (foreground, background, false positive) and their adaptive scales on one BEV feature grid.

Rules from distillbev_method.md sections 2 and 4 (the released BEVDet distillation code, `BD` below):
- foreground: the cell CORNER point lies inside a GT box in BEV (z ignored), no enlargement (BD L755-843);
- false positive: GT Gaussian heatmap < gt_threshold, teacher heatmap > fp_threshold, not foreground (BD L846-970);
- background: not foreground and not false positive (BD L1111-1122);
- scales: s_fg = sqrt(cell_area / (l * w)) of the first containing box, s_bg = 1 / N_bg, s_fp = 1 / N_fp,
  S = max(s_fg, s_bg) on foreground cells and s_bg elsewhere (`scale_mask='combine_gt'`).
Every mask is built without gradient, vectorised over cells and boxes, on the device of the inputs.
Maps are laid out [Y, X] (row = y index).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

# Points within this distance (metres) of a box edge count as outside: mmdet3d's points_in_rbbox treats the
# boundary as outside, and the margin keeps that decision stable under float32 rounding.
BOUNDARY_MARGIN = 1e-4


@dataclass
class RegionMasks:
    """Masks and scales of one layer for a batch, all detached.

    foreground:        (B, Y, X) bool, cell corner inside a GT box.
    background:        (B, Y, X) bool, neither foreground nor false positive.
    false_positive:    (B, Y, X) bool, or None on layers without the FP region.
    scale:             (B, Y, X) float, S = max(s_fg, s_bg) on foreground cells and s_bg elsewhere.
    foreground_scale:  (B, Y, X) float, s_fg on foreground cells, 0 elsewhere.
    background_scale:  (B,) float, s_bg = 1 / N_bg (0 when N_bg <= 0).
    false_positive_scale: (B,) float, s_fp = 1 / N_fp (0 when N_fp = 0), or None.
    """

    foreground: Tensor
    background: Tensor
    false_positive: Tensor | None
    scale: Tensor
    foreground_scale: Tensor
    background_scale: Tensor
    false_positive_scale: Tensor | None

    def to(self, device: torch.device | str) -> "RegionMasks":
        return RegionMasks(**{f.name: None if getattr(self, f.name) is None else
                              getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def check_shape(self, batch: int, shape: tuple[int, int], with_false_positive: bool, where: str) -> None:
        """Raise a ValueError unless the masks are (batch, *shape) and carry the FP region exactly when asked."""
        expected = (batch, *shape)
        if tuple(self.foreground.shape) != expected:
            raise ValueError(f"{where}: precomputed region masks have shape {tuple(self.foreground.shape)}, expected "
                             f"(B, Y, X) = {expected}")
        if (self.false_positive is not None) != with_false_positive:
            raise ValueError(f"{where}: precomputed region masks {'lack' if with_false_positive else 'carry'} the "
                             f"false-positive region the layer {'needs' if with_false_positive else 'does not use'}")


def cat_region_masks(parts: list[RegionMasks]) -> RegionMasks:
    """Concatenate per-sample (or per-chunk) masks along the batch: every rule is per sample, so the masks of a batch
    are exactly the concatenation of its samples' masks."""
    return RegionMasks(**{f.name: None if getattr(parts[0], f.name) is None else
                          torch.cat([getattr(part, f.name) for part in parts]) for f in fields(RegionMasks)})


def grid_resolution(shape: tuple[int, int], bev_extent: tuple[float, float, float, float]) -> tuple[float, float]:
    """Cell size (res_x, res_y) in metres of a (Y, X) map covering bev_extent = (x_min, x_max, y_min, y_max)."""
    num_y, num_x = shape
    x_min, x_max, y_min, y_max = bev_extent
    return (x_max - x_min) / num_x, (y_max - y_min) / num_y


def cell_corner_points(shape: tuple[int, int], bev_extent: tuple[float, float, float, float],
                       device: torch.device | str = "cpu") -> Tensor:
    """The BEV point of every cell, (Y, X, 2) with [..., 0] = x and [..., 1] = y.

    Rule (BD L766-767): the point of cell (iy, ix) is its lower CORNER, x = x_min + ix * res_x,
    y = y_min + iy * res_y, with no half-cell offset (the BEVDet code; the BEVFormer code adds the offset).
    """
    num_y, num_x = shape
    res_x, res_y = grid_resolution(shape, bev_extent)
    xs = bev_extent[0] + torch.arange(num_x, device=device, dtype=torch.float32) * res_x  # (X,)
    ys = bev_extent[2] + torch.arange(num_y, device=device, dtype=torch.float32) * res_y  # (Y,)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (Y, X) each: row = y index
    return torch.stack([grid_x, grid_y], dim=-1)


def points_in_boxes_bev(points: Tensor, boxes: Tensor) -> Tensor:
    """BEV rotated point-in-box test (P, K) of points (P, 2) against boxes (K, >=7) (x, y, z, l, w, h, yaw).

    Rule (BD L785-786): box z and height are neutralised, so only x, y, l, w and yaw matter; l lies along the box's
    own x axis (yaw CCW from +x). Points on the boundary (within BOUNDARY_MARGIN) are outside, as in mmdet3d.
    """
    offset = points[:, None, :2] - boxes[None, :, :2]  # (P, K, 2)
    cos, sin = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])  # (K,)
    local_x = offset[..., 0] * cos + offset[..., 1] * sin  # (P, K) coordinate along the box length
    local_y = -offset[..., 0] * sin + offset[..., 1] * cos  # (P, K) coordinate along the box width
    inside_x = local_x.abs() < boxes[:, 3] / 2 - BOUNDARY_MARGIN
    inside_y = local_y.abs() < boxes[:, 4] / 2 - BOUNDARY_MARGIN
    return inside_x & inside_y


@torch.no_grad()
def first_containing_box(boxes: Tensor, shape: tuple[int, int],
                         bev_extent: tuple[float, float, float, float]) -> Tensor:
    """Index of the first box containing each cell's corner point, (Y, X) int64, -1 where no box contains it.

    Rule (BD L795-800): where boxes overlap, a cell belongs to the FIRST box that contains it (np.unique keeps the
    first hit). The foreground mask is `index >= 0`.
    """
    points = cell_corner_points(shape, bev_extent, boxes.device).reshape(-1, 2)  # (Y*X, 2)
    if boxes.shape[0] == 0:
        return torch.full(shape, -1, dtype=torch.long, device=boxes.device)
    inside = points_in_boxes_bev(points, boxes.to(torch.float32))  # (Y*X, K)
    first = inside.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index
    index = torch.where(inside.any(dim=1), first, torch.full_like(first, -1))
    return index.reshape(shape)


def foreground_scale(box_index: Tensor, boxes: Tensor, cell_area: float) -> Tensor:
    """s_fg per cell, (Y, X): sqrt(cell_area / (l_k * w_k)) for a cell of box k, 0 off the foreground.

    Rule (BD L795-800): 1 / sqrt(box area in cells); no distance or class term. The square root is the code's choice
    (FGD uses 1 / area).
    """
    scale = torch.zeros(box_index.shape, dtype=torch.float32, device=box_index.device)
    inside = box_index >= 0
    if bool(inside.any()):
        box_area = (boxes[:, 3] * boxes[:, 4]).to(torch.float32).clamp_min(1e-12)  # (K,)
        scale[inside] = torch.sqrt(cell_area / box_area[box_index[inside]])
    return scale


def align_to_grid(mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """Bring a (B, Yh, Xh) bool mask onto a (Y, X) grid: max-pool when finer, repeat_interleave when coarser.

    Rule (BD L940-957): a coarse cell is FP if any of its fine cells is; a fine cell inherits its coarse cell.
    """
    source = tuple(mask.shape[-2:])
    if source == tuple(shape):
        return mask
    if all(s >= t for s, t in zip(source, shape)):
        if any(s % t for s, t in zip(source, shape)):
            raise ValueError(f"heatmap grid {source} is not an integer multiple of the layer grid {tuple(shape)}")
        kernel = (source[0] // shape[0], source[1] // shape[1])
        return F.max_pool2d(mask[:, None].float(), kernel_size=kernel, stride=kernel)[:, 0] > 0
    if all(s <= t for s, t in zip(source, shape)):
        if any(t % s for s, t in zip(source, shape)):
            raise ValueError(f"layer grid {tuple(shape)} is not an integer multiple of the heatmap grid {source}")
        mask = torch.repeat_interleave(mask, shape[0] // source[0], dim=-2)
        return torch.repeat_interleave(mask, shape[1] // source[1], dim=-1)
    raise ValueError(f"heatmap grid {source} is finer in one axis and coarser in the other than layer grid "
                     f"{tuple(shape)}; use grids that differ by one integer factor per axis")


def false_positive_mask(teacher_heatmap: Tensor, gt_heatmap_max: Tensor, foreground: Tensor,
                        fp_threshold: float, gt_threshold: float) -> Tensor:
    """False-positive cells (B, Y, X) bool.

    Rule (BD L852-920): [max over classes of GT Gaussian heatmap < gt_threshold] AND [max over classes of the
    (clip-sigmoided) teacher heatmap > fp_threshold], evaluated on the heatmap grid, then aligned to the layer grid
    (`align_to_grid`), AND NOT foreground.

    teacher_heatmap: (B, num_classes, Yh, Xh) probabilities; gt_heatmap_max: (B, Yh, Xh); foreground: (B, Y, X).
    """
    if teacher_heatmap.shape[-2:] != gt_heatmap_max.shape[-2:]:
        raise ValueError(f"teacher heatmap grid {tuple(teacher_heatmap.shape[-2:])} differs from the GT heatmap grid "
                         f"{tuple(gt_heatmap_max.shape[-2:])}; both must come from the same head grid")
    teacher_max = teacher_heatmap.amax(dim=1)  # (B, Yh, Xh)
    on_heatmap_grid = (gt_heatmap_max < gt_threshold) & (teacher_max > fp_threshold)
    aligned = align_to_grid(on_heatmap_grid, tuple(foreground.shape[-2:]))
    return aligned & ~foreground


def background_scale(foreground: Tensor, false_positive: Tensor | None) -> Tensor:
    """s_bg per sample, (B,): 1 / N_bg with N_bg = Y*X - N_fg (- N_fp on an FP layer), 0 when N_bg <= 0.

    Rule (BD L1123-1129): the FP cells leave the background and its normalisation is recomputed without them.
    """
    count = foreground.shape[-2] * foreground.shape[-1] - foreground.flatten(1).sum(dim=1)  # (B,)
    if false_positive is not None:
        count = count - false_positive.flatten(1).sum(dim=1)
    count = count.to(torch.float32)
    return torch.where(count > 0, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))


def false_positive_scale(false_positive: Tensor) -> Tensor:
    """s_fp per sample, (B,): 1 / N_fp (`fp_scale_mode='average'`), 0 for a sample without FP cells."""
    count = false_positive.flatten(1).sum(dim=1).to(torch.float32)  # (B,)
    return torch.where(count > 0, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))


def combined_scale(foreground: Tensor, foreground_scale_map: Tensor, background_scale_per_sample: Tensor) -> Tensor:
    """S (B, Y, X): max(s_fg, s_bg) on foreground cells, s_bg elsewhere (`scale_mask='combine_gt'`, BD L1163-1168)."""
    s_bg = background_scale_per_sample[:, None, None].expand_as(foreground_scale_map)  # (B, Y, X)
    return torch.where(foreground, torch.maximum(foreground_scale_map, s_bg), s_bg)


@torch.no_grad()
def build_region_masks(gt_boxes: list[Tensor], shape: tuple[int, int],
                       bev_extent: tuple[float, float, float, float], *, device: torch.device | str,
                       teacher_heatmap: Tensor | None = None, gt_heatmap_max: Tensor | None = None,
                       fp_threshold: float = 0.1, gt_threshold: float = 0.1,
                       box_index: Tensor | None = None) -> RegionMasks:
    """All masks and scales of one (Y, X) layer grid for a batch.

    gt_boxes: B tensors (K_b, >=7) in the augmented LiDAR frame. The FP region is added when both heatmaps are
    given (teacher_heatmap (B, num_classes, Yh, Xh), gt_heatmap_max (B, Yh, Xh)). `box_index` (B, Y, X) may pass a
    precomputed `first_containing_box` result for this grid.
    """
    res_x, res_y = grid_resolution(shape, bev_extent)
    if box_index is None:
        box_index = torch.stack([
            first_containing_box(torch.as_tensor(boxes, device=device), shape, bev_extent) for boxes in gt_boxes])
    foreground = box_index >= 0  # (B, Y, X)
    fg_scale = torch.stack([
        foreground_scale(index, torch.as_tensor(boxes, device=device), res_x * res_y)
        for index, boxes in zip(box_index, gt_boxes)])  # (B, Y, X)
    false_positive = None
    fp_scale = None
    if teacher_heatmap is not None and gt_heatmap_max is not None:
        false_positive = false_positive_mask(teacher_heatmap.to(device), gt_heatmap_max.to(device), foreground,
                                             fp_threshold, gt_threshold)
        fp_scale = false_positive_scale(false_positive)
    background = ~foreground if false_positive is None else ~foreground & ~false_positive
    bg_scale = background_scale(foreground, false_positive)
    return RegionMasks(foreground=foreground, background=background, false_positive=false_positive,
                       scale=combined_scale(foreground, fg_scale, bg_scale), foreground_scale=fg_scale,
                       background_scale=bg_scale, false_positive_scale=fp_scale)

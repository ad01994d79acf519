"""CenterPoint training targets: per-task gaussian heatmaps and per-object regression targets.

A box centre (x, y) maps to the continuous head-grid position ((x - x_min) / res, (y - y_min) / res); its integer
part (ix, iy) is the cell that carries the heatmap peak and the regression targets, and the fractional part is the
`reg` target (CenterPoint measures offsets from the cell's lower corner, not its centre). Heatmaps are laid out
[Y, X]. The gaussian radius follows CenterPoint/mmdet3d (`gaussian_radius`, including its r = (b + sqrt) / 2 form).

Regression target per object (10 values): reg_x, reg_y, z (gravity centre), log l, log w, log h, sin yaw, cos yaw,
vx, vy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.bev import BEVGrid

BOX_CODE_SIZE = 10


def gaussian_radius(length_cells: float, width_cells: float, min_overlap: float = 0.1) -> float:
    """CenterPoint's gaussian radius (in cells) for a box of the given BEV size (in cells)."""
    height, width = length_cells, width_cells
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + np.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return float(min(r1, r2, r3))


def gaussian_kernel(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) gaussian with sigma = diameter / 6, peak 1, tiny values zeroed (as CenterNet)."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets[None, :] ** 2 + offsets[:, None] ** 2) / (2 * sigma * sigma))
    kernel[kernel < np.finfo(kernel.dtype).eps * kernel.max()] = 0
    return kernel


def draw_gaussian(heatmap: np.ndarray, ix: int, iy: int, radius: int) -> None:
    """Max-composite a gaussian of `radius` centred on cell (iy, ix) into `heatmap` (Y, X) in place."""
    kernel = gaussian_kernel(radius)
    num_y, num_x = heatmap.shape
    left, right = min(ix, radius), min(num_x - ix, radius + 1)
    top, bottom = min(iy, radius), min(num_y - iy, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return
    window = heatmap[iy - top:iy + bottom, ix - left:ix + right]
    patch = kernel[radius - top:radius + bottom, radius - left:radius + right]
    np.maximum(window, patch.astype(heatmap.dtype), out=window)


def box_radius(box: np.ndarray, grid: BEVGrid, min_overlap: float, min_radius: int) -> int:
    """Integer gaussian radius (cells) of one box (9,), at least `min_radius`."""
    length_cells = box[3] / grid.resolution
    width_cells = box[4] / grid.resolution
    return max(min_radius, int(gaussian_radius(length_cells, width_cells, min_overlap)))


def box_cell(box: np.ndarray, grid: BEVGrid) -> tuple[float, float, int, int] | None:
    """Continuous grid position (cx, cy) and cell (ix, iy) of a box centre, or None outside the grid."""
    cx = (float(box[0]) - grid.x_min) / grid.resolution
    cy = (float(box[1]) - grid.y_min) / grid.resolution
    ix, iy = int(np.floor(cx)), int(np.floor(cy))
    if not (0 <= ix < grid.num_x and 0 <= iy < grid.num_y):
        return None
    return cx, cy, ix, iy


def encode_box(box: np.ndarray, cx: float, cy: float, ix: int, iy: int) -> np.ndarray:
    """The 10-value regression target of one box (9,) at cell (ix, iy)."""
    x_offset, y_offset = cx - ix, cy - iy
    length, width, height = (max(float(v), 1e-3) for v in box[3:6])
    yaw = float(box[6])
    return np.array([x_offset, y_offset, box[2], np.log(length), np.log(width), np.log(height),
                     np.sin(yaw), np.cos(yaw), box[7], box[8]], dtype=np.float32)


@dataclass
class TaskTargets:
    """Targets of one CenterHead task for a batch.

    heatmap: (B, C_task, Y, X) gaussian heatmaps; boxes: (B, M, 10) regression targets;
    indices: (B, M) flat cell index iy * X + ix; mask: (B, M) bool, True where a slot holds an object.
    """

    heatmap: torch.Tensor
    boxes: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor


def build_targets(gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], grid: BEVGrid,
                  tasks: tuple[tuple[str, ...], ...], class_names: tuple[str, ...],
                  gaussian_overlap: float = 0.1, min_radius: int = 2,
                  max_objects: int = 500) -> list[TaskTargets]:
    """Per-task targets for a batch.

    gt_boxes: B tensors (K_b, 9) x, y, z (gravity centre), l, w, h, yaw, vx, vy; gt_labels: B tensors (K_b,) ids
    into `class_names`. Objects whose centre lies outside `grid` get no target. Tensors are returned on the
    device of the first box tensor.
    """
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    batch = len(gt_boxes)
    class_to_slot = {}
    for task_index, task in enumerate(tasks):
        for class_slot, name in enumerate(task):
            class_to_slot[class_names.index(name)] = (task_index, class_slot)
    per_task_entries: list[list[list[tuple[int, np.ndarray]]]] = [[[] for _ in range(batch)] for _ in tasks]
    heatmaps = [np.zeros((batch, len(task), grid.num_y, grid.num_x), dtype=np.float32) for task in tasks]
    for b in range(batch):
        boxes = gt_boxes[b].detach().cpu().double().numpy().reshape(-1, 9)
        labels = gt_labels[b].detach().cpu().numpy().reshape(-1)
        for box, label in zip(boxes, labels):
            if int(label) not in class_to_slot or box[3] <= 0 or box[4] <= 0:
                continue
            task_index, class_slot = class_to_slot[int(label)]
            if len(per_task_entries[task_index][b]) >= max_objects:
                continue
            cell = box_cell(box, grid)
            if cell is None:
                continue
            cx, cy, ix, iy = cell
            draw_gaussian(heatmaps[task_index][b, class_slot], ix, iy,
                          box_radius(box, grid, gaussian_overlap, min_radius))
            per_task_entries[task_index][b].append((iy * grid.num_x + ix, encode_box(box, cx, cy, ix, iy)))
    targets = []
    for task_index in range(len(tasks)):
        slots = max([len(e) for e in per_task_entries[task_index]] + [1])
        boxes = np.zeros((batch, slots, BOX_CODE_SIZE), dtype=np.float32)
        indices = np.zeros((batch, slots), dtype=np.int64)
        mask = np.zeros((batch, slots), dtype=bool)
        for b, entries in enumerate(per_task_entries[task_index]):
            for slot, (index, code) in enumerate(entries):
                boxes[b, slot], indices[b, slot], mask[b, slot] = code, index, True
        targets.append(TaskTargets(heatmap=torch.from_numpy(heatmaps[task_index]).to(device),
                                   boxes=torch.from_numpy(boxes).to(device),
                                   indices=torch.from_numpy(indices).to(device),
                                   mask=torch.from_numpy(mask).to(device)))
    return targets


def gt_heatmap_max(gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], grid: BEVGrid,
                   gaussian_overlap: float = 0.1, min_radius: int = 2) -> torch.Tensor:
    """(B, Y, X) max over all classes of the CenterPoint GT gaussian heatmap on `grid`.

    Every box with a valid label (>= 0) counts whatever its class (the false-positive rule of the distillation
    only asks "is a GT object near this cell"). Same radius rule as `build_targets`.
    """
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    out = np.zeros((len(gt_boxes), grid.num_y, grid.num_x), dtype=np.float32)
    for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        labels = labels.detach().cpu().numpy().reshape(-1)
        for box, label in zip(boxes.detach().cpu().double().numpy().reshape(-1, 9), labels):
            if label < 0 or box[3] <= 0 or box[4] <= 0:
                continue
            cell = box_cell(box, grid)
            if cell is None:
                continue
            _, _, ix, iy = cell
            draw_gaussian(out[b], ix, iy, box_radius(box, grid, gaussian_overlap, min_radius))
    return torch.from_numpy(out).to(device)

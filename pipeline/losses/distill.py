"""The DistillBEV feature-distillation loss over several (student, teacher) layer pairs.

Per layer (distillbev_method.md section 5), with D = (S' - T)^2, S' the adapted student feature:

    L = (1/B) * sum_{b,c,y,x} [alpha*M_fg*S*A + beta*M_bg*S*A + gamma*M_fp*s_fp*A*Ac_c] * D
        + lambda_sp * (1/B) * sum_{b,y,x} | mean_c T - g(mean_c S') |

Sums run over C, Y and X and only the batch is averaged: the 1/N scales do the spatial normalisation and the
weights (6e-3 / 4e-2 / 6e-2 / 2.5e-3) are tuned for that. There is no global KD weight. Gradients reach the student
features, the adapters and g; the teacher, the masks and the attention are constants.

Ablation switches (`DistillConfig`):
- region_decomposition=False: one uniform region, weight plain_weight * A / (Y*X) on every cell (no FP region, no
  box scales); attention and the spatial L1 term still follow their own switches;
- attention=False: A = 1 and Ac = 1;
- adaptive_scaling=False: fg and bg cells both scaled by s_bg = 1/N_bg (the reference's `scale_mask='bg_only'`
  ablation mode); the FP region keeps its 1/N_fp;
- false_positive=False: no FP region on any layer, background = not foreground;
- spatial_l1=False: no L1 term and no g.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapters import SpatialPoolConv, build_adapter, upsample_factor
from .attention import blend_spatial_attention, channel_attention, spatial_attention
from .config import DistillConfig, LayerPairConfig
from .regions import RegionMasks, build_region_masks, first_containing_box


def squared_error_per_cell(adapted_student: Tensor, teacher: Tensor, channel_weights: Tensor | None = None) -> Tensor:
    """sum_c a[b,c] * (S' - T)^2, (B, Y, X): the channel sum of the squared error (no 1/C, BD L1259-1262).

    adapted_student, teacher: (B, C, Y, X); channel_weights: (B, C) or None (= 1).
    """
    squared = (adapted_student - teacher) ** 2  # (B, C, Y, X)
    if channel_weights is None:
        return squared.sum(dim=1)
    return torch.einsum("bc,bcyx->byx", channel_weights, squared)


def batch_weighted_sum(per_cell: Tensor, cell_weights: Tensor) -> Tensor:
    """(1/B) * sum_{b,y,x} w[b,y,x] * e[b,y,x], a scalar: summed over cells, divided by the batch size only."""
    return (per_cell * cell_weights).sum() / per_cell.shape[0]


def spatial_pool_l1(adapted_student: Tensor, teacher: Tensor, spatial_conv: nn.Module) -> Tensor:
    """(1/B) * sum_{b,y,x} | mean_c T - g(mean_c S') |, a scalar (BD L1272-1278; mean of signed values, not |.|)."""
    teacher_pool = teacher.mean(dim=1, keepdim=True)  # (B, 1, Y, X)
    student_pool = adapted_student.mean(dim=1, keepdim=True)  # (B, 1, Y, X)
    return (teacher_pool - spatial_conv(student_pool)).abs().sum() / adapted_student.shape[0]


class LayerDistillation(nn.Module):
    """The trainable parts of one layer pair: the student adapter and (optionally) the spatial-pool conv g."""

    def __init__(self, pair: LayerPairConfig, student_channels: int, teacher_channels: int,
                 student_shape: tuple[int, int], teacher_shape: tuple[int, int], use_spatial_l1: bool) -> None:
        super().__init__()
        self.pair = pair
        self.teacher_channels = teacher_channels
        self.teacher_shape = tuple(teacher_shape)
        # a resampling adapter takes any grid ratio; the others need an integer upsample factor
        factor = 1 if pair.adapter == "resample_conv1x1" else upsample_factor(tuple(student_shape),
                                                                               self.teacher_shape, pair.name)
        self.adapter = build_adapter(pair.adapter, student_channels, teacher_channels, factor, self.teacher_shape)
        self.spatial_conv = SpatialPoolConv() if use_spatial_l1 else None

    def adapt(self, student_features: Tensor) -> Tensor:
        """(B, C_s, Y_s, X_s) -> (B, C_t, Y_t, X_t), checked against the teacher grid."""
        adapted = self.adapter(student_features)
        expected = (self.teacher_channels, *self.teacher_shape)
        if tuple(adapted.shape[1:]) != expected:
            raise ValueError(f"distill layer {self.pair.name!r}: the adapted student feature has (C, Y, X) = "
                             f"{tuple(adapted.shape[1:])} but the teacher feature needs {expected}; check the "
                             f"student/teacher shapes given to DistillBEVLoss")
        return adapted


def layer_loss_terms(config: DistillConfig, name: str, adapted_student: Tensor, teacher: Tensor,
                     regions: RegionMasks, attention: Tensor | None, spatial_conv: nn.Module | None
                     ) -> dict[str, Tensor]:
    """The loss terms of one layer: kd_<name>_{fg,bg,fp} (or _plain) and kd_<name>_spatial.

    adapted_student, teacher: (B, C, Y, X) float32; attention: (B, Y, X) spatial attention or None (= 1);
    regions: the layer's masks (regions.false_positive is None on layers without the FP region).
    """
    num_cells = teacher.shape[-2] * teacher.shape[-1]
    spatial = attention if attention is not None else torch.ones_like(regions.scale)  # (B, Y, X)
    terms: dict[str, Tensor] = {}
    per_cell = squared_error_per_cell(adapted_student, teacher)  # (B, Y, X), shared by the region terms
    if not config.region_decomposition:
        weights = spatial * (config.plain_weight / num_cells)
        terms[f"kd_{name}_plain"] = batch_weighted_sum(per_cell, weights)
    else:
        if config.adaptive_scaling:
            scale = regions.scale
        else:
            scale = regions.background_scale[:, None, None].expand_as(regions.scale)
        fg_weights = regions.foreground.float() * scale * spatial * config.foreground_weight
        bg_weights = regions.background.float() * scale * spatial * config.background_weight
        terms[f"kd_{name}_fg"] = batch_weighted_sum(per_cell, fg_weights)
        terms[f"kd_{name}_bg"] = batch_weighted_sum(per_cell, bg_weights)
        if regions.false_positive is not None:
            fp_scale = regions.false_positive_scale[:, None, None]  # (B, 1, 1)
            fp_weights = regions.false_positive.float() * fp_scale * spatial * config.false_positive_weight
            # Channel attention weights only the FP term: a quirk of the reference code (BD L1284), kept on purpose.
            if config.attention:
                fp_per_cell = squared_error_per_cell(adapted_student, teacher,
                                                     channel_attention(teacher, config.temperature))
            else:
                fp_per_cell = per_cell
            terms[f"kd_{name}_fp"] = batch_weighted_sum(fp_per_cell, fp_weights)
    if spatial_conv is not None:
        terms[f"kd_{name}_spatial"] = config.spatial_l1_weight * spatial_pool_l1(adapted_student, teacher,
                                                                                 spatial_conv)
    return terms


class DistillBEVLoss(nn.Module):
    """DistillBEV's multi-layer feature distillation; owns the adapters and the g convs (trainable, train-only).

    student_channels / teacher_channels: channels per feature name; student_shapes / teacher_shapes: (Y, X) per
    feature name; bev_extent: (x_min, x_max, y_min, y_max) in metres, shared by every map.
    """

    def __init__(self, config: DistillConfig, student_channels: dict[str, int], teacher_channels: dict[str, int],
                 student_shapes: dict[str, tuple[int, int]], teacher_shapes: dict[str, tuple[int, int]],
                 bev_extent: tuple[float, float, float, float]) -> None:
        super().__init__()
        self.config = config
        self.bev_extent = tuple(float(v) for v in bev_extent)
        self.pairs = list(config.layers)
        self.layers = nn.ModuleDict()
        for pair in self.pairs:
            for side, names in (("student", (student_channels, student_shapes)),
                                ("teacher", (teacher_channels, teacher_shapes))):
                feature = getattr(pair, side)
                if any(feature not in table for table in names):
                    raise ValueError(f"distill layer {pair.name!r}: no {side} channels/shape given for feature "
                                     f"{feature!r}; known: {sorted(names[0])}")
            self.layers[pair.name] = LayerDistillation(
                pair, student_channels[pair.student], teacher_channels[pair.teacher],
                tuple(student_shapes[pair.student]), tuple(teacher_shapes[pair.teacher]), config.spatial_l1)

    def uses_false_positive(self, pair: LayerPairConfig) -> bool:
        """Whether this pair gets the FP region under the current switches."""
        return pair.use_false_positive and self.config.false_positive and self.config.region_decomposition

    @property
    def needs_gt_heatmap(self) -> bool:
        """Whether some pair has the false-positive region, which reads the teacher and GT heatmaps."""
        return any(self.uses_false_positive(pair) for pair in self.pairs)

    def forward(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                gt_boxes: list[Tensor], teacher_heatmap: Tensor | None = None, gt_heatmap_max: Tensor | None = None,
                teacher_attention: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Scalar loss terms keyed kd_<layer>_<term>; sum them for the KD loss.

        student_features: name -> (B, C_s, Y_s, X_s); teacher_features: name -> (B, C_t, Y_t, X_t);
        gt_boxes: B tensors (K_b, >=7) x, y, z, l, w, h, yaw in the augmented LiDAR frame;
        teacher_heatmap: (B, num_classes, Y_h, X_h) probabilities; gt_heatmap_max: (B, Y_h, X_h), both needed only
        by layers with the FP region; teacher_attention: teacher name -> precomputed A^T (B, Y_t, X_t), else computed.
        """
        terms: dict[str, Tensor] = {}
        box_index_by_grid: dict[tuple[int, int], Tensor] = {}  # foreground is shared by layers on the same grid
        for pair in self.pairs:
            layer = self.layers[pair.name]
            student = _feature(student_features, pair.student, "student", pair.name)
            teacher = _feature(teacher_features, pair.teacher, "teacher", pair.name).detach().float()
            if len(gt_boxes) != teacher.shape[0] or student.shape[0] != teacher.shape[0]:
                raise ValueError(f"distill layer {pair.name!r}: batch sizes differ: student {student.shape[0]}, "
                                 f"teacher {teacher.shape[0]}, gt_boxes {len(gt_boxes)}")
            adapted = layer.adapt(student).float()
            grid = tuple(teacher.shape[-2:])
            if grid not in box_index_by_grid:
                box_index_by_grid[grid] = torch.stack([
                    first_containing_box(torch.as_tensor(boxes, device=teacher.device), grid, self.bev_extent)
                    for boxes in gt_boxes])  # (B, Y, X)
            with_fp = self.uses_false_positive(pair)
            if with_fp and (teacher_heatmap is None or gt_heatmap_max is None):
                raise ValueError(f"distill layer {pair.name!r} uses the false-positive region: pass teacher_heatmap "
                                 f"and gt_heatmap_max, or set use_false_positive / false_positive to false")
            regions = build_region_masks(
                gt_boxes, grid, self.bev_extent, device=teacher.device,
                teacher_heatmap=teacher_heatmap if with_fp else None,
                gt_heatmap_max=gt_heatmap_max if with_fp else None,
                fp_threshold=self.config.fp_threshold, gt_threshold=self.config.gt_threshold,
                box_index=box_index_by_grid[grid])
            attention = self._attention(pair, adapted, teacher, teacher_attention)
            terms.update(layer_loss_terms(self.config, pair.name, adapted, teacher, regions, attention,
                                          layer.spatial_conv))
        return terms

    def _attention(self, pair: LayerPairConfig, adapted: Tensor, teacher: Tensor,
                   teacher_attention: dict[str, Tensor] | None) -> Tensor | None:
        """A (B, Y, X) = blend of teacher and adapted-student spatial attention, detached; None when switched off."""
        if not self.config.attention:
            return None
        if teacher_attention is not None and pair.teacher in teacher_attention:
            attention_teacher = teacher_attention[pair.teacher].to(teacher.device).float()
            expected = (teacher.shape[0], *teacher.shape[-2:])
            if tuple(attention_teacher.shape) != expected:
                raise ValueError(f"distill layer {pair.name!r}: precomputed teacher attention has shape "
                                 f"{tuple(attention_teacher.shape)}, expected (B, Y, X) = {expected}")
        else:
            attention_teacher = spatial_attention(teacher, self.config.temperature)
        ratio = self.config.student_attention_ratio
        if ratio == 0:
            return attention_teacher.detach()
        attention_student = spatial_attention(adapted, self.config.temperature)
        return blend_spatial_attention(attention_teacher, attention_student, ratio)


def _feature(features: dict[str, Tensor], name: str, side: str, pair_name: str) -> Tensor:
    if name not in features:
        raise ValueError(f"distill layer {pair_name!r}: {side} feature {name!r} missing; got {sorted(features)}")
    return features[name]

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

Student-independent inputs. The region masks and scales, the GT heatmap of the FP rule, the teacher's spatial and
channel attention and the teacher's channel mean depend only on (sample, view, GT) and the teacher's maps. With cached
or warped targets the DataLoader workers compute them per sample (`precompute_targets`, a `PrecomputedTargets` batch);
with a live teacher the workers still give the GT-only parts (foreground box index, the GT heatmap, whole masks of
layers without the FP region). Whatever is not given is computed in the loss, with the same functions: every rule is
per sample, so the two paths give the same values (tests/losses/test_losses_precomputed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..precision import Precision, autocast
from .adapters import SpatialPoolConv, build_adapter, upsample_factor
from .attention import blend_spatial_attention, channel_attention, spatial_attention
from .config import DistillConfig, LayerPairConfig
from .regions import RegionMasks, build_region_masks, cat_region_masks, first_containing_box


def squared_error_per_cell(adapted_student: Tensor, teacher: Tensor, channel_weights: Tensor | None = None) -> Tensor:
    """sum_c a[b,c] * (S' - T)^2, (B, Y, X): the channel sum of the squared error (no 1/C, BD L1259-1262).

    adapted_student, teacher: (B, C, Y, X); channel_weights: (B, C) or None (= 1).
    """
    squared = (adapted_student - teacher) ** 2  # (B, C, Y, X)
    if channel_weights is None:
        return squared.sum(dim=1)
    return torch.einsum("bc,bcyx->byx", channel_weights, squared)


class _ChannelSums(torch.autograd.Function):
    """The channel reductions of one layer's loss from a single difference tensor:
    sum_c (S' - T)^2; with channel weights a (B, C), sum_c a_c (S' - T)^2; with `with_mean`, mean_c S'.

    The forward values are those of `squared_error_per_cell` and `S'.mean(dim=1)` (same operations, same order). The
    backward is one pass over (B, C, Y, X), dL/dS' = 2 (S' - T) * (g_cell + a_c g_weighted) + g_mean / C, where
    autograd would square, expand and add once per output; only S' - T is kept for it.
    """

    @staticmethod
    def forward(ctx, adapted_student: Tensor, teacher: Tensor, channel_weights: Tensor | None, with_mean: bool):
        difference = adapted_student - teacher  # (B, C, Y, X)
        squared = difference ** 2
        outputs = [squared.sum(dim=1)]  # (B, Y, X)
        saved = [difference]
        ctx.weighted, ctx.with_mean, ctx.channels = channel_weights is not None, with_mean, adapted_student.shape[1]
        if channel_weights is not None:
            outputs.append(torch.einsum("bc,bcyx->byx", channel_weights, squared))
            saved.append(channel_weights)
        if with_mean:
            outputs.append(adapted_student.mean(dim=1))
        ctx.save_for_backward(*saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_cell: Tensor, *more: Tensor):
        difference, *weights = ctx.saved_tensors
        more = list(more)
        factor = 2 * grad_cell[:, None]  # (B, 1, Y, X)
        if ctx.weighted:
            factor = torch.addcmul(factor, 2 * weights[0][:, :, None, None], more.pop(0)[:, None])  # (B, C, Y, X)
        if ctx.with_mean:
            grad = torch.addcmul(more.pop(0)[:, None] / ctx.channels, difference, factor)
        else:
            grad = difference * factor
        return grad, (-(difference * factor) if ctx.needs_input_grad[1] else None), None, None


def channel_summed_squared_error(adapted_student: Tensor, teacher: Tensor, channel_weights: Tensor | None = None,
                                 with_mean: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(sum_c (S' - T)^2, sum_c a_c (S' - T)^2 or None, mean_c S' or None), each (B, Y, X), from one difference
    tensor and with one backward pass.

    adapted_student, teacher: (B, C, Y, X); channel_weights: (B, C) or None (then no weighted sum); with_mean: also
    the student's channel mean (the spatial L1 term's input, differentiable).
    """
    outputs = list(_ChannelSums.apply(adapted_student, teacher,
                                      None if channel_weights is None else channel_weights.detach(), with_mean))
    per_cell = outputs.pop(0)
    weighted = outputs.pop(0) if channel_weights is not None else None
    mean = outputs.pop(0) if with_mean else None
    return per_cell, weighted, mean


def batch_weighted_sum(per_cell: Tensor, cell_weights: Tensor) -> Tensor:
    """(1/B) * sum_{b,y,x} w[b,y,x] * e[b,y,x], a scalar: summed over cells, divided by the batch size only."""
    return (per_cell * cell_weights).sum() / per_cell.shape[0]


def spatial_pool_l1(adapted_student: Tensor, teacher: Tensor, spatial_conv: nn.Module,
                    teacher_mean: Tensor | None = None, student_mean: Tensor | None = None) -> Tensor:
    """(1/B) * sum_{b,y,x} | mean_c T - g(mean_c S') |, a scalar (BD L1272-1278; mean of signed values, not |.|).

    teacher_mean, student_mean: (B, Y, X) mean_c T and mean_c S' when already computed, else taken from the features.
    """
    teacher_pool = teacher.mean(dim=1, keepdim=True) if teacher_mean is None else teacher_mean[:, None]  # (B,1,Y,X)
    student_pool = (adapted_student.mean(dim=1, keepdim=True) if student_mean is None
                    else student_mean[:, None])  # (B, 1, Y, X)
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
                     regions: RegionMasks, attention: Tensor | None, spatial_conv: nn.Module | None,
                     channel_weights: Tensor | None = None, teacher_mean: Tensor | None = None) -> dict[str, Tensor]:
    """The loss terms of one layer: kd_<name>_{fg,bg,fp} (or _plain) and kd_<name>_spatial.

    adapted_student, teacher: (B, C, Y, X) float32; attention: (B, Y, X) spatial attention or None (= 1);
    regions: the layer's masks (regions.false_positive is None on layers without the FP region);
    channel_weights: (B, C) teacher channel attention of the FP term and teacher_mean: (B, Y, X) mean_c T of the
    spatial L1 term, when precomputed (else computed here from `teacher`).
    """
    num_cells = teacher.shape[-2] * teacher.shape[-1]
    spatial = attention if attention is not None else torch.ones_like(regions.scale)  # (B, Y, X)
    terms: dict[str, Tensor] = {}
    with_fp = config.region_decomposition and regions.false_positive is not None
    if with_fp and config.attention:
        # Channel attention weights only the FP term: a quirk of the reference code (BD L1284), kept on purpose.
        if channel_weights is None:
            channel_weights = channel_attention(teacher, config.temperature)
    else:
        channel_weights = None
    # (B, Y, X) channel sums of the squared error, shared by the region terms, its channel-weighted FP variant and the
    # student's channel mean of the spatial L1 term: one pass over the difference, one backward pass
    per_cell, fp_per_cell, student_mean = channel_summed_squared_error(adapted_student, teacher, channel_weights,
                                                                       with_mean=spatial_conv is not None)
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
        if with_fp:
            fp_scale = regions.false_positive_scale[:, None, None]  # (B, 1, 1)
            fp_weights = regions.false_positive.float() * fp_scale * spatial * config.false_positive_weight
            terms[f"kd_{name}_fp"] = batch_weighted_sum(per_cell if fp_per_cell is None else fp_per_cell, fp_weights)
    if spatial_conv is not None:
        terms[f"kd_{name}_spatial"] = config.spatial_l1_weight * spatial_pool_l1(adapted_student, teacher,
                                                                                 spatial_conv, teacher_mean,
                                                                                 student_mean)
    return terms


@dataclass(frozen=True)
class PairGeometry:
    """What the DataLoader workers need of one layer pair: its key, teacher feature, teacher grid (Y, X), and
    whether it has the FP region under the current switches."""

    name: str
    teacher: str
    grid: tuple[int, int]
    false_positive: bool


@dataclass(frozen=True)
class DistillTargetSpec:
    """The loss's settings for `precompute_targets` (picklable: it travels to the DataLoader workers)."""

    config: DistillConfig
    pairs: tuple[PairGeometry, ...]
    bev_extent: tuple[float, float, float, float]

    @property
    def needs_gt_heatmap(self) -> bool:
        return any(pair.false_positive for pair in self.pairs)


@dataclass
class LayerTargets:
    """One layer's student-independent loss inputs for a batch, all detached.

    box_index:         (B, Y, X) int64 first GT box containing each cell corner, -1 off the foreground.
    regions:           the layer's complete masks and scales, or None (an FP layer whose teacher heatmap arrives
                       with a live teacher in the step: built there from box_index).
    channel_attention: (B, C_t) teacher channel attention of the FP term, or None (computed in the loss if needed).
    teacher_mean:      (B, Y, X) mean_c T of the spatial L1 term, or None (computed in the loss if needed).
    """

    box_index: Tensor
    regions: RegionMasks | None = None
    channel_attention: Tensor | None = None
    teacher_mean: Tensor | None = None

    def to(self, device: torch.device | str) -> "LayerTargets":
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return LayerTargets(move(self.box_index), None if self.regions is None else self.regions.to(device),
                            move(self.channel_attention), move(self.teacher_mean))


@dataclass
class PrecomputedTargets:
    """Student-independent inputs of `DistillBEVLoss` for a batch: layer pair name -> LayerTargets, and the
    (B, Yh, Xh) max-class GT heatmap of the FP rule (None without an FP layer)."""

    layers: dict[str, LayerTargets]
    gt_heatmap_max: Tensor | None = None

    def to(self, device: torch.device | str) -> "PrecomputedTargets":
        return PrecomputedTargets({k: v.to(device) for k, v in self.layers.items()},
                                  None if self.gt_heatmap_max is None else self.gt_heatmap_max.to(device))

    @staticmethod
    def cat(parts: list["PrecomputedTargets"]) -> "PrecomputedTargets":
        """Concatenate per-sample inputs (B = 1 each) into a batch's, in order."""
        def cat_optional(values: list[Tensor | None]) -> Tensor | None:
            return None if values[0] is None else torch.cat(values)

        layers = {}
        for name, first in parts[0].layers.items():
            items = [part.layers[name] for part in parts]
            layers[name] = LayerTargets(
                box_index=torch.cat([item.box_index for item in items]),
                regions=None if first.regions is None else cat_region_masks([item.regions for item in items]),
                channel_attention=cat_optional([item.channel_attention for item in items]),
                teacher_mean=cat_optional([item.teacher_mean for item in items]))
        return PrecomputedTargets(layers, cat_optional([part.gt_heatmap_max for part in parts]))


@torch.no_grad()
def precompute_targets(spec: DistillTargetSpec, gt_boxes: Tensor, gt_heatmap_max: Tensor | None = None,
                       teacher_features: dict[str, Tensor] | None = None,
                       teacher_heatmap: Tensor | None = None) -> PrecomputedTargets:
    """One sample's student-independent loss inputs (a batch of 1), as the loss would compute them in the step.

    gt_boxes: (K, >=7) in the sample's augmented LiDAR frame; gt_heatmap_max: (Yh, Xh) max-class GT heatmap (needed
    for the FP layers' masks); teacher_features: teacher name -> (C, Y, X) and teacher_heatmap: (num_classes, Yh, Xh)
    probabilities, when the targets are known in the worker (cache, warped cache), None with a live teacher.
    """
    config = spec.config
    boxes = torch.as_tensor(gt_boxes)
    gt_max = None if gt_heatmap_max is None else gt_heatmap_max[None]  # (1, Yh, Xh)
    heatmap = None if teacher_heatmap is None else teacher_heatmap[None].float()  # (1, num_classes, Yh, Xh)
    box_index_by_grid: dict[tuple[int, int], Tensor] = {}
    layers = {}
    for pair in spec.pairs:
        if pair.grid not in box_index_by_grid:
            box_index_by_grid[pair.grid] = first_containing_box(boxes, pair.grid, spec.bev_extent)[None]  # (1, Y, X)
        box_index = box_index_by_grid[pair.grid]
        regions = None
        if not pair.false_positive or (heatmap is not None and gt_max is not None):
            regions = build_region_masks(
                [boxes], pair.grid, spec.bev_extent, device=boxes.device,
                teacher_heatmap=heatmap if pair.false_positive else None,
                gt_heatmap_max=gt_max if pair.false_positive else None,
                fp_threshold=config.fp_threshold, gt_threshold=config.gt_threshold, box_index=box_index)
        channel, mean = None, None
        if teacher_features is not None:
            teacher = teacher_features[pair.teacher][None].float()  # (1, C, Y, X)
            if pair.false_positive and config.attention:
                channel = channel_attention(teacher, config.temperature)
            if config.spatial_l1:
                mean = teacher.mean(dim=1)
        layers[pair.name] = LayerTargets(box_index, regions, channel, mean)
    return PrecomputedTargets(layers, gt_max)


class DistillBEVLoss(nn.Module):
    """DistillBEV's multi-layer feature distillation; owns the adapters and the g convs (trainable, train-only).

    student_channels / teacher_channels: channels per feature name; student_shapes / teacher_shapes: (Y, X) per
    feature name; bev_extent: (x_min, x_max, y_min, y_max) in metres, shared by every map.
    precision: the autocast arithmetic of the adapters (`train.adapter_precision`). Their outputs, and everything
    after them (differences, sums, attention), are float32; a bf16 student feature meets fp32 adapters as float32.
    """

    def __init__(self, config: DistillConfig, student_channels: dict[str, int], teacher_channels: dict[str, int],
                 student_shapes: dict[str, tuple[int, int]], teacher_shapes: dict[str, tuple[int, int]],
                 bev_extent: tuple[float, float, float, float], precision: Precision = "fp32") -> None:
        super().__init__()
        self.config = config
        self.precision = precision
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

    def target_spec(self) -> DistillTargetSpec:
        """What `precompute_targets` needs of this loss (for the DataLoader workers)."""
        return DistillTargetSpec(self.config, tuple(
            PairGeometry(pair.name, pair.teacher, tuple(self.layers[pair.name].teacher_shape),
                         self.uses_false_positive(pair)) for pair in self.pairs), self.bev_extent)

    def forward(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor],
                gt_boxes: list[Tensor], teacher_heatmap: Tensor | None = None, gt_heatmap_max: Tensor | None = None,
                teacher_attention: dict[str, Tensor] | None = None,
                precomputed: PrecomputedTargets | None = None) -> dict[str, Tensor]:
        """Scalar loss terms keyed kd_<layer>_<term>; sum them for the KD loss.

        student_features: name -> (B, C_s, Y_s, X_s); teacher_features: name -> (B, C_t, Y_t, X_t);
        gt_boxes: B tensors (K_b, >=7) x, y, z, l, w, h, yaw in the augmented LiDAR frame;
        teacher_heatmap: (B, num_classes, Y_h, X_h) probabilities; gt_heatmap_max: (B, Y_h, X_h), both needed only
        by layers with the FP region (gt_heatmap_max may come in `precomputed`); teacher_attention: teacher name ->
        precomputed A^T (B, Y_t, X_t), else computed; precomputed: the student-independent inputs the DataLoader
        workers computed (`precompute_targets`), whatever it lacks is computed here.
        """
        terms: dict[str, Tensor] = {}
        box_index_by_grid: dict[tuple[int, int], Tensor] = {}  # foreground is shared by layers on the same grid
        if gt_heatmap_max is None and precomputed is not None:
            gt_heatmap_max = precomputed.gt_heatmap_max
        for pair in self.pairs:
            layer = self.layers[pair.name]
            student = _feature(student_features, pair.student, "student", pair.name)
            teacher = _feature(teacher_features, pair.teacher, "teacher", pair.name).detach().float()
            if len(gt_boxes) != teacher.shape[0] or student.shape[0] != teacher.shape[0]:
                raise ValueError(f"distill layer {pair.name!r}: batch sizes differ: student {student.shape[0]}, "
                                 f"teacher {teacher.shape[0]}, gt_boxes {len(gt_boxes)}")
            with autocast(student.device, self.precision):
                adapted = layer.adapt(student.float() if self.precision == "fp32" else student)
            adapted = adapted.float()  # (B, C_t, Y_t, X_t)
            grid = tuple(teacher.shape[-2:])
            given = None if precomputed is None else precomputed.layers.get(pair.name)
            if given is not None:
                given = given.to(teacher.device)
            regions = self._regions(pair, grid, teacher, gt_boxes, teacher_heatmap, gt_heatmap_max, given,
                                    box_index_by_grid)
            attention = self._attention(pair, adapted, teacher, teacher_attention)
            terms.update(layer_loss_terms(
                self.config, pair.name, adapted, teacher, regions, attention, layer.spatial_conv,
                channel_weights=None if given is None else given.channel_attention,
                teacher_mean=None if given is None else given.teacher_mean))
        return terms

    def _regions(self, pair: LayerPairConfig, grid: tuple[int, int], teacher: Tensor, gt_boxes: list[Tensor],
                 teacher_heatmap: Tensor | None, gt_heatmap_max: Tensor | None, given: LayerTargets | None,
                 box_index_by_grid: dict[tuple[int, int], Tensor]) -> RegionMasks:
        """The layer's masks: the precomputed ones when given, else built here (from a given box index if any)."""
        with_fp = self.uses_false_positive(pair)
        batch = teacher.shape[0]
        if given is not None and given.regions is not None:
            given.regions.check_shape(batch, grid, with_fp, f"distill layer {pair.name!r}")
            return given.regions
        if given is not None:
            if tuple(given.box_index.shape) != (batch, *grid):
                raise ValueError(f"distill layer {pair.name!r}: precomputed box index has shape "
                                 f"{tuple(given.box_index.shape)}, expected (B, Y, X) = {(batch, *grid)}")
            box_index = given.box_index
        else:
            if grid not in box_index_by_grid:
                box_index_by_grid[grid] = torch.stack([
                    first_containing_box(torch.as_tensor(boxes, device=teacher.device), grid, self.bev_extent)
                    for boxes in gt_boxes])  # (B, Y, X)
            box_index = box_index_by_grid[grid]
        if with_fp and (teacher_heatmap is None or gt_heatmap_max is None):
            raise ValueError(f"distill layer {pair.name!r} uses the false-positive region: pass teacher_heatmap "
                             f"and gt_heatmap_max, or set use_false_positive / false_positive to false")
        return build_region_masks(
            gt_boxes, grid, self.bev_extent, device=teacher.device,
            teacher_heatmap=teacher_heatmap if with_fp else None,
            gt_heatmap_max=gt_heatmap_max if with_fp else None,
            fp_threshold=self.config.fp_threshold, gt_threshold=self.config.gt_threshold, box_index=box_index)

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

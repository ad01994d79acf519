"""Typed configuration of the DistillBEV feature-distillation objective.

Defaults are the released BEVDepth4D recipe (distillbev_method.md sections 1-5): three layer pairs
(backbone1, backbone2 and the pre-head neck), region weights 6e-3 / 4e-2 / 6e-2, spatial-pool L1 weight 2.5e-3,
attention temperature 0.5, teacher/student attention ratio 1, heatmap thresholds 0.1.
The ablation switches turn single components off (the poster's component table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

StudentFeatureName = Literal["backbone0", "backbone1", "backbone2", "neck"]
# bev_embed: the BEV a teacher with a DETR decoder decodes (pipeline/teacher/decoder.py), BEVFormer's pair
TeacherFeatureName = Literal["backbone0", "backbone1", "backbone2", "neck", "bev_embed"]
AdapterKind = Literal["upsample_3layer", "conv1x1", "resample_conv1x1"]


@dataclass
class LayerPairConfig:
    """One distilled (student feature, teacher feature) pair; the adapter is applied to the student only."""

    student: StudentFeatureName  # student feature name
    teacher: TeacherFeatureName  # teacher feature name
    # "upsample_3layer" (bilinear upsample + 3 x conv1x1-BN-ReLU), "conv1x1" (integer upsample factor) or
    # "resample_conv1x1" (bilinear resampling onto the teacher grid at any ratio, then a 1x1 conv: BEVFormer's 200^2
    # BEV against the CenterPoint teacher's 128^2 pre-head feature over the same extent)
    adapter: AdapterKind
    use_false_positive: bool = False  # add the false-positive region (the paper uses it at the pre-head pair only)

    @property
    def name(self) -> str:
        """Key used in loss names: the feature name, or "student_teacher" when the two names differ."""
        return self.student if self.student == self.teacher else f"{self.student}_{self.teacher}"


def default_layer_pairs() -> list[LayerPairConfig]:
    """The pairs of the released BEVDepth4D scripts: backbone1, backbone2 (upsampling adapters) and the neck (FP)."""
    return [
        LayerPairConfig(student="backbone1", teacher="backbone1", adapter="upsample_3layer", use_false_positive=False),
        LayerPairConfig(student="backbone2", teacher="backbone2", adapter="upsample_3layer", use_false_positive=False),
        LayerPairConfig(student="neck", teacher="neck", adapter="conv1x1", use_false_positive=True),
    ]


@dataclass
class DistillConfig:
    """Weights, thresholds and ablation switches of the DistillBEV objective (defaults: BEVDepth4D recipe)."""

    layers: list[LayerPairConfig] = field(default_factory=default_layer_pairs)  # distilled layer pairs
    foreground_weight: float = 6e-3  # weight of the foreground (GT box) region term
    background_weight: float = 4e-2  # weight of the background region term
    false_positive_weight: float = 6e-2  # weight of the false-positive region term (FP layers only)
    spatial_l1_weight: float = 2.5e-3  # weight of the L1 term between channel-mean maps (learnable 3x3 conv g)
    temperature: float = 0.5  # softmax temperature of spatial and channel attention
    student_attention_ratio: float = 1.0  # r in A = (A_teacher + r * A_student) / (1 + r); 0 = teacher only
    fp_threshold: float = 0.1  # a cell is a teacher detection where max-class teacher heatmap > this
    gt_threshold: float = 0.1  # a cell is GT-free where the max-class GT Gaussian heatmap < this
    # Ablation switches (each removes exactly one component).
    region_decomposition: bool = True  # False: plain imitation, one uniform region weighted plain_weight / (Y*X)
    attention: bool = True  # False: spatial attention A = 1 and channel attention (FP term) = 1
    adaptive_scaling: bool = True  # False: fg and bg cells both scaled by 1/N_bg (the reference's "bg_only" mode)
    false_positive: bool = True  # False: no FP region on any layer (background = not foreground)
    spatial_l1: bool = True  # False: no spatial-pool L1 term and no 3x3 conv g
    # Plain imitation weight: with scale 1/(Y*X) on every cell this equals the background term of a frame without
    # objects, so it sits at the magnitude of the recipe's background term.
    plain_weight: float = 4e-2

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer pair, found none")
        names = [pair.name for pair in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"layers: each pair must be distinct, found {duplicates} more than once")
        for name in ("foreground_weight", "background_weight", "false_positive_weight", "spatial_l1_weight",
                     "student_attention_ratio", "plain_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a value >= 0, found {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected a value > 0, found {self.temperature}")

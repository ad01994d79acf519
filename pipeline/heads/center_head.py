"""CenterPoint's CenterHead: a shared 3x3 conv, then one SeparateHead per task group.

Module names and parameter shapes follow mmdet3d's CenterHead/SeparateHead so its checkpoints load strictly:
`shared_conv.{conv,bn}`, `task_heads.{t}.{reg,height,dim,rot,vel,heatmap}.{0: conv+bn, 1: conv with bias}`.
The loss is CenterPoint's: GaussianFocal on clamped sigmoid heatmaps normalised by the number of peaks, plus a
weighted L1 on the 10 regression values at object cells normalised by the number of objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.classes import DETECTION_CLASSES, TASK_GROUPS
from ..data.types import Detections
from ..geometry.bev import BEVGrid
from .decode import DecodeSettings, decode_detections
from .post_center import resolve_post_center_range
from .targets import build_targets

# Regression heads (name -> output channels), in the order of the 10-value box code.
REGRESSION_HEADS: tuple[tuple[str, int], ...] = (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2))


@dataclass
class CenterHeadConfig:
    """CenterHead layout, targets, loss and decoding.

    `grid` and `post_center_range` are derived and need not be written: the model that owns the head fills in
    `grid` (the teacher: its neck output grid; a student: its BEV grid), and `post_center_range` follows from the
    grid and `post_center_margin` once the grid is known (pipeline/heads/post_center.py). Configs written before
    record both explicitly; they load as they are (a given grid must equal the derived one, a given range with a
    given margin must agree with it).
    """

    grid: BEVGrid | None = None  # the head's output grid (= the input feature map's); None: the model's
    tasks: tuple[tuple[str, ...], ...] = TASK_GROUPS  # class names per heatmap task (mmdet3d nuScenes order)
    shared_channels: int = 64  # output channels of the shared 3x3 conv
    head_channels: int = 64  # channels of each SeparateHead's hidden conv
    final_kernel: int = 3  # kernel size of the SeparateHead convs
    num_head_convs: int = 2  # convs per SeparateHead branch (hidden conv+BN+ReLU, then the output conv)
    heatmap_init_bias: float = -2.19  # initial heatmap logit bias (prior probability ~0.1)
    bn_eps: float = 1e-5  # BatchNorm eps (mmdet3d's BN2d default)
    bn_momentum: float = 0.1  # BatchNorm momentum (mmdet3d's BN2d default)
    gaussian_overlap: float = 0.1  # CenterPoint gaussian_overlap for the heatmap radius
    min_radius: int = 2  # minimum gaussian radius in cells
    max_objects: int = 500  # objects per task and sample that receive targets
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)  # per box-code L1 weights
    heatmap_loss_weight: float = 1.0  # weight of the GaussianFocal heatmap loss
    box_loss_weight: float = 0.25  # weight of the L1 box loss
    score_threshold: float = 0.1  # detections below this score are dropped
    top_k: int = 500  # candidates per task before NMS
    max_per_sample: int = 500  # detections kept per sample after merging tasks
    nms_type: str = "circle"  # "circle" (CenterPoint circle NMS per task) or "none"
    nms_radius: tuple[float, ...] = (4.0, 12.0, 10.0, 1.0, 0.85, 0.175)  # per task, squared metres
    post_max_size: int = 83  # detections kept per task after NMS
    post_center_range: tuple[float, ...] | None = None  # decoded centres kept inside (x_min, y_min, z_min, x_max,
    # y_max, z_max); None: the grid's x / y extent grown by post_center_margin, z [-10, 10]
    post_center_margin: float | None = None  # metres around the grid; None: 10 m (the nuScenes +-61.2 m), or
    # what an explicit post_center_range says

    def __post_init__(self) -> None:
        if self.grid is not None:
            extent = (self.grid.x_min, self.grid.x_max, self.grid.y_min, self.grid.y_max)
            self.post_center_range, self.post_center_margin = resolve_post_center_range(
                self.post_center_range, self.post_center_margin, extent)
        names = [name for task in self.tasks for name in task]
        unknown = [n for n in names if n not in DETECTION_CLASSES]
        if unknown:
            raise ValueError(f"tasks name unknown classes {unknown}; use names from {list(DETECTION_CLASSES)}")
        if len(self.code_weights) != 10:
            raise ValueError(f"code_weights needs 10 values, found {len(self.code_weights)}")
        if self.nms_type not in ("circle", "none"):
            raise ValueError(f"nms_type must be 'circle' or 'none', found {self.nms_type!r}")
        if self.nms_type == "circle" and len(self.nms_radius) != len(self.tasks):
            raise ValueError(f"nms_radius needs one value per task ({len(self.tasks)}), found {len(self.nms_radius)}")

    @property
    def task_class_ids(self) -> list[list[int]]:
        """Global class id of every class slot of every task."""
        return [[DETECTION_CLASSES.index(n) for n in task] for task in self.tasks]

    def decode_settings(self) -> DecodeSettings:
        if self.grid is None:
            raise ValueError("head.grid is not set: a CenterHeadConfig gets its grid from the model config it is part "
                             "of (TeacherModelConfig, StudentModelConfig); give one when building a head on its own")
        return DecodeSettings(grid=self.grid, score_threshold=self.score_threshold, top_k=self.top_k,
                              max_per_sample=self.max_per_sample, nms_type=self.nms_type,
                              nms_radius=tuple(self.nms_radius), post_max_size=self.post_max_size,
                              post_center_range=tuple(self.post_center_range))


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BN -> ReLU, named `conv` / `bn` like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float, momentum: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SeparateHead(nn.Module):
    """One task's branches: for each of reg/height/dim/rot/vel/heatmap, (num_convs-1) ConvBNReLU then a conv."""

    def __init__(self, in_channels: int, num_classes: int, config: CenterHeadConfig):
        super().__init__()
        self.branch_names = [name for name, _ in REGRESSION_HEADS] + ["heatmap"]
        outputs = dict(REGRESSION_HEADS, heatmap=num_classes)
        for name in self.branch_names:
            layers: list[nn.Module] = []
            channels = in_channels
            for _ in range(config.num_head_convs - 1):
                layers.append(ConvBNReLU(channels, config.head_channels, config.final_kernel,
                                         config.bn_eps, config.bn_momentum))
                channels = config.head_channels
            layers.append(nn.Conv2d(channels, outputs[name], config.final_kernel,
                                    padding=config.final_kernel // 2, bias=True))
            setattr(self, name, nn.Sequential(*layers))
        self.reset_parameters(config.heatmap_init_bias)

    def reset_parameters(self, heatmap_init_bias: float) -> None:
        """Hidden convs: kaiming (as mmcv's ConvModule); output convs keep torch's default (small outputs at
        start); the heatmap bias starts at `heatmap_init_bias` so every cell begins at a low probability."""
        for name in self.branch_names:
            for module in getattr(self, name).modules():
                if isinstance(module, ConvBNReLU):
                    nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
        getattr(self, "heatmap")[-1].bias.data.fill_(heatmap_init_bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, Y, X) -> {reg (B,2,Y,X), height (B,1,..), dim (B,3,..), rot (B,2,..), vel (B,2,..),
        heatmap (B, num_classes, Y, X) logits}."""
        return {name: getattr(self, name)(x) for name in self.branch_names}


def gaussian_focal_loss(probabilities: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
                        gamma: float = 4.0) -> torch.Tensor:
    """Summed CornerNet/CenterNet focal loss between clamped probabilities and a gaussian target (same shape)."""
    eps = 1e-12
    positive = target.eq(1).to(probabilities.dtype)
    negative_weight = (1 - target).pow(gamma)
    positive_loss = -(probabilities + eps).log() * (1 - probabilities).pow(alpha) * positive
    negative_loss = -(1 - probabilities + eps).log() * probabilities.pow(alpha) * negative_weight
    return (positive_loss + negative_loss).sum()


def clip_sigmoid(logits: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """sigmoid clamped to [eps, 1 - eps] (CenterPoint's clip_sigmoid)."""
    return logits.sigmoid().clamp(min=eps, max=1 - eps)


class CenterHead(nn.Module):
    """CenterPoint detection head on a BEV feature map (B, C, Y, X) laid out like `config.grid`."""

    def __init__(self, config: CenterHeadConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.shared_conv = ConvBNReLU(in_channels, config.shared_channels, 3, config.bn_eps, config.bn_momentum)
        self.task_heads = nn.ModuleList(
            [SeparateHead(config.shared_channels, len(task), config) for task in config.tasks])

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """x (B, C, Y, X) -> one dict per task (see `SeparateHead.forward`)."""
        shared = self.shared_conv(x)
        return [task_head(shared) for task_head in self.task_heads]

    @staticmethod
    def concatenated_heatmap(head_outputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(B, num_classes, Y, X) heatmap logits of all tasks concatenated (task order = class order)."""
        return torch.cat([task["heatmap"] for task in head_outputs], dim=1)

    def loss(self, head_outputs: list[dict[str, torch.Tensor]], gt_boxes: list[torch.Tensor],
             gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """CenterPoint loss. gt_boxes: B tensors (K_b, 9); gt_labels: B tensors (K_b,) class ids.

        Returns {"loss_heatmap", "loss_box"} (scalars, each summed over tasks); every entry is a loss term, so
        the total is `sum(losses.values())` (the mmdet convention).
        """
        config = self.config
        targets = build_targets(gt_boxes, gt_labels, config.grid, config.tasks, DETECTION_CLASSES,
                                config.gaussian_overlap, config.min_radius, config.max_objects)
        device = head_outputs[0]["heatmap"].device
        code_weights = torch.tensor(config.code_weights, device=device)
        loss_heatmap = torch.zeros((), device=device)
        loss_box = torch.zeros((), device=device)
        for task_output, target in zip(head_outputs, targets):
            probabilities = clip_sigmoid(task_output["heatmap"].float())
            target_heatmap = target.heatmap.to(device)
            num_peaks = max(float(target_heatmap.eq(1).sum().item()), 1.0)
            loss_heatmap = loss_heatmap + gaussian_focal_loss(probabilities, target_heatmap) / num_peaks
            prediction = torch.cat([task_output[name] for name, _ in REGRESSION_HEADS], dim=1).float()
            batch, channels = prediction.shape[:2]
            prediction = prediction.reshape(batch, channels, -1)  # (B, 10, Y*X)
            indices = target.indices.to(device)
            gathered = prediction.gather(2, indices.unsqueeze(1).expand(batch, channels, indices.shape[1]))
            gathered = gathered.transpose(1, 2)  # (B, M, 10)
            mask = target.mask.to(device).unsqueeze(-1).float()
            weights = mask * code_weights
            num_objects = target.mask.float().sum()
            loss_box = loss_box + ((gathered - target.boxes.to(device)).abs() * weights).sum() / (num_objects + 1e-4)
        loss_heatmap = loss_heatmap * config.heatmap_loss_weight
        loss_box = loss_box * config.box_loss_weight
        return {"loss_heatmap": loss_heatmap, "loss_box": loss_box}

    def decode(self, head_outputs: list[dict[str, torch.Tensor]], sample_tokens: list[str],
               bev_aug: torch.Tensor | None = None) -> list[Detections]:
        """Detections (LiDAR frame, BEV augmentation `bev_aug` (B, 4, 4) undone if given) per sample."""
        return decode_detections(head_outputs, self.config.decode_settings(), self.config.task_class_ids,
                                 sample_tokens, bev_aug)

"""Typed configs of the CenterPoint-pillar teacher (model, with an optional DETR decoder) and of teacher training
(experiment)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..data.config import DataConfig
from ..geometry.bev import BEVGrid, BEVRange
from ..heads.center_head import CenterHeadConfig
from ..heads.detr.config import BEVFormerHeadConfig
from ..precision import PrecisionSetting


@dataclass
class TeacherDecoderConfig:
    """A DETR decoder beside the CenterHead, for BEVFormer students (the reference distils BEVFormer from a LiDAR
    transformer whose decoder the student inherits).

    The SECONDFPN output goes through a 1x1 conv and a LayerNorm over channels to `embed_dims` ("bev_embed", the
    feature a BEVFormer student imitates); BEVFormer's head (object queries, deformable cross-attention over that
    BEV, class and box branches) decodes it. Both heads train together; the CenterHead stays the teacher's output
    (evaluation, cached heatmaps), the decoder's evaluation is written beside it.
    """

    embed_dims: int = 256  # channels of bev_embed = the BEVFormer student's embed_dims
    head: BEVFormerHeadConfig = field(default_factory=BEVFormerHeadConfig)  # = the student's bevformer.head shapes
    loss_weight: float = 1.0  # weight of the decoder's Hungarian loss beside the CenterHead's

    def __post_init__(self) -> None:
        if self.head.num_heads <= 0 or self.embed_dims % self.head.num_heads:
            raise ValueError(f"decoder.embed_dims {self.embed_dims} is not divisible by decoder.head.num_heads "
                             f"{self.head.num_heads}; pick a head count that divides it")


@dataclass
class TeacherModelConfig:
    """CenterPoint-pillar: pillar feature net -> scatter -> SECOND -> SECONDFPN -> CenterHead.

    The defaults are mmdet3d's `centerpoint_pillar02_second_secfpn` nuScenes model. `point_cloud_range` is the
    teacher's range, given once: `head.grid` (None) is derived from it (its x / y extent at pillar_size x the
    network's output stride; a given grid must equal that), each head's post_center_range from its grid and
    margin, and the experiment's data.point_cloud_range defaults to it. Configs, checkpoints and cache manifests
    written before record every copy explicitly and load as they are.
    """

    point_cloud_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    # x_min, y_min, z_min, x_max, y_max, z_max; points outside are ignored; one pillar spans the whole z range
    pillar_size: tuple[float, float] = (0.2, 0.2)  # pillar (x, y) size in metres
    point_features: int = 5  # x, y, z, intensity, time lag
    pillar_channels: int = 64  # PFN output channels = canvas channels
    max_points_per_pillar: int = 0  # 0: dynamic pillars (every point counts); >0: emulate mmdet3d hard voxelization
    max_pillars: int = 0  # with hard voxelization: pillars kept per sample in first-point order (0 = all)
    pillar_bn_eps: float = 1e-3  # BN1d eps of the PFN layer
    backbone_channels: tuple[int, ...] = (64, 128, 256)  # SECOND stage widths
    backbone_layer_nums: tuple[int, ...] = (3, 5, 5)  # extra 3x3 conv layers per SECOND stage
    backbone_strides: tuple[int, ...] = (2, 2, 2)  # stride of each SECOND stage's first conv
    neck_channels: tuple[int, ...] = (128, 128, 128)  # SECONDFPN output channels per stage
    neck_upsample_strides: tuple[float, ...] = (0.5, 1.0, 2.0)  # SECONDFPN upsampling (<1: strided conv)
    bn_eps: float = 1e-3  # BN eps of SECOND / SECONDFPN
    bn_momentum: float = 0.01  # BN momentum of the PFN, SECOND and SECONDFPN (mmdet3d's value)
    head: CenterHeadConfig = field(default_factory=CenterHeadConfig)  # head.grid: the neck output grid (derived)
    decoder: TeacherDecoderConfig | None = None  # a DETR decoder on bev_embed, for BEVFormer students

    def __post_init__(self) -> None:
        lengths = {len(self.backbone_channels), len(self.backbone_layer_nums), len(self.backbone_strides),
                   len(self.neck_channels), len(self.neck_upsample_strides)}
        if len(lengths) != 1:
            raise ValueError("backbone_channels, backbone_layer_nums, backbone_strides, neck_channels and "
                             "neck_upsample_strides need one value per stage (same lengths)")
        strides = []
        total = 1
        for stride, upsample in zip(self.backbone_strides, self.neck_upsample_strides):
            total *= stride
            strides.append(total / upsample)
        if max(strides) - min(strides) > 1e-6:
            raise ValueError(f"SECONDFPN outputs must share one stride; backbone strides {self.backbone_strides} "
                             f"with neck_upsample_strides {self.neck_upsample_strides} give {strides}")
        expected = self.head_grid
        if self.head.grid is None:
            self.head = dataclasses.replace(self.head, grid=expected)
        if not self.head.grid.matches(expected):
            raise ValueError(f"head.grid {self.head.grid} does not match the neck output grid {expected} "
                             f"(point_cloud_range x/y at pillar_size x {self.out_size_factor}); give the range once: "
                             f"remove head.grid (it is derived)")
        if self.decoder is not None:  # the decoder reads the head grid (teacher/decoder.py)
            head = self.decoder.head.over(BEVRange(expected.x_min, expected.x_max, expected.y_min, expected.y_max,
                                                   expected.resolution, self.point_cloud_range[2],
                                                   self.point_cloud_range[5]))
            if head is not self.decoder.head:
                self.decoder = dataclasses.replace(self.decoder, head=head)

    @property
    def canvas_grid(self) -> BEVGrid:
        """The pillar canvas (Y, X)."""
        x_min, y_min, _, x_max, y_max, _ = self.point_cloud_range
        if abs(self.pillar_size[0] - self.pillar_size[1]) > 1e-9:
            raise ValueError(f"pillar_size must be square, found {self.pillar_size}")
        return BEVGrid(x_min, x_max, y_min, y_max, self.pillar_size[0])

    @property
    def out_size_factor(self) -> int:
        """Canvas cells per head cell."""
        return int(round(self.backbone_strides[0] / self.neck_upsample_strides[0]))

    @property
    def head_grid(self) -> BEVGrid:
        canvas = self.canvas_grid
        return BEVGrid(canvas.x_min, canvas.x_max, canvas.y_min, canvas.y_max,
                       round(canvas.resolution * self.out_size_factor, 9))

    @property
    def neck_out_channels(self) -> int:
        return sum(self.neck_channels)


@dataclass
class TeacherTrainConfig:
    """Teacher training schedule."""

    epochs: int = 20  # passes over the train split
    batch_size: int = 4  # samples per step
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"  # per-step learning-rate schedule
    warmup_fraction: float = 0.4  # onecycle: fraction of steps spent rising to lr (CenterPoint's cyclic: 0.4)
    grad_clip: float = 35.0  # max gradient norm (0 = no clipping); mmdet3d CenterPoint uses 35
    seed: int = 0  # torch / numpy seed
    num_workers: int | Literal["auto"] = "auto"  # DataLoader worker processes; auto: min(8, cores per rank - 1)
    # (`data.handover.loader_workers`); batches are pinned when the device is CUDA
    max_steps_per_epoch: int = 0  # cap on steps per epoch (0 = the whole split); for smoke runs
    evaluate: bool = True  # decode the val split and run the nuScenes evaluation after training
    log_every: int = 10  # steps between train_log.jsonl records
    precision: PrecisionSetting = "auto"  # autocast dtype of the training forward: auto = bf16 where the device
    # computes it natively, else fp32, resolved once per run (pipeline/precision.py)
    channels_last: bool = False  # NHWC convolutions (faster with oneDNN / cuDNN); evaluation is unaffected

    def __post_init__(self) -> None:
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"num_workers: expected auto or a number >= 0 of DataLoader workers, found "
                             f"{self.num_workers}")


@dataclass
class TeacherExperimentConfig:
    """Everything `distillbev train-teacher` needs: data, model and schedule.

    The range is given once, as model.point_cloud_range: data.point_cloud_range, when not given, is filled in
    with it (a given data range is a separate crop and is kept as it is).
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(load_images=False))  # points only
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)

    def __post_init__(self) -> None:
        # the loader crops to the model's range unless data.point_cloud_range is given (a separate crop)
        self.data = self.data.with_model_range(self.model.point_cloud_range)
        if self.model.point_features != self.data.point_dims:
            raise ValueError(f"model.point_features is {self.model.point_features} but data.point_features "
                             f"{self.data.point_features!r} loads {self.data.point_dims} columns per point; set "
                             f"model.point_features: {self.data.point_dims} (an MVP teacher: data.point_features: mvp "
                             f"with model.point_features: 17)")

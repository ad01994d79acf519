"""Image-backbone pretraining on the dataset's own camera images: 2D object centres and their depth.

A camera student's ResNet normally starts from ImageNet weights (BEVDet, BEVDepth) or from an FCOS3D checkpoint
trained on the nuScenes train images (BEVFormer). Neither can be downloaded where this project is tested, so
`distillbev pretrain-backbone` trains the student's own backbone on a CenterNet-style monocular task over the
train split's images, which is what the FCOS3D initialisation is on nuScenes: for every annotated box whose
centre projects into a camera, a gaussian peak at the projected centre on the class channel of a stride-8
heatmap, and the camera depth of that centre regressed at the peak cell. Only the backbone's weights are kept
(torchvision key names, `backbone.pretrained` loads them); the head is thrown away.

    targets = image_centre_targets(batch.gt_boxes, batch.gt_labels, batch.intrinsics, batch.camera_to_lidar,
                                   batch.image_aug, batch.bev_aug, image_size=(128, 352), stride=8, num_classes=10,
                                   max_depth=60.0)
    head = CentrePretrainHead(backbone.pyramid_channels, num_classes=10, channels=64)
    heatmap_logits, log_depth = head(*backbone.forward_pyramid(images))  # (B*N, K, H/8, W/8), (B*N, 1, H/8, W/8)
    losses = pretrain_losses(heatmap_logits, log_depth, targets, depth_weight=1.0)

Occlusion is not modelled: a box hidden behind another still gets its peak (nothing here renders the scene), and
where two centres share a cell the nearer one's depth is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.transforms import box_corners, project_to_image, transform_points
from ..heads.center_head import clip_sigmoid, gaussian_focal_loss
from ..heads.targets import draw_gaussian, gaussian_radius

STRIDE = 8  # the head reads the backbone's layer2 (stride 8) with layer3 and layer4 upsampled onto it


@dataclass
class ImageCentreTargets:
    """heatmap (B*N, K, Hf, Wf) gaussian peaks; log_depth (B*N, Hf, Wf) log camera depth [m] at the centre cells;
    centre_mask (B*N, Hf, Wf) bool; num_centres: the number of peaks drawn."""

    heatmap: torch.Tensor
    log_depth: torch.Tensor
    centre_mask: torch.Tensor
    num_centres: int


def project_box_centres(boxes: np.ndarray, camera_from_bev: np.ndarray, pixel_from_camera: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (K, >=7) x, y, z, l, w, h, yaw in the BEV-augmented LiDAR frame -> for one camera: centre pixels
    (K, 2) (u, v) of the projected 3D centre, centre camera depth (K,) and the image rectangle (K, 4) u0, v0, u1, v1
    around the 8 projected corners. A box with a corner at camera depth <= 0.1 m gets a NaN rectangle.

    camera_from_bev (4, 4); pixel_from_camera (3, 3) = image_aug @ intrinsics (augmented pixels, centres at integers).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    points = np.concatenate([boxes[:, None, :3], box_corners(boxes)], axis=1).reshape(-1, 3)  # (K*9, 3)
    pixels, depth = project_to_image(transform_points(camera_from_bev, points), pixel_from_camera)
    pixels, depth = pixels.reshape(len(boxes), 9, 2), depth.reshape(len(boxes), 9)  # centre, then 8 corners
    rectangles = np.concatenate([pixels[:, 1:].min(axis=1), pixels[:, 1:].max(axis=1)], axis=1)  # (K, 4)
    rectangles[(depth[:, 1:] <= 0.1).any(axis=1)] = np.nan
    return pixels[:, 0], depth[:, 0], rectangles


def image_centre_targets(gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], intrinsics: torch.Tensor,
                         camera_to_lidar: torch.Tensor, image_aug: torch.Tensor, bev_aug: torch.Tensor,
                         image_size: tuple[int, int], stride: int, num_classes: int, max_depth: float,
                         min_overlap: float = 0.7, min_radius: int = 1) -> ImageCentreTargets:
    """GT boxes of a batch -> the per-image centre heatmap and depth targets at `stride`.

    gt_boxes: B of (K_b, 9) in the BEV-augmented LiDAR frame; intrinsics (B, N, 3, 3), camera_to_lidar (B, N, 4, 4),
    image_aug (B, N, 3, 3), bev_aug (B, 4, 4) as in `Batch`. A box counts for a camera when its centre is in front
    (depth in (0.5, max_depth)), its centre pixel round(u), round(v) is inside the image and no corner is behind
    the camera; its peak goes at cell (round(v) // stride, round(u) // stride) with CenterNet's radius for its
    rectangle (clipped to the image) in cells, at least `min_radius`.
    """
    batch, cameras = intrinsics.shape[:2]
    height, width = image_size
    feature_h, feature_w = height // stride, width // stride
    heatmap = np.zeros((batch * cameras, num_classes, feature_h, feature_w), dtype=np.float32)
    log_depth = np.zeros((batch * cameras, feature_h, feature_w), dtype=np.float32)
    mask = np.zeros((batch * cameras, feature_h, feature_w), dtype=bool)
    camera_to_bev = bev_aug.double()[:, None] @ camera_to_lidar.double()  # (B, N, 4, 4)
    camera_from_bev = torch.linalg.inv(camera_to_bev).numpy()
    pixel_from_camera = (image_aug.double() @ intrinsics.double()).numpy()  # (B, N, 3, 3)
    drawn = 0
    for b in range(batch):
        boxes = gt_boxes[b].detach().cpu().double().numpy()
        labels = gt_labels[b].detach().cpu().numpy()
        if len(boxes) == 0:
            continue
        for n in range(cameras):
            image = b * cameras + n
            centre, depth, rectangle = project_box_centres(boxes, camera_from_bev[b, n], pixel_from_camera[b, n])
            u, v = np.round(centre[:, 0]), np.round(centre[:, 1])
            keep = ((depth > 0.5) & (depth < max_depth) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
                    & np.isfinite(rectangle).all(axis=1) & (labels >= 0) & (labels < num_classes))
            for k in np.flatnonzero(keep)[np.argsort(-depth[keep])]:  # far to near: the nearer depth wins a cell
                u0, v0 = max(rectangle[k, 0], 0.0), max(rectangle[k, 1], 0.0)
                u1, v1 = min(rectangle[k, 2], width - 1.0), min(rectangle[k, 3], height - 1.0)
                radius = max(min_radius, int(gaussian_radius((v1 - v0) / stride, (u1 - u0) / stride, min_overlap)))
                ix, iy = int(u[k]) // stride, int(v[k]) // stride
                draw_gaussian(heatmap[image, int(labels[k])], ix, iy, radius)
                log_depth[image, iy, ix] = np.log(depth[k])
                mask[image, iy, ix] = True
                drawn += 1
    device = intrinsics.device
    return ImageCentreTargets(torch.from_numpy(heatmap).to(device), torch.from_numpy(log_depth).to(device),
                              torch.from_numpy(mask).to(device), drawn)


class CentrePretrainHead(nn.Module):
    """(layer2, layer3, layer4) -> heatmap logits (B*N, K, H/8, W/8) and log depth (B*N, 1, H/8, W/8).

    layer3 and layer4 are upsampled bilinearly to layer2's size and concatenated; a 3x3 conv-BN-ReLU, then a 1x1
    conv per output. The heatmap bias starts at -2.19 (prior 0.1), as CenterNet's.
    """

    def __init__(self, pyramid_channels: tuple[int, int, int], num_classes: int, channels: int = 64):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(sum(pyramid_channels), channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(channels, num_classes, 1)
        self.depth = nn.Conv2d(channels, 1, 1)
        nn.init.constant_(self.heatmap.bias, -2.19)

    def forward(self, stride8: torch.Tensor, stride16: torch.Tensor, stride32: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        size = stride8.shape[-2:]
        x = torch.cat([stride8, F.interpolate(stride16, size=size, mode="bilinear", align_corners=False),
                       F.interpolate(stride32, size=size, mode="bilinear", align_corners=False)], dim=1)
        x = self.shared(x)
        return self.heatmap(x), self.depth(x)


def pretrain_losses(heatmap_logits: torch.Tensor, log_depth: torch.Tensor, targets: ImageCentreTargets,
                    depth_weight: float) -> dict[str, torch.Tensor]:
    """{"heatmap": focal loss summed / max(1, centres), "depth": depth_weight * mean |log d - target| over centre
    cells (0 without centres)}, both float32. heatmap_logits (B*N, K, Hf, Wf); log_depth (B*N, 1, Hf, Wf)."""
    probabilities = clip_sigmoid(heatmap_logits.float())
    heatmap = gaussian_focal_loss(probabilities, targets.heatmap) / max(1, targets.num_centres)
    predicted = log_depth.float()[:, 0][targets.centre_mask]
    if predicted.numel():
        depth = depth_weight * (predicted - targets.log_depth[targets.centre_mask]).abs().mean()
    else:
        depth = log_depth.float().sum() * 0.0
    return {"heatmap": heatmap, "depth": depth}

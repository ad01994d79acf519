"""BEVFormer's building blocks in plain torch: deformable attention, spatial cross-attention into the cameras,
temporal self-attention over the ego-motion-aligned previous BEV, the BEV encoder and the DETR-style detection head.

    encoder = BEVFormerEncoder(config, num_cameras)
    bev = encoder(image_features, geometry, image_size, previous_bev, prev_lidar_to_lidar)  # (B, C, Y, X)
    head = BEVFormerHead(config)
    outputs = head(bev)                                        # BEVFormerHeadOutputs
    losses = head.loss(outputs, gt_boxes, gt_labels)           # sum(losses.values())
    detections = head.decode(outputs, sample_tokens, bev_aug)  # list[Detections], LiDAR frame
"""

# The student config (BEVRange) is loaded before this package's own config, which builds on it; the student config
# then finishes by importing BEVFormerConfig. Any import order of the two modules works this way.
from .. import config as _student_config  # noqa: E402,F401

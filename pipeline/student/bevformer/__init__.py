"""BEVFormer's building blocks in plain torch: spatial cross-attention into the cameras, temporal self-attention over
the ego-motion-aligned previous BEV and the BEV encoder; the DETR-style detection head it shares with the decoder
teacher lives in heads/detr/.

    encoder = BEVFormerEncoder(config, num_cameras)
    bev = encoder(image_features, geometry, image_size, previous_bev, prev_lidar_to_lidar)  # (B, C, Y, X)
    head = BEVFormerHead(config.detr_head)
    outputs = head(bev)                                        # BEVFormerHeadOutputs
    losses = head.loss(outputs, gt_boxes, gt_labels)           # sum(losses.values())
    detections = head.decode(outputs, sample_tokens, bev_aug)  # list[Detections], LiDAR frame
"""

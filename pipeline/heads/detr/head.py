"""BEVFormer's detection head: object queries decoded over the BEV feature, class and box branches per decoder
layer, Hungarian-matched focal + L1 losses on every layer, and the NMS-free decode into `Detections`.

Box branch outputs are turned into codes (cx, cy, log l, log w, cz, log h, sin, cos, vx, vy) by adding the
layer's reference points in inverse-sigmoid space to the centre codes, a sigmoid, and scaling onto the BEV range
(x, y) and the z range, so centres are metres in the augmented LiDAR frame (box_coder.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...data.types import Detections
from ..decode import undo_bev_augmentation
from .box_coder import CODE_SIZE, decode_boxes, encode_boxes
from .config import DETRHeadSpec
from .decoder import DetectionDecoder, inverse_sigmoid
from .matching import assign_queries

PRIOR_PROBABILITY = 0.01  # initial class probability of every query (bias_init_with_prob(0.01))


@dataclass
class BEVFormerHeadOutputs:
    """class_logits (L, B, K, classes) and box_codes (L, B, K, 10) of every decoder layer (the last one is the
    prediction); K object queries."""

    class_logits: torch.Tensor
    box_codes: torch.Tensor


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Summed sigmoid focal loss of logits (..., classes) against 0/1 targets of the same shape."""
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    miss = probabilities * (1 - targets) + (1 - probabilities) * targets  # 1 - p_t
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * miss.pow(gamma)
    return (cross_entropy * weight).sum()


def mean_over_ranks(count: float, device: torch.device) -> float:
    """The reference's reduce_mean of a loss normaliser (sync_cls_avg_factor): the mean of `count` over the torchrun
    ranks, or `count` itself in one process. Every rank must call it (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    total = torch.tensor(float(count), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def branch(embed_dims: int, out_channels: int, hidden_layers: int, layer_norm: bool) -> nn.Sequential:
    """hidden_layers x (Linear [-> LayerNorm] -> ReLU), then Linear -> out_channels."""
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers.append(nn.Linear(embed_dims, embed_dims))
        if layer_norm:
            layers.append(nn.LayerNorm(embed_dims))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(embed_dims, out_channels))
    return nn.Sequential(*layers)


class BEVFormerHead(nn.Module):
    """BEV feature (B, C, Y, X) -> BEVFormerHeadOutputs; `loss` and `decode` take those outputs."""

    def __init__(self, config: DETRHeadSpec):
        super().__init__()
        self.config = config
        head, channels = config.head, config.embed_dims
        self.num_classes = len(head.classes)
        # Each object query is a learned (positional embedding, content) pair.
        self.query_embedding = nn.Embedding(head.num_queries, 2 * channels)
        self.reference_points = nn.Linear(channels, 3)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.decoder = DetectionDecoder(config)
        class_branch = branch(channels, self.num_classes, head.num_branch_fcs, layer_norm=True)
        nn.init.constant_(class_branch[-1].bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        box_branch = branch(channels, CODE_SIZE, head.num_branch_fcs, layer_norm=False)
        self.class_branches = nn.ModuleList([copy.deepcopy(class_branch) for _ in range(head.num_layers)])
        self.box_branches = nn.ModuleList([copy.deepcopy(box_branch) for _ in range(head.num_layers)])
        self.register_buffer("code_weights", torch.tensor(head.code_weights, dtype=torch.float32), persistent=False)
        self.register_buffer("label_of_class_id", self._label_lookup(), persistent=False)

    def _label_lookup(self) -> torch.Tensor:
        """(max class id + 1,) head label of every global class id, -1 for classes the head does not predict."""
        ids = self.config.head.class_ids
        lookup = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        return lookup

    def forward(self, bev: torch.Tensor) -> BEVFormerHeadOutputs:
        """bev (B, C, Y, X) from the encoder."""
        batch, channels, num_y, num_x = bev.shape
        bev_queries = bev.flatten(2).transpose(1, 2)  # (B, Y*X, C)
        query_pos, query = self.query_embedding.weight.split(channels, dim=1)  # (K, C) each
        query_pos = query_pos[None].expand(batch, -1, -1)  # (B, K, C)
        query = query[None].expand(batch, -1, -1)  # (B, K, C)
        reference_points = self.reference_points(query_pos).sigmoid()  # (B, K, 3)
        states, references = self.decoder(query, query_pos, bev_queries, (num_y, num_x), reference_points,
                                          self.box_branches)
        logits, codes = [], []
        for layer, (state, reference) in enumerate(zip(states, references)):
            logits.append(self.class_branches[layer](state))  # (B, K, classes)
            codes.append(self._box_codes(self.box_branches[layer](state), reference))  # (B, K, 10)
        return BEVFormerHeadOutputs(class_logits=torch.stack(logits), box_codes=torch.stack(codes))

    def _box_codes(self, raw: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """raw branch output (B, K, 10), reference points (B, K, 3) in [0, 1] -> codes with metric centres."""
        bev = self.config.bev
        low = raw.new_tensor([bev.x_min, bev.y_min, bev.z_min])
        span = raw.new_tensor([bev.x_max - bev.x_min, bev.y_max - bev.y_min, bev.z_max - bev.z_min])
        unit = (torch.cat([raw[..., 0:2], raw[..., 4:5]], dim=-1) + inverse_sigmoid(reference)).sigmoid()  # (B, K, 3)
        centre = unit * span + low  # (B, K, 3) metres
        return torch.cat([centre[..., 0:2], raw[..., 2:4], centre[..., 2:3], raw[..., 5:]], dim=-1)

    def loss(self, outputs: BEVFormerHeadOutputs, gt_boxes: list[torch.Tensor],
             gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hungarian-matched focal class loss and L1 box-code loss of every decoder layer.

        gt_boxes: B tensors (M_b, 9) in the augmented LiDAR frame; gt_labels: B tensors (M_b,) global class ids
        (classes the head does not predict are dropped, as are boxes with a zero size). Returns
        {"loss_cls", "loss_box"} for the last layer and {"d{i}.loss_cls", "d{i}.loss_box"} for the earlier ones;
        the total is `sum(losses.values())`. Both are normalised by the number of matched GT boxes in the batch,
        averaged over the ranks under torchrun (`mean_over_ranks`), so every rank's loss has the same scale.
        """
        head = self.config.head
        device = outputs.class_logits.device
        targets = [self._targets(boxes.to(device), labels.to(device)) for boxes, labels in zip(gt_boxes, gt_labels)]
        num_layers = outputs.class_logits.shape[0]
        losses = {}
        for layer in range(num_layers):
            loss_cls, loss_box = self._layer_loss(outputs.class_logits[layer], outputs.box_codes[layer], targets)
            prefix = "" if layer == num_layers - 1 else f"d{layer}."
            losses[f"{prefix}loss_cls"] = head.class_loss_weight * loss_cls
            losses[f"{prefix}loss_box"] = head.box_loss_weight * loss_box
        return losses

    def _targets(self, boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's GT as (head labels (M,), codes (M, 10)), keeping predicted classes and finite codes."""
        lookup = self.label_of_class_id
        known = labels < len(lookup)
        head_labels = torch.where(known, lookup[labels.clamp(max=len(lookup) - 1)], torch.full_like(labels, -1))
        codes = encode_boxes(boxes.float())  # (M, 10)
        keep = (head_labels >= 0) & torch.isfinite(codes).all(dim=-1)
        return head_labels[keep], codes[keep]

    def _layer_loss(self, logits: torch.Tensor, codes: torch.Tensor,
                    targets: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, K, classes), codes (B, K, 10) of one layer -> (focal loss, L1 loss), both / num matched."""
        head = self.config.head
        class_targets = torch.zeros_like(logits, dtype=torch.float32)  # (B, K, classes), background = all zero
        box_error = logits.new_zeros((), dtype=torch.float32)
        num_matched = 0
        for b, (labels, gt_codes) in enumerate(targets):
            assignment = assign_queries(logits[b], codes[b], labels, gt_codes, head.class_cost_weight,
                                        head.box_cost_weight, head.focal_alpha, head.focal_gamma)
            queries, gts = assignment.query_indices, assignment.gt_indices
            class_targets[b, queries, labels[gts]] = 1.0
            difference = (codes[b, queries].float() - gt_codes[gts]).abs() * self.code_weights  # (P, 10)
            box_error = box_error + difference.sum()
            num_matched += len(queries)
        normaliser = max(mean_over_ranks(float(num_matched), logits.device), 1.0)
        loss_cls = sigmoid_focal_loss(logits.float(), class_targets, head.focal_alpha, head.focal_gamma) / normaliser
        return loss_cls, box_error / normaliser

    @torch.no_grad()
    def decode(self, outputs: BEVFormerHeadOutputs, sample_tokens: list[str],
               bev_aug: torch.Tensor | np.ndarray | None = None) -> list[Detections]:
        """NMS-free decode of the last layer: top max_detections over query x class sigmoid scores, optional score
        threshold, centres inside post_center_range; then bev_aug (B, 4, 4), if given, is undone. One
        `Detections` per sample in the LiDAR frame, best first, labels as global class ids."""
        head = self.config.head
        logits, codes = outputs.class_logits[-1], outputs.box_codes[-1]  # (B, K, classes), (B, K, 10)
        batch, num_queries, num_classes = logits.shape
        k = min(head.max_detections, num_queries * num_classes)
        scores, flat = logits.sigmoid().reshape(batch, -1).topk(k, dim=1)  # (B, k) over K*classes, query-major
        queries, labels = flat // num_classes, flat % num_classes
        boxes = decode_boxes(codes.gather(1, queries[..., None].expand(-1, -1, CODE_SIZE)).float())  # (B, k, 9)
        low = boxes.new_tensor(head.post_center_range[:3])
        high = boxes.new_tensor(head.post_center_range[3:])
        keep = ((boxes[..., :3] >= low) & (boxes[..., :3] <= high)).all(dim=-1)  # (B, k)
        if head.score_threshold is not None:
            keep &= scores >= head.score_threshold
        class_ids = torch.tensor(head.class_ids, dtype=torch.long, device=labels.device)[labels]  # (B, k)
        augmentations = None if bev_aug is None else np.asarray(
            bev_aug.cpu().numpy() if isinstance(bev_aug, torch.Tensor) else bev_aug, dtype=np.float64)
        detections = []
        for b, token in enumerate(sample_tokens):
            sample_boxes = boxes[b][keep[b]].cpu().numpy()
            if augmentations is not None:
                sample_boxes = undo_bev_augmentation(sample_boxes, augmentations[b])
            detections.append(Detections(sample_token=token, boxes=sample_boxes.astype(np.float32),
                                         scores=scores[b][keep[b]].float().cpu().numpy(),
                                         labels=class_ids[b][keep[b]].cpu().numpy().astype(np.int64),
                                         attributes=None))
        return detections

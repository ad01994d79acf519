"""Pillar feature net (PointPillars / CenterPoint, non-legacy) and the scatter onto the BEV canvas.

Every point in range gets 11 features: its 5 inputs (x, y, z, intensity, time lag), its offset from the mean
of its pillar's points (3), and its offset from the pillar's geometric centre (3). A linear layer (no bias),
BN1d and ReLU map them to C channels, and a scatter-max over each pillar's points gives the pillar feature.
Everything is vectorised over points and pillars with index ops (no loop over pillars).

With `max_points_per_pillar > 0` the net reproduces mmdet3d's hard voxelization: only the first
`max_points_per_pillar` points of a pillar (input order) are used, only the first `max_pillars` pillars (in order
of their first point) are kept, and a pillar with fewer points also takes the max with the feature of an all-zero
padding row (mmdet3d's PillarFeatureNet runs its layer on zero-padded pillars). Module names (`pfn_layers.0.linear`,
`pfn_layers.0.norm`) match mmdet3d so its checkpoints load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NUM_DECORATIONS = 6  # 3 offsets from the pillar's point mean + 3 offsets from the pillar centre


class PFNLayer(nn.Module):
    """linear (no bias) -> BN1d -> ReLU, applied per point."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, momentum: float):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.norm = nn.BatchNorm1d(out_channels, eps=eps, momentum=momentum)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (P, C_in) -> (P, C_out)."""
        return torch.relu(self.norm(self.linear(features)))


@dataclass
class Pillars:
    """Pillar features and where they sit on the canvas.

    features: (V, C) pillar features; batch_index, iy, ix: (V,) canvas position of each pillar.
    """

    features: torch.Tensor
    batch_index: torch.Tensor
    iy: torch.Tensor
    ix: torch.Tensor


class PillarFeatureNet(nn.Module):
    """Points (list of B (P_b, F)) -> pillar features on the canvas defined by range and pillar size."""

    def __init__(self, point_features: int, out_channels: int, point_cloud_range: tuple[float, ...],
                 pillar_size: tuple[float, float], max_points_per_pillar: int = 0, max_pillars: int = 0,
                 eps: float = 1e-3, momentum: float = 0.01):
        super().__init__()
        self.point_features = point_features
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.pillar_size = (float(pillar_size[0]), float(pillar_size[1]))
        self.pillar_height = self.point_cloud_range[5] - self.point_cloud_range[2]
        self.num_x = int(round((self.point_cloud_range[3] - self.point_cloud_range[0]) / self.pillar_size[0]))
        self.num_y = int(round((self.point_cloud_range[4] - self.point_cloud_range[1]) / self.pillar_size[1]))
        self.max_points_per_pillar = max_points_per_pillar
        self.max_pillars = max_pillars
        self.pfn_layers = nn.ModuleList(
            [PFNLayer(point_features + NUM_DECORATIONS, out_channels, eps=eps, momentum=momentum)])

    def assign(self, points: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Points in range and their pillar.

        Returns features (P, F), pillar cell (P, 2) as (ix, iy), batch index (P,), flat pillar id (P,) =
        b * Y * X + iy * X + ix; points outside the range are dropped, input order is kept.
        """
        x_min, y_min, z_min, x_max, y_max, z_max = self.point_cloud_range
        kept_features, kept_cells, kept_batch = [], [], []
        for b, cloud in enumerate(points):
            cloud = cloud[:, :self.point_features]
            ix = torch.floor((cloud[:, 0] - x_min) / self.pillar_size[0]).long()
            iy = torch.floor((cloud[:, 1] - y_min) / self.pillar_size[1]).long()
            iz = torch.floor((cloud[:, 2] - z_min) / self.pillar_height).long()
            inside = (ix >= 0) & (ix < self.num_x) & (iy >= 0) & (iy < self.num_y) & (iz == 0)
            kept_features.append(cloud[inside])
            kept_cells.append(torch.stack([ix[inside], iy[inside]], dim=1))
            kept_batch.append(torch.full((int(inside.sum()),), b, dtype=torch.long, device=cloud.device))
        features = torch.cat(kept_features)
        cells = torch.cat(kept_cells)
        batch_index = torch.cat(kept_batch)
        flat = batch_index * (self.num_y * self.num_x) + cells[:, 1] * self.num_x + cells[:, 0]
        return features, cells, batch_index, flat

    def limit(self, flat: torch.Tensor) -> torch.Tensor:
        """Boolean (P,) mask of the points hard voxelization keeps (first points per pillar, first pillars)."""
        num_points = flat.shape[0]
        order = torch.arange(num_points, device=flat.device)
        unique, inverse = torch.unique(flat, return_inverse=True)
        first = torch.full((unique.shape[0],), num_points, dtype=torch.long, device=flat.device)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")  # (V,) first point index of each pillar
        keep = torch.ones(num_points, dtype=torch.bool, device=flat.device)
        if self.max_points_per_pillar > 0:
            # rank of a point inside its pillar = its position among the pillar's points in input order
            sorted_order = torch.argsort(inverse * num_points + order)
            sorted_pillar = inverse[sorted_order]
            start = torch.searchsorted(sorted_pillar, sorted_pillar, right=False)
            rank = torch.empty_like(order)
            rank[sorted_order] = torch.arange(num_points, device=flat.device) - start
            keep &= rank < self.max_points_per_pillar
        if self.max_pillars > 0:
            per_sample = self.num_y * self.num_x
            pillar_sample = unique // per_sample
            pillar_order = torch.argsort(first)  # pillars by first occurrence; samples stay contiguous
            sample_of_sorted = pillar_sample[pillar_order]
            sample_start = torch.searchsorted(sample_of_sorted, sample_of_sorted, right=False)
            pillar_rank = torch.empty_like(pillar_order)
            pillar_rank[pillar_order] = torch.arange(len(pillar_order), device=flat.device) - sample_start
            keep &= (pillar_rank < self.max_pillars)[inverse]
        return keep

    def forward(self, points: list[torch.Tensor]) -> Pillars:
        """points: B tensors (P_b, >= point_features) -> `Pillars` with (V, C) features.

        Always float32, also under a bf16 autocast: the decorated point features carry absolute coordinates,
        which bf16 (8 mantissa bits) would round to 0.25 m at 50 m."""
        with torch.autocast(device_type=points[0].device.type, enabled=False):
            return self._encode([p.float() for p in points])

    def _encode(self, points: list[torch.Tensor]) -> Pillars:
        features, cells, batch_index, flat = self.assign(points)
        if self.max_points_per_pillar > 0 or self.max_pillars > 0:
            keep = self.limit(flat)
            features, cells, batch_index, flat = features[keep], cells[keep], batch_index[keep], flat[keep]
        unique, inverse = torch.unique(flat, return_inverse=True)  # V pillars
        num_pillars = unique.shape[0]
        xyz = features[:, :3]
        counts = torch.zeros(num_pillars, device=xyz.device, dtype=xyz.dtype).index_add_(
            0, inverse, torch.ones_like(xyz[:, 0]))
        sums = torch.zeros(num_pillars, 3, device=xyz.device, dtype=xyz.dtype).index_add_(0, inverse, xyz)
        cluster_offset = xyz - (sums / counts.unsqueeze(1))[inverse]
        x_min, y_min, z_min = self.point_cloud_range[:3]
        centre = torch.stack([cells[:, 0].to(xyz.dtype) * self.pillar_size[0] + (x_min + self.pillar_size[0] / 2),
                              cells[:, 1].to(xyz.dtype) * self.pillar_size[1] + (y_min + self.pillar_size[1] / 2),
                              torch.full_like(xyz[:, 2], z_min + self.pillar_height / 2)], dim=1)
        decorated = torch.cat([features, cluster_offset, xyz - centre], dim=1)  # (P, F + 6)
        layer = self.pfn_layers[0]
        hard = self.max_points_per_pillar > 0
        if hard:
            # one all-zero row stands for the padding of under-full pillars (its feature enters their max)
            decorated = torch.cat([decorated, decorated.new_zeros(1, decorated.shape[1])])
        point_features = layer(decorated)  # (P, C)
        channels = point_features.shape[1]
        pillar_features = point_features.new_zeros(num_pillars, channels)
        if hard:
            padding_feature = point_features[-1]
            point_features = point_features[:-1]
        # ReLU output is >= 0, so scatter-max into zeros with include_self is the max over the pillar's points
        pillar_features = pillar_features.scatter_reduce(
            0, inverse.unsqueeze(1).expand(-1, channels), point_features, reduce="amax", include_self=True)
        if hard:
            under_full = counts < self.max_points_per_pillar
            pillar_features = torch.where(under_full.unsqueeze(1),
                                          torch.maximum(pillar_features, padding_feature), pillar_features)
        per_sample = self.num_y * self.num_x
        within = unique % per_sample
        return Pillars(features=pillar_features, batch_index=unique // per_sample,
                       iy=within // self.num_x, ix=within % self.num_x)


def scatter_to_canvas(pillars: Pillars, batch_size: int, num_y: int, num_x: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PointPillarsScatter: pillar features -> canvas (B, C, Y, X) and occupancy (B, Y, X) bool."""
    channels = pillars.features.shape[1]
    device = pillars.features.device
    canvas = pillars.features.new_zeros(batch_size * num_y * num_x, channels)
    flat = pillars.batch_index * (num_y * num_x) + pillars.iy * num_x + pillars.ix
    canvas = canvas.index_copy(0, flat, pillars.features)
    canvas = canvas.reshape(batch_size, num_y, num_x, channels).permute(0, 3, 1, 2).contiguous()  # (B, C, Y, X)
    occupancy = torch.zeros(batch_size * num_y * num_x, dtype=torch.bool, device=device)
    occupancy[flat] = True
    return canvas, occupancy.reshape(batch_size, num_y, num_x)

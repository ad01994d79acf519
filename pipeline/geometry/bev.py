"""The BEV grid (index <-> metric) and BEV augmentation (rotation, scale, flips) as matrices.

A BEV map is laid out [Y, X]: row index iy grows with +y, column index ix with +x. Cell (iy, ix) covers
[x_min + ix*res, x_min + (ix+1)*res) x [y_min + iy*res, y_min + (iy+1)*res); its centre is the half-cell offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BEVGrid:
    """A square-celled BEV grid over [x_min, x_max) x [y_min, y_max) in the LiDAR frame."""

    x_min: float = -51.2
    x_max: float = 51.2
    y_min: float = -51.2
    y_max: float = 51.2
    resolution: float = 0.8  # metres per cell

    def __post_init__(self) -> None:
        for name, lo, hi in (("x", self.x_min, self.x_max), ("y", self.y_min, self.y_max)):
            cells = (hi - lo) / self.resolution
            if hi <= lo or abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"BEV {name} range [{lo}, {hi}) is not a positive whole number of "
                                 f"{self.resolution} m cells")

    @property
    def num_x(self) -> int:
        return int(round((self.x_max - self.x_min) / self.resolution))

    @property
    def num_y(self) -> int:
        return int(round((self.y_max - self.y_min) / self.resolution))

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X)."""
        return self.num_y, self.num_x

    def scaled(self, factor: int) -> "BEVGrid":
        """The same extent with cells `factor` times larger (factor > 0) e.g. a stride-2 feature map."""
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, self.resolution * factor)

    def with_shape(self, num_y: int, num_x: int) -> "BEVGrid":
        """The same extent divided into (num_y, num_x) cells (square cells required)."""
        res_x = (self.x_max - self.x_min) / num_x
        res_y = (self.y_max - self.y_min) / num_y
        if abs(res_x - res_y) > 1e-9:
            raise ValueError(f"grid {num_y}x{num_x} over this extent has non-square cells {res_y} x {res_x}")
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, res_x)

    def matches(self, other: "BEVGrid", tolerance: float = 1e-6) -> bool:
        """Same extent and resolution up to `tolerance` metres."""
        mine = (self.x_min, self.x_max, self.y_min, self.y_max, self.resolution)
        theirs = (other.x_min, other.x_max, other.y_min, other.y_max, other.resolution)
        return all(abs(a - b) <= tolerance for a, b in zip(mine, theirs))


@dataclass
class BEVRange:
    """A BEV grid in the (augmented) key-frame LiDAR frame, plus the z slab that is pooled into it."""

    x_min: float = -51.2  # metres
    x_max: float = 51.2  # metres
    y_min: float = -51.2  # metres
    y_max: float = 51.2  # metres
    resolution: float = 0.8  # metres per BEV cell
    z_min: float = -10.0  # points below this height are dropped
    z_max: float = 10.0  # points at or above this height are dropped

    def grid(self) -> BEVGrid:
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, self.resolution)


@dataclass(frozen=True)
class BEVAugmentation:
    """One BEV augmentation: rotate by `rotation` about +z, scale by `scale`, then flip.

    `flip_x` mirrors across the x axis (y -> -y); `flip_y` mirrors across the y axis (x -> -x), following the
    BEVDet convention of naming the flip by the axis it keeps. The matrix applies rotation, then scale, then flips.
    """

    rotation: float = 0.0
    scale: float = 1.0
    flip_x: bool = False
    flip_y: bool = False

    @property
    def is_identity(self) -> bool:
        return self.rotation == 0.0 and self.scale == 1.0 and not self.flip_x and not self.flip_y

    def matrix(self) -> np.ndarray:
        """4x4 matrix acting on LiDAR-frame points (not rigid when scale != 1 or flipped)."""
        c, s = np.cos(self.rotation), np.sin(self.rotation)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)
        flip = np.diag([-1.0 if self.flip_y else 1.0, -1.0 if self.flip_x else 1.0, 1.0])
        m = np.eye(4)
        m[:3, :3] = flip @ (self.scale * np.eye(3)) @ rot
        return m

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """Augment points (P, >=3); other columns are passed through."""
        out = np.array(points, copy=True)
        out[:, :3] = points[:, :3] @ self.matrix()[:3, :3].T
        return out

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Augment boxes (K, 7 or 9): centres as points, sizes scaled, yaw rotated/mirrored, velocity too."""
        boxes = np.asarray(boxes, dtype=np.float64)
        out = boxes.copy()
        if len(boxes) == 0:
            return out
        m = self.matrix()[:3, :3]
        out[:, :3] = boxes[:, :3] @ m.T
        out[:, 3:6] = boxes[:, 3:6] * self.scale
        yaw = boxes[:, 6] + self.rotation
        if self.flip_x:
            yaw = -yaw
        if self.flip_y:
            yaw = np.pi - yaw
        out[:, 6] = (yaw + np.pi) % (2 * np.pi) - np.pi
        if boxes.shape[1] >= 9:
            vel = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], axis=1)
            out[:, 7:9] = (vel @ m.T)[:, :2]
        return out

    def as_array(self) -> np.ndarray:
        """(4,) float: rotation, scale, flip_x, flip_y (the form stored in caches)."""
        return np.array([self.rotation, self.scale, float(self.flip_x), float(self.flip_y)], dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> "BEVAugmentation":
        r, s, fx, fy = (float(v) for v in values)
        return cls(rotation=r, scale=s, flip_x=fx > 0.5, flip_y=fy > 0.5)


def sample_bev_augmentation(rng: np.random.Generator, rotation_range: tuple[float, float],
                            scale_range: tuple[float, float], flip_x_prob: float,
                            flip_y_prob: float) -> BEVAugmentation:
    """Draw one augmentation from uniform rotation/scale ranges and Bernoulli flips (a fixed draw order)."""
    rotation = float(rng.uniform(*rotation_range))
    scale = float(rng.uniform(*scale_range))
    flip_x = bool(rng.uniform() < flip_x_prob)
    flip_y = bool(rng.uniform() < flip_y_prob)
    return BEVAugmentation(rotation=rotation, scale=scale, flip_x=flip_x, flip_y=flip_y)

"""The ego's path through a scene (arc length, pose and heading at any time) and the rectangle geometry on the
ground plane that keeps objects apart from each other and from the ego."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EgoPath:
    """Constant-curvature path: pose(t) for t in seconds since the first key frame.

    The ego drives at `speed`, or (world 2) along `profile`: knots (t, v) of a piecewise-linear speed in time
    (constant `speed` before the first knot, the last knot's speed after the last), so it may brake, stop and
    start again.
    """

    start_xy: tuple[float, float]  # global position at t = 0
    start_heading: float  # yaw at t = 0 [rad]
    speed: float  # [m/s]
    curvature: float  # [1/m]; heading changes by curvature * arc length
    profile: tuple[tuple[float, float], ...] = ()

    def arc(self, t: np.ndarray | float) -> np.ndarray:
        """Arc length (T,) driven since t = 0 (negative before it)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        if not self.profile:
            return self.speed * t
        knots_t = np.array([k[0] for k in self.profile])
        knots_v = np.array([k[1] for k in self.profile])
        grid_t = np.concatenate([[min(knots_t[0], 0.0)], knots_t]) if knots_t[0] > 0 else knots_t
        grid_v = np.interp(grid_t, knots_t, knots_v, left=self.speed)
        grid_s = np.concatenate([[0.0], np.cumsum(np.diff(grid_t) * (grid_v[1:] + grid_v[:-1]) / 2)])
        grid_s -= np.interp(0.0, grid_t, grid_s) if grid_t[0] <= 0.0 else 0.0
        out = np.empty_like(t)
        before, after = t < grid_t[0], t > grid_t[-1]
        inside = ~(before | after)
        out[before] = grid_s[0] + (t[before] - grid_t[0]) * self.speed
        out[after] = grid_s[-1] + (t[after] - grid_t[-1]) * grid_v[-1]
        # within a segment the speed is linear in time: s = s0 + v0 dt + (v1 - v0) dt^2 / (2 T)
        index = np.clip(np.searchsorted(grid_t, t[inside], side="right") - 1, 0, len(grid_t) - 2)
        dt = t[inside] - grid_t[index]
        span = np.maximum(grid_t[index + 1] - grid_t[index], 1e-9)
        out[inside] = (grid_s[index] + grid_v[index] * dt
                       + (grid_v[index + 1] - grid_v[index]) * dt ** 2 / (2 * span))
        return out

    def time_at_arc(self, s: float) -> float:
        """The first time the ego is at arc length s (extrapolated at the end speeds beyond the profile)."""
        if not self.profile:
            return s / self.speed
        grid = np.linspace(min(self.profile[0][0], 0.0) - 30.0, self.profile[-1][0] + 30.0, 4001)
        arcs = np.maximum.accumulate(self.arc(grid))
        if s <= arcs[0]:
            return float(grid[0] + (s - arcs[0]) / self.speed)
        if s >= arcs[-1]:
            return float(grid[-1] + (s - arcs[-1]) / max(self.profile[-1][1], 1e-3))
        i = int(np.searchsorted(arcs, s))  # the first grid time at or past s; interpolate from the one before
        fraction = (s - arcs[i - 1]) / max(arcs[i] - arcs[i - 1], 1e-12)
        return float(grid[i - 1] + fraction * (grid[i] - grid[i - 1]))

    def pose(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Positions (T, 2) and headings (T,) at times t (T,) [s]."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        arc = self.arc(t)
        half_turn = 0.5 * self.curvature * arc
        # chord length of the arc = arc * sin(half_turn) / half_turn (np.sinc is sin(pi x) / (pi x)).
        chord = arc * np.sinc(half_turn / np.pi)
        direction = self.start_heading + half_turn
        xy = np.stack([self.start_xy[0] + chord * np.cos(direction), self.start_xy[1] + chord * np.sin(direction)], -1)
        return xy, self.start_heading + self.curvature * arc


def rectangle_corners(xy: np.ndarray, length: np.ndarray, width: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Corners (..., 4, 2) of rotated rectangles given by broadcastable centre (..., 2), length, width, yaw (...)."""
    c, s = np.cos(yaw), np.sin(yaw)
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64) * 0.5
    local_x = signs[:, 0] * np.asarray(length)[..., None]  # (..., 4)
    local_y = signs[:, 1] * np.asarray(width)[..., None]
    x = xy[..., 0, None] + c[..., None] * local_x - s[..., None] * local_y
    y = xy[..., 1, None] + s[..., None] * local_x + c[..., None] * local_y
    return np.stack([x, y], axis=-1)


def rectangles_overlap(corners_a: np.ndarray, corners_b: np.ndarray) -> np.ndarray:
    """Separating-axis test for convex quadrilaterals (..., 4, 2) -> (...) True where they intersect."""
    corners_a, corners_b = np.broadcast_arrays(corners_a, corners_b)
    separated = np.zeros(corners_a.shape[:-2], dtype=bool)
    for corners in (corners_a, corners_b):
        for edge in (0, 1):  # a rectangle has two edge directions
            axis = corners[..., edge + 1, :] - corners[..., edge, :]  # (..., 2)
            normal = np.stack([-axis[..., 1], axis[..., 0]], axis=-1)[..., None, :]  # (..., 1, 2)
            proj_a = (corners_a * normal).sum(-1)  # (..., 4)
            proj_b = (corners_b * normal).sum(-1)
            separated |= (proj_a.max(-1) < proj_b.min(-1)) | (proj_b.max(-1) < proj_a.min(-1))
    return ~separated

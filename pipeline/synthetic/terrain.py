"""World 2 terrain: the ground height under a scene, gentle slopes plus kerbs, and rays cast against it.

The height is a smooth field plus a kerb step:

    H(x, y) = sum_k a_k sin(kx_k x + ky_k y + phase_k) + kerb_height * [the point is off the roadway]

The smooth part is a few plane waves of 50-250 m wavelength drawn per scene, so grades of a few percent change
over tens of metres; its slope never exceeds `max_slope` = sum_k a_k |k_k|. The roadway is the band between the
two kerb lines of the street (lateral offsets `road` from the ego lane's centre line, as camera.street_coordinates
measures them); sidewalks and everything beyond them stand `kerb_height` higher.

Conventions (nuScenes): ego_pose translation z is 0. The ego's true height is the terrain under its rear axle, so
an annotation's z is written relative to the ego at its key frame (`frames.ego_height`): global -> ego -> sensor
transforms of points and boxes of one key frame agree exactly; sweeps and cameras taken a few ms earlier or
later are off by the height the ego climbed in between, as in nuScenes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ego_path import EgoPath, rectangle_corners

WHEELBASE = 2.588  # [m] the ego (a Renault Zoe): front axle ahead of the rear axle, which is the ego origin
TRACK = 1.51  # [m] between the left and the right wheels
KERB_HEIGHT = (0.10, 0.15)  # [m] drawn per scene
GROUND_FACE, KERB_FACE = -1, -2  # what a ray hit: the ground's surface or a kerb's vertical face
_MARCH_TOLERANCE = 0.02  # [m] the march stops this close above the surface; Newton steps finish the hit
_NEWTON_STEPS = 12  # at most; a ray grazing the ground far away needs the most
_ROOT_TOLERANCE = 1e-6  # [m] a hit is this close to the surface (the files hold float32)
_STEEP_FIRST_STEPS = 3  # Newton steps every steep ray takes (from the tangent plane, most need 2-4)
_STEEP_STEPS = 40  # at most (Newton converges in a few)
_MAX_MARCH = 80  # march steps before a ray is given up as a miss (a ray grazing the ground far away)


def _sin_cos(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of angles [rad] (any shape) to about 1e-7: reduced to [-pi, pi] in float64, then evaluated in
    float32 (numpy's vectorised float32 sin and cos are tens of times faster; the terrain's amplitudes are a few
    metres, so the heights stay exact to well under a micrometre)."""
    angle = np.asarray(angle, dtype=np.float64)
    reduced = (angle - 2 * np.pi * np.round(angle / (2 * np.pi))).astype(np.float32)
    return np.sin(reduced).astype(np.float64), np.cos(reduced).astype(np.float64)


@dataclass(frozen=True)
class Terrain:
    """Ground height of one scene: plane waves `waves` (N, 4) = (kx, ky, phase, amplitude) and the kerbs of the
    street along `path` (the roadway between lateral offsets `road`) `kerb_height` high."""

    waves: np.ndarray
    path: EgoPath
    road: tuple[float, float]
    kerb_height: float

    @classmethod
    def draw(cls, rng: np.random.Generator, path: EgoPath, road: tuple[float, float],
             max_grade: float = 0.06) -> "Terrain":
        """Three plane waves of random direction, wavelength 50-250 m and phase, scaled so that their summed slope
        bound is `max_grade` times a factor in [0.4, 1] (some streets are flatter than others)."""
        count = 3
        direction = rng.uniform(-np.pi, np.pi, size=count)
        wavenumber = 2 * np.pi / rng.uniform(50.0, 250.0, size=count)
        phase = rng.uniform(-np.pi, np.pi, size=count)
        weight = rng.uniform(0.3, 1.0, size=count)
        slopes = weight / weight.sum() * max_grade * rng.uniform(0.4, 1.0)  # a_k |k_k| per wave
        waves = np.stack([wavenumber * np.cos(direction), wavenumber * np.sin(direction), phase,
                          slopes / wavenumber], axis=-1)
        return cls(waves, path, road, float(rng.uniform(*KERB_HEIGHT)))

    @property
    def max_slope(self) -> float:
        """Upper bound of |grad H| over the smooth part (the kerbs are steps)."""
        return float(np.sum(np.abs(self.waves[:, 3]) * np.hypot(self.waves[:, 0], self.waves[:, 1])))

    # ----------------------------------------------------------------------------------------------- heights
    def smooth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The smooth part of the height at points (x, y) (any broadcastable shape)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        out = np.zeros(np.broadcast(x, y).shape)
        for kx, ky, phase, amplitude in self.waves:
            out += amplitude * _sin_cos(kx * x + ky * y + phase)[0]
        return out

    def gradient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dH/dx, dH/dy) of the smooth part."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        gx, gy = np.zeros(np.broadcast(x, y).shape), np.zeros(np.broadcast(x, y).shape)
        for kx, ky, phase, amplitude in self.waves:
            c = amplitude * _sin_cos(kx * x + ky * y + phase)[1]
            gx += kx * c
            gy += ky * c
        return gx, gy

    def lateral(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Lateral offset from the ego lane's centre line, positive to the left (camera.street_coordinates)."""
        path = self.path
        h0 = path.start_heading
        normal = np.array([-np.sin(h0), np.cos(h0)])
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if abs(path.curvature) < 1e-9:
            return (x - path.start_xy[0]) * normal[0] + (y - path.start_xy[1]) * normal[1]
        radius = 1.0 / path.curvature  # signed: the centre is on the left for a left turn
        cx, cy = path.start_xy[0] + radius * normal[0], path.start_xy[1] + radius * normal[1]
        return np.sign(radius) * (abs(radius) - np.hypot(x - cx, y - cy))

    def off_road(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True on sidewalks and beyond: off the roadway between the kerbs."""
        lateral = self.lateral(x, y)
        return (lateral < self.road[0]) | (lateral > self.road[1])

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground height H at points (x, y), kerbs included."""
        return self.smooth(x, y) + self.kerb_height * self.off_road(x, y)

    def footprint_height(self, xy: np.ndarray, length: np.ndarray, width: np.ndarray, yaw: np.ndarray,
                         lowest: np.ndarray) -> np.ndarray:
        """Ground height (K,) an object with footprint centre xy (K, 2), length, width and yaw (K,) stands at: the
        height under its centre, or where `lowest` (K,) the lowest of its centre and corners (a building on a
        slope is sunk into it rather than floating)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = self.height(xy[:, 0], xy[:, 1])
        if np.any(lowest):
            k = np.nonzero(lowest)[0]
            corners = rectangle_corners(xy[k], np.asarray(length)[k], np.asarray(width)[k], np.asarray(yaw)[k])
            out[k] = np.minimum(out[k], self.height(corners[..., 0], corners[..., 1]).min(axis=-1))
        return out

    # ----------------------------------------------------------------------------------------------- the ego
    def ego_attitude(self, xy: np.ndarray, heading: float) -> tuple[float, float, float]:
        """(height of the ego origin, pitch, roll) of the ego at xy (2,) with yaw `heading` standing on its four
        wheels: the plane z = z0 + a x' + b y' through the ground under the wheels (x' forward from the rear axle,
        y' left) in the least-squares sense gives z0 (the ground under the rear axle's centre), the pitch atan(a)
        (nose up positive) and the roll atan(b cos(pitch)) (left side up positive)."""
        c, s = np.cos(heading), np.sin(heading)
        forward = np.array([0.0, 0.0, WHEELBASE, WHEELBASE])
        left = np.array([TRACK / 2, -TRACK / 2, TRACK / 2, -TRACK / 2])
        heights = self.height(xy[0] + c * forward - s * left, xy[1] + s * forward + c * left)
        rear, front = heights[:2].mean(), heights[2:].mean()
        a = (front - rear) / WHEELBASE
        b = (heights[[0, 2]].mean() - heights[[1, 3]].mean()) / TRACK
        pitch = float(np.arctan(a))
        return float(rear), pitch, float(np.arctan(b * np.cos(pitch)))

    # ----------------------------------------------------------------------------------------------- rays
    def _kerb_crossings(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Ray parameters t > 0 (R, 4), ascending, inf-padded, where rays cross one of the two kerb lines."""
        path = self.path
        h0 = path.start_heading
        normal = np.array([-np.sin(h0), np.cos(h0)])
        dxy = directions[:, :2]
        out = np.full((len(directions), 4), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            if abs(path.curvature) < 1e-9:
                rate = dxy @ normal  # d lateral / dt
                start = float(self.lateral(origin[0], origin[1]))
                for column, kerb in enumerate(self.road):
                    t = (kerb - start) / rate
                    out[:, column] = np.where(np.isfinite(t) & (t > 0), t, np.inf)
            else:
                radius = 1.0 / path.curvature
                centre = np.asarray(path.start_xy) + radius * normal
                rel = origin[:2] - centre
                a = (dxy ** 2).sum(-1)
                b = dxy @ rel
                for column, kerb in enumerate(self.road):
                    r = abs(radius) - np.sign(radius) * kerb
                    disc = b * b - a * (rel @ rel - r * r)
                    root = np.sqrt(np.maximum(disc, 0.0))
                    for j, t in enumerate(((-b - root) / a, (-b + root) / a)):
                        out[:, 2 * column + j] = np.where((disc > 0) & np.isfinite(t) & (t > 0), t, np.inf)
        return np.sort(out, axis=1)

    def _first_root(self, origin: np.ndarray, directions: np.ndarray, level: np.ndarray, start: np.ndarray,
                    stop: np.ndarray) -> np.ndarray:
        """First t in [start, stop] (R,) where each ray meets the smooth surface raised by `level` (R,); inf if
        none. A march that cannot step over the surface, then Newton steps.

        Along a ray the gap f(t) to the surface has |f''| <= M = sum_k |a_k| |k_k|^2 |d_xy|^2 (the waves' curvature),
        so f(t + s) >= f(t) + f'(t) s - M s^2 / 2: a step to the first zero of that bound never passes a root, and
        near one it is a Newton step."""
        curvature = float(np.sum(np.abs(self.waves[:, 3]) * (self.waves[:, 0] ** 2 + self.waves[:, 1] ** 2)))
        horizontal = np.hypot(directions[:, 0], directions[:, 1])
        bound = np.maximum(curvature * horizontal ** 2, 1e-12)  # (R,) M
        closing = self.max_slope * horizontal - directions[:, 2]  # the fastest the ray can approach the surface
        t = start.copy()
        result = np.full(len(t), np.inf)
        active = np.nonzero((closing > 0) & (start < stop))[0]
        for _ in range(_MAX_MARCH):
            if not len(active):
                break
            p = origin + t[active, None] * directions[active]
            height, gx, gy = self._surface(p[:, 0], p[:, 1])
            gap = p[:, 2] - height - level[active]
            near = gap < _MARCH_TOLERANCE
            if near.any():
                result[active[near]] = t[active[near]]  # refined below
            rate = directions[active, 2] - gx * directions[active, 0] - gy * directions[active, 1]  # f'
            m = bound[active]
            gap = np.maximum(gap, 0.0)
            root = np.sqrt(rate * rate + 2.0 * m * gap)
            # the zero of gap + rate s - m s^2 / 2, in the form without cancellation for either sign of rate
            t[active] += np.where(rate > 0, (rate + root) / m, 2.0 * gap / np.maximum(root - rate, 1e-300))
            keep = ~near & (t[active] <= stop[active])
            active = active[keep]
        found = np.nonzero(np.isfinite(result))[0]
        refining = found
        for _ in range(_NEWTON_STEPS):  # Newton from just above the surface, until the gap is below 1e-7 m
            if not len(refining):
                break
            p = origin + result[refining, None] * directions[refining]
            gap = p[:, 2] - self.smooth(p[:, 0], p[:, 1]) - level[refining]
            gx, gy = self.gradient(p[:, 0], p[:, 1])
            rate = directions[refining, 2] - gx * directions[refining, 0] - gy * directions[refining, 1]
            step = np.where(rate < -1e-9, -gap / np.minimum(rate, -1e-9), 0.0)
            result[refining] = result[refining] + step
            refining = refining[np.abs(gap) > 1e-7]
        result[found] = np.where(result[found] <= stop[found] + 1e-9, np.maximum(result[found], start[found]),
                                 np.inf)
        return result

    def _surface(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The smooth height and its gradient (dH/dx, dH/dy) at points (x, y) (N,), in one pass over the waves."""
        height, gx, gy = np.zeros(len(x)), np.zeros(len(x)), np.zeros(len(x))
        for kx, ky, phase, amplitude in self.waves:
            sin, cos = _sin_cos(kx * x + ky * y + phase)
            height += amplitude * sin
            c = amplitude * cos
            gx += kx * c
            gy += ky * c
        return height, gx, gy

    def _steep_root(self, origin: np.ndarray, directions: np.ndarray, level: float,
                    start: np.ndarray | None = None) -> np.ndarray:
        """The one t (R,) where rays that descend faster than the ground can rise (d_z < -max_slope |d_xy|) meet
        the smooth surface raised by `level`: the gap to the surface falls monotonically along them. Newton's steps
        from `start` (default: where the ray meets the plane tangent to the ground under the origin), a few for
        every ray, then, for the rays not yet within _ROOT_TOLERANCE, kept inside a shrinking bracket."""
        dx, dy, dz = (np.ascontiguousarray(directions[:, axis]) for axis in range(3))
        if start is None:
            height, gx, gy = self._surface(origin[None, 0], origin[None, 1])
            start = (origin[2] - height[0] - level) / -(dz - gx[0] * dx - gy[0] * dy)
        t = np.maximum(start, 0.0)
        for _ in range(_STEEP_FIRST_STEPS):  # every ray at once: no indexing
            height, gx, gy = self._surface(origin[0] + t * dx, origin[1] + t * dy)
            gap = origin[2] + t * dz - height - level
            t = np.maximum(t - gap / (dz - gx * dx - gy * dy), 0.0)
        height, _, _ = self._surface(origin[0] + t * dx, origin[1] + t * dy)
        gap = origin[2] + t * dz - height - level
        active = np.nonzero(np.abs(gap) > _ROOT_TOLERANCE)[0]
        if not len(active):
            return t
        top = float(np.abs(self.waves[:, 3]).sum()) + abs(level)  # the surface lies within +-top of 0
        low = np.zeros(len(t))
        high = (origin[2] + top) / -dz  # the ray is below -top from here on
        for _ in range(_STEEP_STEPS):
            if not len(active):
                break
            p = origin + t[active, None] * directions[active]
            height, gx, gy = self._surface(p[:, 0], p[:, 1])
            gap = p[:, 2] - height - level
            low[active] = np.where(gap > 0, t[active], low[active])
            high[active] = np.where(gap <= 0, t[active], high[active])
            rate = dz[active] - gx * dx[active] - gy * dy[active]  # < 0
            guess = t[active] - gap / rate
            inside = (guess >= low[active]) & (guess <= high[active])
            moving = np.abs(gap) > _ROOT_TOLERANCE  # the others have converged: keep their t
            t[active] = np.where(moving, np.where(inside, guess, 0.5 * (low[active] + high[active])), t[active])
            active = active[moving]
        return t

    def ray_hits(self, origin: np.ndarray, directions: np.ndarray, max_range: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First hits of rays origin (3,) + t * directions (R, 3) (unit) with the ground within max_range.

        Returns the range (R,) (inf: no hit), what was hit (R,) (GROUND_FACE, KERB_FACE; -1 where nothing) and the
        surface's unit normal (R, 3) there (up-ish on the ground, horizontal on a kerb's face)."""
        directions = np.asarray(directions, dtype=np.float64)
        count = len(directions)
        ranges = np.full(count, np.inf)
        kind = np.full(count, GROUND_FACE)
        horizontal = np.hypot(directions[:, 0], directions[:, 1])
        closing = self.max_slope * horizontal - directions[:, 2]
        steep = np.nonzero(directions[:, 2] < -self.max_slope * horizontal * (1 + 1e-9) - 1e-12)[0]
        if len(steep):
            self._hit_steep(origin, directions, steep, max_range, ranges, kind)
        # the other rays that can meet the ground (it may rise toward them): interval by interval between the
        # kerb lines they cross, marching
        low_origin = origin[2] <= float(self.smooth(origin[0], origin[1])) + self.kerb_height  # may meet a kerb face
        is_steep = np.zeros(count, dtype=bool)
        is_steep[steep] = True
        pending = np.nonzero(((closing > 0) | low_origin) & ~is_steep)[0]
        crossings = self._kerb_crossings(origin, directions[pending])
        index = np.full(count, -1)
        index[pending] = np.arange(len(pending))
        off = np.full(count, bool(self.off_road(origin[0], origin[1])))
        start = np.zeros(count)
        for column in range(crossings.shape[1] + 1):
            if not len(pending):
                break
            stop = np.minimum(crossings[index[pending], column], max_range) if column < crossings.shape[1] else \
                np.full(len(pending), float(max_range))
            level = np.where(off[pending], self.kerb_height, 0.0)
            if column > 0:  # entering a sidewalk below its top: the ray hits the kerb's face
                p = origin + start[pending, None] * directions[pending]
                below = off[pending] & (p[:, 2] <= self.smooth(p[:, 0], p[:, 1]) + self.kerb_height)
                ranges[pending[below]] = start[pending[below]]
                kind[pending[below]] = KERB_FACE
                pending, stop, level = pending[~below], stop[~below], level[~below]
            roots = self._first_root(origin, directions[pending], level, start[pending], stop)
            hit = np.isfinite(roots)
            ranges[pending[hit]] = roots[hit]
            pending, stop = pending[~hit], stop[~hit]
            beyond = stop < max_range  # the ray crosses a kerb line before its range ends: the next interval
            pending, stop = pending[beyond], stop[beyond]
            start[pending] = stop
            off[pending] = ~off[pending]
        normals = np.zeros((count, 3))
        normals[:, 2] = 1.0
        ground = np.isfinite(ranges) & (kind == GROUND_FACE)
        p = origin + ranges[ground, None] * directions[ground]
        gx, gy = self.gradient(p[:, 0], p[:, 1])
        norm = np.sqrt(gx * gx + gy * gy + 1.0)
        normals[ground] = np.stack([-gx / norm, -gy / norm, 1.0 / norm], axis=-1)
        face = np.nonzero(np.isfinite(ranges) & (kind == KERB_FACE))[0]
        if len(face):
            p = origin + ranges[face, None] * directions[face]
            toward = self._lateral_direction(p[:, 0], p[:, 1])  # (F, 2) unit, toward increasing lateral
            facing = np.where(((toward * directions[face, :2]).sum(-1) > 0)[:, None], -toward, toward)
            normals[face, :2] = facing
            normals[face, 2] = 0.0
        kind = np.where(np.isfinite(ranges), kind, -1)
        return ranges, kind, normals

    def _hit_steep(self, origin: np.ndarray, directions: np.ndarray, rays: np.ndarray, max_range: float,
                   ranges: np.ndarray, kind: np.ndarray) -> None:
        """First hits of the steep rays `rays` (see `_steep_root`), written into ranges / kind. Such a ray is above
        the sidewalks' level before t_kerb and above the road's before t_road (t_kerb < t_road): it hits a sidewalk
        at t_kerb if it is off the road there, else a kerb's face where it first leaves the road before t_road,
        else the road at t_road."""
        d = directions[rays]
        t_road = self._steep_root(origin, d, 0.0)
        crossings = self._kerb_crossings(origin, d)
        p = origin + t_road[:, None] * d
        # a ray that stays on the road up to t_road hits it there; the others need t_kerb
        need = (crossings[:, 0] < t_road) | self.off_road(p[:, 0], p[:, 1]) | bool(self.off_road(origin[0], origin[1]))
        hit = t_road.copy()
        face = np.zeros(len(rays), dtype=bool)
        k = np.nonzero(need)[0]
        if len(k):
            _, gx, gy = self._surface(p[k, 0], p[k, 1])
            rate = d[k, 2] - gx * d[k, 0] - gy * d[k, 1]
            t_kerb = self._steep_root(origin, d[k], self.kerb_height, start=t_road[k] + self.kerb_height / rate)
            q = origin + t_kerb[:, None] * d[k]
            on_sidewalk = self.off_road(q[:, 0], q[:, 1])
            after = np.where(crossings[k] > t_kerb[:, None], crossings[k], np.inf).min(axis=1)
            face[k] = ~on_sidewalk & (after < t_road[k])
            hit[k] = np.where(on_sidewalk, t_kerb, np.where(face[k], after, t_road[k]))
        within = hit <= max_range
        ranges[rays[within]] = hit[within]
        kind[rays[within & face]] = KERB_FACE

    def _lateral_direction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Unit horizontal vectors (N, 2) along which the lateral offset grows."""
        path = self.path
        h0 = path.start_heading
        normal = np.array([-np.sin(h0), np.cos(h0)])
        if abs(path.curvature) < 1e-9:
            return np.broadcast_to(normal, (len(x), 2)).copy()
        radius = 1.0 / path.curvature
        centre = np.asarray(path.start_xy) + radius * normal
        rel = np.stack([x - centre[0], y - centre[1]], axis=-1)
        return -np.sign(radius) * rel / np.linalg.norm(rel, axis=-1, keepdims=True)

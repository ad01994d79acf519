"""A 32-beam spinning LiDAR (HDL-32E-like, as on the nuScenes car) cast against the ground and the boxes.

Rays are a fixed beams x azimuth grid in the LiDAR frame. Each box only tests the azimuth columns it spans
(its corners' angular interval), so the cost is rays-in-window x boxes, vectorised over rays. The nearest hit
wins, which is what makes near objects occlude far ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry.transforms import box_corners, invert_transform, transform_points
from .catalog import GROUND_INTENSITY
from .raycast import FACE_BACK, FACE_BOTTOM, FACE_FRONT, FACE_LEFT, FACE_RIGHT, ground_hits, nearest_hits

GROUND_REFLECTIVITY = 0.09  # asphalt (world v2)
FRONT_FACE_GAIN = 2.0  # intensity factor of returns from a box's front (+x) face
BACK_FACE_GAIN = 0.5  # and from its back face

# The physical solid sits a few centimetres inside its annotation box (annotators draw boxes around the points),
# so surface returns land inside the box despite range noise; its bottom stays on the ground.
SOLID_SIDE_INSET = 0.05  # [m] per side in length and width
SOLID_TOP_INSET = 0.05  # [m] off the top

NO_RETURN_OWNER = -2  # owner of a world-v2 ray without a return, written as a row at the sensor origin


@dataclass(frozen=True)
class LidarPattern:
    """Beam elevations and azimuth steps of the scanner; rays (B * A, 3) in the LiDAR frame, beam-major."""

    num_beams: int = 32
    min_elevation_deg: float = -30.67
    max_elevation_deg: float = 10.67
    num_azimuths: int = 1084

    def directions(self) -> np.ndarray:
        """Unit ray directions (B * A, 3) in the LiDAR frame; ray index = beam * A + azimuth column."""
        elevation = np.deg2rad(np.linspace(self.min_elevation_deg, self.max_elevation_deg, self.num_beams))
        azimuth = self.azimuths()
        ce, se = np.cos(elevation)[:, None], np.sin(elevation)[:, None]  # (B, 1)
        dirs = np.stack([ce * np.cos(azimuth)[None], ce * np.sin(azimuth)[None],
                         np.broadcast_to(se, (self.num_beams, self.num_azimuths))], axis=-1)  # (B, A, 3)
        return dirs.reshape(-1, 3)

    def azimuths(self) -> np.ndarray:
        """Azimuth (A,) of each column [rad], in [0, 2 pi)."""
        return np.arange(self.num_azimuths) * (2.0 * np.pi / self.num_azimuths)


def solid_boxes(boxes: np.ndarray) -> np.ndarray:
    """The physical solids (K, 7) inside annotation boxes (K, 7): inset sides and top, bottom unchanged."""
    solids = np.array(boxes, dtype=np.float64, copy=True)
    solids[:, 3:5] = np.maximum(solids[:, 3:5] - 2 * SOLID_SIDE_INSET, 0.05)
    solids[:, 5] = boxes[:, 5] - SOLID_TOP_INSET
    solids[:, 2] = boxes[:, 2] - SOLID_TOP_INSET / 2.0
    return solids


def _azimuth_windows(corners_lidar: np.ndarray, pattern: LidarPattern) -> tuple[np.ndarray, np.ndarray]:
    """First and last azimuth column (K,) each of K boxes with corners (K, 8, 3) in the LiDAR frame can be hit by
    (unwrapped: a column index may be negative or beyond the last; take it modulo the column count)."""
    angles = np.arctan2(corners_lidar[:, :, 1], corners_lidar[:, :, 0])  # (K, 8)
    centre = np.arctan2(corners_lidar[:, :, 1].mean(axis=1), corners_lidar[:, :, 0].mean(axis=1))  # (K,)
    relative = (angles - centre[:, None] + np.pi) % (2 * np.pi) - np.pi  # within (-pi, pi]: a box does not wrap
    step = 2 * np.pi / pattern.num_azimuths
    first = np.floor((centre + relative.min(axis=1)) / step).astype(np.int64) - 1
    last = np.ceil((centre + relative.max(axis=1)) / step).astype(np.int64) + 1
    return first, last


def _window_rays(first: np.ndarray, last: np.ndarray, pattern: LidarPattern) -> tuple[np.ndarray, np.ndarray]:
    """The (ray, box) pairs of every beam in each box's azimuth window: rays (P,) and boxes (P,), box by box."""
    widths = last - first + 1  # (K,) columns per box
    box_index = np.repeat(np.arange(len(first)), widths)  # (n,)
    starts = np.cumsum(widths) - widths
    columns = (np.arange(int(widths.sum())) - np.repeat(starts, widths) + np.repeat(first, widths)) \
        % pattern.num_azimuths
    beams = np.arange(pattern.num_beams) * pattern.num_azimuths  # (B,)
    rays = (columns[:, None] + beams[None, :]).ravel()  # every beam of each window column
    return rays, np.repeat(box_index, pattern.num_beams)


def _cast(global_from_lidar: np.ndarray, solids: np.ndarray, pattern: LidarPattern, terrain=None,
          max_range: float = np.inf) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cast every ray of the pattern against the ground and `solids` (K, 7) in the global frame.

    The ground is the plane z = 0, or `terrain` (terrain.Terrain) cast out to max_range. Returns ray directions
    (R, 3) in the LiDAR and the global frame, the nearest range (R,) (inf: no hit), the solid each ray hit (R,)
    (-1: the ground), the face it entered (R,) (raycast.FACE_*, -1 for the ground) and the ground's unit normal
    where each ray met it (R, 3).
    """
    dirs_lidar = pattern.directions()  # (R, 3)
    rotation, origin = global_from_lidar[:3, :3], global_from_lidar[:3, 3]
    dirs_global = dirs_lidar @ rotation.T
    if terrain is None:
        ranges = ground_hits(origin, dirs_global)  # (R,)
        ground_normals = np.broadcast_to(np.array([0.0, 0.0, 1.0]), dirs_global.shape)
    else:
        ranges, _, ground_normals = terrain.ray_hits(origin, dirs_global, max_range)
    owner = np.full(len(ranges), -1)
    face = np.full(len(ranges), -1)
    if len(solids):
        corners_lidar = transform_points(invert_transform(global_from_lidar),
                                         box_corners(solids).reshape(-1, 3)).reshape(-1, 8, 3)
        rays, box_index = _window_rays(*_azimuth_windows(corners_lidar, pattern), pattern)
        nearest_hits(origin, dirs_global, solids, rays, box_index, ranges, owner, face)
    return dirs_lidar, dirs_global, ranges, owner, face, ground_normals


def face_normals(face: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Outward unit normals (R, 3) in the global frame of the faces `face` (R,) (raycast.FACE_*, -1 = the
    ground) of upright boxes with yaw `yaw` (R,)."""
    c, s = np.cos(yaw), np.sin(yaw)
    normals = np.zeros((len(face), 3))
    normals[:, 2] = 1.0  # the ground and top faces
    for value, (nx, ny) in ((FACE_FRONT, (c, s)), (FACE_BACK, (-c, -s)), (FACE_LEFT, (-s, c)),
                            (FACE_RIGHT, (s, -c))):
        hit = face == value
        normals[hit] = np.stack([nx[hit], ny[hit], np.zeros(int(hit.sum()))], axis=-1)
    normals[face == FACE_BOTTOM] = (0.0, 0.0, -1.0)
    return normals


def cast_lidar_materials(global_from_lidar: np.ndarray, solids: np.ndarray, reflectivity: np.ndarray,
                         pattern: LidarPattern, max_range: float, rng: np.random.Generator,
                         range_noise: float = 0.02, dropout: float = 0.04, terrain=None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One LiDAR sweep of the world v2 in the LiDAR frame: intensity from material and incidence, not class.

    solids: (K, 7) physical boxes in the global frame (object parts, already inside their annotation boxes);
    reflectivity: (K,) diffuse reflectance of each. A return's intensity is 255 * reflectance * (0.25 + 0.75 *
    cos(incidence)) with 15% noise; a return is lost with probability `dropout`, more often on dark surfaces, at
    grazing incidence and at long range, as a real scanner loses them. Range noise grows with range. The ground is
    `terrain` (terrain.Terrain: slopes and kerbs) or, without it, the plane z = 0.

    Every ray is written, in nuScenes' layout: column by column (azimuth), each column all `num_beams` rings in
    order, so that `points.reshape(-1, num_beams, 5)[:, r, 4] == r`. A ray without a return (sky, beyond
    max_range, lost) is a row at the sensor origin with intensity 0, as nuScenes stores its invalid
    returns at a radius close to zero; `remove_close` style filters drop them.
    Returns points (A * B, 5) float32 x, y, z, intensity, ring and the solid each ray hit (A * B,) (-1: the
    ground, NO_RETURN_OWNER: no return).
    """
    dirs_lidar, dirs_global, ranges, owner, face, ground_normals = _cast(global_from_lidar, solids, pattern, terrain,
                                                                         max_range)
    keep = np.nonzero(ranges <= max_range)[0]
    hit = owner[keep]
    yaw = np.where(hit >= 0, solids[np.maximum(hit, 0), 6] if len(solids) else 0.0, 0.0)
    normals = face_normals(face[keep], yaw)
    if terrain is not None:  # the ground's own normal: on a slope or a kerb's face
        normals[hit < 0] = ground_normals[keep[hit < 0]]
    cos_incidence = np.abs((normals * dirs_global[keep]).sum(-1))
    reflect = np.where(hit >= 0, np.asarray(reflectivity, dtype=np.float64)[np.maximum(hit, 0)]
                       if len(solids) else 0.0, GROUND_REFLECTIVITY)
    loss = (dropout + 0.3 * np.exp(-reflect / 0.05) + 0.25 * (cos_incidence < 0.15)
            + 0.3 * (ranges[keep] / max_range) ** 4)
    survive = rng.uniform(size=len(keep)) >= np.clip(loss, 0.0, 0.95)
    keep, hit, cos_incidence, reflect = keep[survive], hit[survive], cos_incidence[survive], reflect[survive]
    noisy = ranges[keep] + rng.normal(0.0, 1.0, size=len(keep)) * range_noise * (1.0 + ranges[keep] / 50.0)
    intensity = 255.0 * reflect * (0.25 + 0.75 * cos_incidence) * rng.uniform(0.85, 1.15, size=len(keep))
    beams, columns = pattern.num_beams, pattern.num_azimuths
    points = np.zeros((beams * columns, 5), dtype=np.float64)  # rays column-major: row = column * B + beam
    points[:, 4] = np.tile(np.arange(beams), columns)
    rows = (keep % columns) * beams + keep // columns  # ray index beam * A + column -> row
    points[rows, :3] = dirs_lidar[keep] * noisy[:, None]
    points[rows, 3] = np.clip(intensity, 0.0, 255.0).round()
    owners = np.full(beams * columns, NO_RETURN_OWNER)
    owners[rows] = hit
    return points.astype(np.float32), owners


def cast_lidar(global_from_lidar: np.ndarray, boxes: np.ndarray, intensities: np.ndarray, pattern: LidarPattern,
               max_range: float, rng: np.random.Generator, range_noise: float = 0.01) -> np.ndarray:
    """One LiDAR sweep in the LiDAR frame.

    global_from_lidar: (4, 4) LiDAR pose at the sweep's timestamp; boxes: (K, 7) annotation boxes in the global
    frame at that timestamp (only those to be seen); intensities: (K,) mean intensity per box.
    Returns points (P, 5) float32 x, y, z, intensity, ring; rays with no hit within max_range give no point.
    """
    solids = solid_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 7))
    dirs_lidar, dirs_global, ranges, owner, face, _ = _cast(global_from_lidar, solids, pattern)
    keep = np.nonzero(ranges <= max_range)[0]  # (P,) ray ids with a return
    noisy_range = ranges[keep] + rng.normal(0.0, range_noise, size=len(keep))
    xyz = dirs_lidar[keep] * noisy_range[:, None]
    hit_owner = owner[keep]
    mean_intensity = np.where(hit_owner >= 0, np.asarray(intensities, dtype=np.float64).reshape(-1)[hit_owner]
                              if len(solids) else 0.0, GROUND_INTENSITY)
    # Front faces return brighter (plates, lamps) and back faces dimmer, so heading is not ambiguous by half a turn
    # from the points alone, as it is not for real vehicles seen by a real LiDAR.
    face_gain = np.select([face[keep] == FACE_FRONT, face[keep] == FACE_BACK], [FRONT_FACE_GAIN, BACK_FACE_GAIN], 1.0)
    intensity = np.clip(mean_intensity * face_gain * rng.uniform(0.8, 1.2, size=len(keep)), 0.0, 255.0).round()
    ring = keep // pattern.num_azimuths
    return np.concatenate([xyz, intensity[:, None], ring[:, None]], axis=1).astype(np.float32)

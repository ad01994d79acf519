"""A 32-beam spinning LiDAR (HDL-32E-like, as on the nuScenes car) cast against the ground and the boxes.

Rays are a fixed beams x azimuth grid in the LiDAR frame. Each box only tests the azimuth columns it spans
(its corners' angular interval), so the cost is rays-in-window x boxes, vectorised over rays. The nearest hit
wins, which is what makes near objects occlude far ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...geometry.transforms import box_corners, invert_transform, transform_points
from .catalog import GROUND_INTENSITY
from .raycast import FACE_BACK, FACE_FRONT, box_hits, ground_hits

FRONT_FACE_GAIN = 2.0  # intensity factor of returns from a box's front (+x) face
BACK_FACE_GAIN = 0.5  # and from its back face

# The physical solid sits a few centimetres inside its annotation box (annotators draw boxes around the points),
# so surface returns land inside the box despite range noise; its bottom stays on the ground.
SOLID_SIDE_INSET = 0.05  # [m] per side in length and width
SOLID_TOP_INSET = 0.05  # [m] off the top


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


def _azimuth_columns(corners_lidar: np.ndarray, pattern: LidarPattern) -> np.ndarray:
    """Azimuth columns (n,) a box with corners (8, 3) in the LiDAR frame can be hit by (wrapping at 2 pi)."""
    angles = np.arctan2(corners_lidar[:, 1], corners_lidar[:, 0])
    centre = np.arctan2(corners_lidar[:, 1].mean(), corners_lidar[:, 0].mean())
    relative = (angles - centre + np.pi) % (2 * np.pi) - np.pi  # (8,) within (-pi, pi]: the box does not wrap
    step = 2 * np.pi / pattern.num_azimuths
    first = int(np.floor((centre + relative.min()) / step)) - 1
    last = int(np.ceil((centre + relative.max()) / step)) + 1
    return np.arange(first, last + 1) % pattern.num_azimuths


def cast_lidar(global_from_lidar: np.ndarray, boxes: np.ndarray, intensities: np.ndarray, pattern: LidarPattern,
               max_range: float, rng: np.random.Generator, range_noise: float = 0.01) -> np.ndarray:
    """One LiDAR sweep in the LiDAR frame.

    global_from_lidar: (4, 4) LiDAR pose at the sweep's timestamp; boxes: (K, 7) annotation boxes in the global
    frame at that timestamp (only those to be seen); intensities: (K,) mean intensity per box.
    Returns points (P, 5) float32 x, y, z, intensity, ring; rays with no hit within max_range give no point.
    """
    dirs_lidar = pattern.directions()  # (R, 3)
    rotation, origin = global_from_lidar[:3, :3], global_from_lidar[:3, 3]
    dirs_global = dirs_lidar @ rotation.T
    ranges = ground_hits(origin, dirs_global)  # (R,)
    owner = np.full(len(ranges), -1)  # -1 = ground, else box index
    face = np.full(len(ranges), -1)  # the box face each ray entered (raycast.FACE_*), -1 for the ground

    solids = solid_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 7))
    if len(solids):
        corners_lidar = transform_points(invert_transform(global_from_lidar),
                                         box_corners(solids).reshape(-1, 3)).reshape(-1, 8, 3)
        beams = np.arange(pattern.num_beams)[:, None] * pattern.num_azimuths  # (B, 1)
        for k, solid in enumerate(solids):
            rays = (beams + _azimuth_columns(corners_lidar[k], pattern)[None]).ravel()  # (B * n,)
            box_range, box_face = box_hits(origin, dirs_global[rays], solid)
            nearer = box_range < ranges[rays]
            ranges[rays[nearer]] = box_range[nearer]
            owner[rays[nearer]] = k
            face[rays[nearer]] = box_face[nearer]

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

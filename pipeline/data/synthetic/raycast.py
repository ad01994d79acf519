"""Ray casting against the ground plane and upright boxes, shared by the LiDAR and the camera renderer.

All in the global frame. A ray is origin (3,) + t * direction (R, 3) with unit directions, so t is the range.
Boxes are (x, y, z, l, w, h, yaw) with z the gravity centre.
"""

from __future__ import annotations

import numpy as np

FACE_TOP, FACE_BOTTOM, FACE_FRONT, FACE_BACK, FACE_LEFT, FACE_RIGHT = range(6)


def ground_hits(origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Range (R,) at which each ray meets the plane z = 0; inf for rays that point up or along it."""
    down = directions[:, 2] < -1e-9
    ranges = np.full(len(directions), np.inf)
    ranges[down] = -origin[2] / directions[down, 2]
    return ranges


def box_hits(origin: np.ndarray, directions: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab intersection of rays (R, 3) from one origin (3,) with one box (7,).

    Returns the entry range (R,) (inf where the ray misses or the box is behind) and the entered face (R,)
    (FACE_* ids: front = the box's +x face, left = its +y face).
    """
    c, s = np.cos(box[6]), np.sin(box[6])
    offset = origin - box[:3]
    # The ray in the box frame (rotation about z only), one axis at a time: reductions over a trailing axis of
    # size 3 are slow in numpy.
    origin_local = (c * offset[0] + s * offset[1], -s * offset[0] + c * offset[1], offset[2])
    dir_local = (c * directions[:, 0] + s * directions[:, 1], -s * directions[:, 0] + c * directions[:, 1],
                 directions[:, 2])
    t_near_axes, t_far_axes = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            half = 0.5 * float(box[3 + axis])
            t_low = (-half - origin_local[axis]) / dir_local[axis]
            t_high = (half - origin_local[axis]) / dir_local[axis]
            # A ray parallel to a slab gives +-inf, or nan when it lies on the slab's plane: treat nan as a miss.
            t_near_axes.append(np.where(np.isnan(t_low), np.inf, np.minimum(t_low, t_high)))
            t_far_axes.append(np.where(np.isnan(t_high), -np.inf, np.maximum(t_low, t_high)))
    t_near = np.maximum(np.maximum(t_near_axes[0], t_near_axes[1]), t_near_axes[2])
    t_far = np.minimum(np.minimum(t_far_axes[0], t_far_axes[1]), t_far_axes[2])
    hit = (t_near <= t_far) & (t_near > 0.0)
    ranges = np.where(hit, t_near, np.inf)
    # The face entered is the slab whose entry is last, on the side the ray comes from (against its direction).
    faces = np.where(t_near_axes[0] == t_near, np.where(dir_local[0] < 0, FACE_FRONT, FACE_BACK),
                     np.where(t_near_axes[1] == t_near, np.where(dir_local[1] < 0, FACE_LEFT, FACE_RIGHT),
                              np.where(dir_local[2] < 0, FACE_TOP, FACE_BOTTOM)))
    return ranges, faces

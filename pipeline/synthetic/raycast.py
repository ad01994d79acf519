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


def slab_entry(t_near_axes: list[np.ndarray], t_far_axes: list[np.ndarray],
               dir_local: tuple | list) -> tuple[np.ndarray, np.ndarray]:
    """Entry range (inf on a miss) and entered face of rays against a box, from the per-axis slab entry / exit
    ranges (3 arrays each) and the ray directions in the box frame (3 arrays)."""
    t_near = np.maximum(np.maximum(t_near_axes[0], t_near_axes[1]), t_near_axes[2])
    t_far = np.minimum(np.minimum(t_far_axes[0], t_far_axes[1]), t_far_axes[2])
    hit = (t_near <= t_far) & (t_near > 0.0)
    ranges = np.where(hit, t_near, np.inf)
    # The face entered is the slab whose entry is last, on the side the ray comes from (against its direction).
    faces = np.where(t_near_axes[0] == t_near, np.where(dir_local[0] < 0, FACE_FRONT, FACE_BACK),
                     np.where(t_near_axes[1] == t_near, np.where(dir_local[1] < 0, FACE_LEFT, FACE_RIGHT),
                              np.where(dir_local[2] < 0, FACE_TOP, FACE_BOTTOM)))
    return ranges, faces


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
    return slab_entry(t_near_axes, t_far_axes, dir_local)


def box_hits_pairs(origin: np.ndarray, directions: np.ndarray, boxes: np.ndarray, rays: np.ndarray,
                   box_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`box_hits` of many (ray, box) pairs at once: rays (P,) index `directions` (R, 3), box_index (P,) indexes
    `boxes` (K, 7). Returns the entry range (P,) and the entered face (P,), value for value those of `box_hits`."""
    c_box, s_box = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    offset = origin[None, :] - boxes[:, :3]  # (K, 3)
    origin_box = (c_box * offset[:, 0] + s_box * offset[:, 1], -s_box * offset[:, 0] + c_box * offset[:, 1],
                  offset[:, 2])
    c, s = c_box[box_index], s_box[box_index]
    dx, dy, dz = directions[rays, 0], directions[rays, 1], directions[rays, 2]
    dir_local = (c * dx + s * dy, -s * dx + c * dy, dz)
    t_near_axes, t_far_axes = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            half = 0.5 * boxes[box_index, 3 + axis]
            origin_local = origin_box[axis][box_index]
            t_low = (-half - origin_local) / dir_local[axis]
            t_high = (half - origin_local) / dir_local[axis]
            t_near_axes.append(np.where(np.isnan(t_low), np.inf, np.minimum(t_low, t_high)))
            t_far_axes.append(np.where(np.isnan(t_high), -np.inf, np.maximum(t_low, t_high)))
    return slab_entry(t_near_axes, t_far_axes, dir_local)


PAIR_CHUNK = 1 << 20  # (ray, box) pairs cast at once: bounds the memory of `nearest_hits`
LARGE_WINDOW = 4096  # a box tested by this many rays or more is cast alone (no per-pair gathers)


def _merge(ranges: np.ndarray, owner: np.ndarray, face: np.ndarray, rays: np.ndarray, boxes: np.ndarray,
           pair_range: np.ndarray, pair_face: np.ndarray) -> None:
    """Keep each ray's strictly nearer pair, the lowest box first among equal ranges."""
    hit = np.nonzero(pair_range < ranges[rays])[0]
    if not len(hit):
        return
    order = np.lexsort((boxes[hit], pair_range[hit], rays[hit]))
    sorted_rays = rays[hit][order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_rays[1:] != sorted_rays[:-1]
    best = hit[order[first]]
    ranges[rays[best]] = pair_range[best]
    owner[rays[best]] = boxes[best]
    face[rays[best]] = pair_face[best]


def nearest_hits(origin: np.ndarray, directions: np.ndarray, boxes: np.ndarray, rays: np.ndarray,
                 box_index: np.ndarray, ranges: np.ndarray, owner: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Casts the (ray, box) pairs (rays (P,), box_index (P,) in increasing box order) and keeps, in place, each
    ray's nearest hit in `ranges` / `owner` / `face` (R,): as if the boxes were cast one after the other in box
    order, each replacing a ray's range only when strictly nearer (so the earlier box wins a tie).
    Boxes with few rays are cast together; a box with LARGE_WINDOW rays or more alone.
    Returns the range of every pair (P,) (inf: a miss)."""
    out = np.empty(len(rays))
    counts = np.bincount(box_index, minlength=len(boxes)) if len(rays) else np.zeros(len(boxes), dtype=np.int64)
    ends = np.cumsum(counts)

    def cast_together(start: int, stop: int) -> None:
        for begin in range(start, stop, PAIR_CHUNK):
            end = min(begin + PAIR_CHUNK, stop)
            pair_range, pair_face = box_hits_pairs(origin, directions, boxes, rays[begin:end], box_index[begin:end])
            out[begin:end] = pair_range
            _merge(ranges, owner, face, rays[begin:end], box_index[begin:end], pair_range, pair_face)

    batch_start = 0
    for k in np.nonzero(counts >= LARGE_WINDOW)[0]:
        start, stop = int(ends[k] - counts[k]), int(ends[k])
        cast_together(batch_start, start)
        box_range, box_face = box_hits(origin, directions[rays[start:stop]], boxes[k])
        out[start:stop] = box_range
        nearer = box_range < ranges[rays[start:stop]]
        ranges[rays[start:stop][nearer]] = box_range[nearer]
        owner[rays[start:stop][nearer]] = k
        face[rays[start:stop][nearer]] = box_face[nearer]
        batch_start = stop
    cast_together(batch_start, len(rays))
    return out

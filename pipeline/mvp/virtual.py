"""The MVP algorithm: LiDAR points and 2D instance masks -> painted real points and virtual points.

For one LiDAR sample_data and each camera (each with its own LiDAR -> camera transform, through the LiDAR's ego pose
at the LiDAR time and the camera's ego pose at the camera time):

1. project the points into the image; a point falls in pixel (floor(u), floor(v)) if it is in front of the camera;
2. the points that fall inside a mask are that mask's real points; a point takes the class one-hot and score of its
   mask (over several cameras, the element-wise maximum, as MVP);
3. each mask with at least one real point gets `num_virtual` pixels drawn from its pixels without replacement (a
   smaller mask repeats its first draw to fill the count, as MVP);
4. each drawn pixel takes the camera depth of the real point of the same mask nearest to it in the image, and is
   lifted at that depth through the pixel's centre back to the LiDAR frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.virtual_points import MVP_CLASSES, REAL_WIDTH, VIRTUAL_WIDTH, VirtualPoints
from ..errors import DataError

NUM_VIRTUAL = 50  # pixels drawn per mask (MVP's num_virtual)
_CLASS_COLUMN = {name: i for i, name in enumerate(MVP_CLASSES)}


@dataclass
class CameraMasks:
    """One image's instance masks: ids (H, W) int (0: none; mask k has id k + 1), labels (M,) one-hot + score
    (M, 11) float32."""

    ids: np.ndarray
    labels: np.ndarray


@dataclass
class CameraView:
    """A camera as the algorithm needs it: camera_from_lidar (4, 4), intrinsics (3, 3) and its masks."""

    camera_from_lidar: np.ndarray
    intrinsics: np.ndarray
    masks: CameraMasks


def label_vectors(labels: list[str], scores: list[float], source: str) -> np.ndarray:
    """(M, 11) float32 one-hot in MVP_CLASSES order and score of masks named `labels`."""
    out = np.zeros((len(labels), len(MVP_CLASSES) + 1), dtype=np.float32)
    for k, (label, score) in enumerate(zip(labels, scores)):
        if label not in _CLASS_COLUMN:
            raise DataError(f"{source}: mask {k + 1} has label {label!r}, expected one of {list(MVP_CLASSES)}; fix "
                            f"the segmenter's class names")
        out[k, _CLASS_COLUMN[label]] = 1.0
        out[k, -1] = float(score)
    return out


def read_camera_masks(png: Path, meta: Path, width: int, height: int, context: str) -> CameraMasks:
    """Read a mask pair (PNG of ids, JSON of labels and scores; docs/mvp.md). `context` names the sample_data
    and the command that makes the masks, for the one-line error of a missing file."""
    for path in (png, meta):
        if not path.is_file():
            raise DataError(f"{path}: instance masks not found {context}")
    try:
        with Image.open(png) as image:
            ids = np.asarray(image)
        record = json.loads(meta.read_text())
        instances = record["instances"]
        labels, scores = [i["label"] for i in instances], [float(i["score"]) for i in instances]
        numbers = [int(i["id"]) for i in instances]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{png} / {meta.name}: unreadable instance masks ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}); rewrite them (docs/mvp.md)") from None
    if ids.shape != (height, width):
        raise DataError(f"{png}: mask of shape {ids.shape}, expected the image's ({height}, {width}); write masks at "
                        f"the camera's full resolution")
    if numbers != list(range(1, len(numbers) + 1)):
        raise DataError(f"{meta}: instance ids {numbers[:5]}... must be 1, 2, ... in order; rewrite the file")
    if ids.size and int(ids.max()) > len(numbers):
        raise DataError(f"{png}: id {int(ids.max())} has no entry in {meta.name} ({len(numbers)} instances); "
                        f"rewrite the pair")
    return CameraMasks(ids.astype(np.int64), label_vectors(labels, scores, str(meta)))


def project(points: np.ndarray, camera_from_lidar: np.ndarray, intrinsics: np.ndarray, width: int,
            height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels (P, 2) int (column, row), camera depths (P,) and a validity mask (P,) of LiDAR points (P, >= 3)."""
    xyz = points[:, :3].astype(np.float64)
    camera = xyz @ camera_from_lidar[:3, :3].T + camera_from_lidar[:3, 3]
    depth = camera[:, 2]
    safe = np.where(depth > 1e-6, depth, 1.0)
    uv = (camera @ intrinsics.T)[:, :2] / safe[:, None]
    finite = np.isfinite(uv).all(axis=1)
    pixel = np.floor(np.where(finite[:, None], uv, -1.0)).astype(np.int64)
    valid = (depth > 1e-6) & finite & (pixel[:, 0] >= 0) & (pixel[:, 0] < width) & (pixel[:, 1] >= 0) \
        & (pixel[:, 1] < height)
    return pixel, depth, valid


def virtual_points(points: np.ndarray, cameras: list[CameraView], rng: np.random.Generator,
                   num_virtual: int = NUM_VIRTUAL) -> VirtualPoints:
    """MVP's painted and virtual points of one LiDAR sample_data (see the module doc).

    points: (P, >= 4) LiDAR points x, y, z, intensity, ... in the sample_data's own LiDAR frame.
    Returns virtual (V, 14) in the same frame, real (R, 15) (the painted points) and their row indices (R,).
    """
    painted = np.zeros((len(points), len(MVP_CLASSES) + 1), dtype=np.float32)
    is_foreground = np.zeros(len(points), dtype=bool)
    virtual = []
    for view in cameras:
        ids = view.masks.ids
        height, width = ids.shape
        pixel, depth, valid = project(points, view.camera_from_lidar, view.intrinsics, width, height)
        rows = np.nonzero(valid)[0]
        mask_of = np.zeros(len(points), dtype=np.int64)
        mask_of[rows] = ids[pixel[rows, 1], pixel[rows, 0]]
        inside = np.nonzero(mask_of > 0)[0]
        if len(inside) == 0:
            continue
        np.maximum.at(painted, inside, view.masks.labels[mask_of[inside] - 1])
        is_foreground[inside] = True
        inverse_intrinsics = np.linalg.inv(view.intrinsics)
        lidar_from_camera = np.linalg.inv(view.camera_from_lidar)
        boxes = ndimage.find_objects(ids)  # bounding slices of each id
        for mask_id in np.unique(mask_of[inside]):
            members = inside[mask_of[inside] == mask_id]  # (n,) real points of this mask
            rows_slice, cols_slice = boxes[mask_id - 1]
            mask_rows, mask_cols = np.nonzero(ids[rows_slice, cols_slice] == mask_id)  # row-major, as on the image
            mask_rows, mask_cols = mask_rows + rows_slice.start, mask_cols + cols_slice.start
            chosen = rng.permutation(len(mask_rows))[:num_virtual]
            if len(chosen) < num_virtual:
                chosen = np.concatenate([chosen, np.full(num_virtual - len(chosen), chosen[0])])
            drawn = np.stack([mask_cols[chosen], mask_rows[chosen]], axis=1)  # (num_virtual, 2) column, row
            gaps = np.linalg.norm(drawn[:, None, :].astype(np.float64) - pixel[members][None, :, :], axis=-1)
            nearest = members[np.argmin(gaps, axis=1)]  # (num_virtual,)
            centres = np.concatenate([drawn + 0.5, np.ones((num_virtual, 1))], axis=1)  # homogeneous pixel centres
            camera = (centres @ inverse_intrinsics.T) * depth[nearest][:, None]
            lidar = camera @ lidar_from_camera[:3, :3].T + lidar_from_camera[:3, 3]
            row = np.zeros((num_virtual, VIRTUAL_WIDTH), dtype=np.float32)
            row[:, :3] = lidar
            row[:, 3:] = view.masks.labels[mask_id - 1]
            virtual.append(row)
    foreground = np.nonzero(is_foreground)[0]
    real = np.zeros((len(foreground), REAL_WIDTH), dtype=np.float32)
    real[:, :4] = points[foreground, :4]
    real[:, 4:] = painted[foreground]
    return VirtualPoints(np.concatenate(virtual, axis=0) if virtual else np.zeros((0, VIRTUAL_WIDTH), np.float32),
                         real, foreground.astype(np.int64))

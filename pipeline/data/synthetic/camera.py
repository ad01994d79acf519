"""Camera images rendered by per-pixel ray casting with the rig's real calibration.

Rays are cast at 1/RENDER_SCALE resolution through the centres of RENDER_SCALE x RENDER_SCALE pixel blocks and the
result is upsampled (bilinear, centre-aligned) to 1600x900, so a low-resolution pixel's colour lands where its
ray points in the full-size image. Background: a ground plane shaded by distance with a faint 2 m grid (a depth
cue a camera model can learn from) under a pale sky. Objects are flat-shaded solids in their class colour, each
face at its own brightness (top brightest, front lighter than the sides, back darkest) so heading is visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ...geometry.transforms import box_corners, invert_transform, transform_points
from .lidar import solid_boxes
from .raycast import FACE_BACK, FACE_BOTTOM, FACE_FRONT, FACE_LEFT, FACE_RIGHT, FACE_TOP, box_hits, ground_hits
from .rig import IMAGE_HEIGHT, IMAGE_WIDTH

RENDER_SCALE = 4  # rays are cast at 400x225 and upsampled
JPEG_QUALITY = 90
GRID_SPACING = 2.0  # [m] between ground grid lines
FACE_SHADE = {FACE_TOP: 1.0, FACE_FRONT: 0.86, FACE_LEFT: 0.7, FACE_RIGHT: 0.7, FACE_BACK: 0.52, FACE_BOTTOM: 0.4}
SKY_HORIZON = np.array([196.0, 206.0, 222.0])
SKY_ZENITH = np.array([150.0, 166.0, 196.0])
HAZE = np.array([172.0, 178.0, 186.0])


def pixel_rays(intrinsics: np.ndarray) -> np.ndarray:
    """Unit ray directions (h, w, 3) in the camera frame for the low-resolution grid of a 1600x900 camera."""
    height, width = IMAGE_HEIGHT // RENDER_SCALE, IMAGE_WIDTH // RENDER_SCALE
    offset = (RENDER_SCALE - 1) / 2.0  # full-size coordinate of a block's centre pixel, relative to its corner
    u = np.arange(width) * RENDER_SCALE + offset
    v = np.arange(height) * RENDER_SCALE + offset
    uu, vv = np.meshgrid(u, v)  # (h, w)
    pixels = np.stack([uu, vv, np.ones_like(uu)], axis=-1)  # (h, w, 3)
    rays = pixels @ np.linalg.inv(intrinsics).T
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def _pixel_window(corners_camera: np.ndarray, intrinsics: np.ndarray, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    """Low-resolution (rows, cols) window that contains a box with corners (8, 3) in the camera frame."""
    height, width = shape
    in_front = corners_camera[:, 2] > 0.05
    if not in_front.any():
        return None
    if not in_front.all():  # the box straddles the image plane: test the whole image
        return slice(0, height), slice(0, width)
    uvw = corners_camera @ intrinsics.T
    uv = uvw[:, :2] / uvw[:, 2:3]
    offset = (RENDER_SCALE - 1) / 2.0
    col0 = max(int(np.floor((uv[:, 0].min() - offset) / RENDER_SCALE)), 0)
    col1 = min(int(np.ceil((uv[:, 0].max() - offset) / RENDER_SCALE)) + 1, width)
    row0 = max(int(np.floor((uv[:, 1].min() - offset) / RENDER_SCALE)), 0)
    row1 = min(int(np.ceil((uv[:, 1].max() - offset) / RENDER_SCALE)) + 1, height)
    if col0 >= col1 or row0 >= row1:
        return None
    return slice(row0, row1), slice(col0, col1)


def _background(origin: np.ndarray, dirs_global: np.ndarray, visibility_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Ground / sky colour (h, w, 3) float and ground range (h, w) (inf for sky)."""
    flat = dirs_global.reshape(-1, 3)
    ranges = ground_hits(origin, flat)
    colour = np.empty((len(flat), 3))
    ground = np.isfinite(ranges)
    # Sky: pale, barely saturated so no object class is confused with it.
    elevation = np.clip(flat[~ground, 2], 0.0, 1.0)[:, None]
    colour[~ground] = SKY_HORIZON + (SKY_ZENITH - SKY_HORIZON) * np.sqrt(elevation)
    hit = origin + flat[ground] * ranges[ground, None]  # (G, 3) ground points
    distance = np.hypot(hit[:, 0] - origin[0], hit[:, 1] - origin[1])
    brightness = 62.0 + 70.0 * np.exp(-distance / (0.8 * visibility_range))
    # Distance of the ground point to the nearest grid line in x and y [m].
    to_line = np.abs((hit[:, :2] / GRID_SPACING + 0.5) % 1.0 - 0.5) * GRID_SPACING
    line = np.exp(-((to_line.min(axis=1) / 0.09) ** 2)) * np.exp(-distance / visibility_range)
    brightness = brightness + 34.0 * line
    asphalt = brightness[:, None] * np.array([1.0, 1.0, 0.96])
    fog = (1.0 - np.exp(-distance / (2.5 * visibility_range)))[:, None]
    colour[ground] = asphalt * (1.0 - fog) + HAZE * fog
    return colour.reshape(*dirs_global.shape[:2], 3), ranges.reshape(dirs_global.shape[:2])


def render_camera(global_from_camera: np.ndarray, intrinsics: np.ndarray, rays_camera: np.ndarray,
                  boxes: np.ndarray, colours: np.ndarray, visibility_range: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one low-resolution image.

    global_from_camera: (4, 4) camera pose; intrinsics: (3, 3) of the full-size image; rays_camera: (h, w, 3)
    from `pixel_rays`; boxes: (K, 7) annotation boxes in the global frame (only those to be drawn);
    colours: (K, 3) RGB per box.
    Returns the image (h, w, 3) uint8, the visible pixel count (K,) and the pixel count each box would cover
    without occlusion by other boxes (K,).
    """
    rotation, origin = global_from_camera[:3, :3], global_from_camera[:3, 3]
    dirs_global = rays_camera @ rotation.T  # (h, w, 3)
    shape = rays_camera.shape[:2]
    image, depth = _background(origin, dirs_global, visibility_range)
    owner = np.full(shape, -1)
    face = np.zeros(shape, dtype=np.int64)
    solids = solid_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 7))
    unoccluded = np.zeros(len(solids), dtype=np.int64)
    if len(solids):
        corners_camera = transform_points(invert_transform(global_from_camera),
                                          box_corners(solids).reshape(-1, 3)).reshape(-1, 8, 3)
    for k, solid in enumerate(solids):
        window = _pixel_window(corners_camera[k], intrinsics, shape)
        if window is None:
            continue
        window_dirs = dirs_global[window]  # (hh, ww, 3)
        box_range, box_face = box_hits(origin, window_dirs.reshape(-1, 3), solid)
        box_range = box_range.reshape(window_dirs.shape[:2])
        unoccluded[k] = int(np.isfinite(box_range).sum())
        nearer = box_range < depth[window]
        depth[window] = np.where(nearer, box_range, depth[window])
        owner[window] = np.where(nearer, k, owner[window])
        face[window] = np.where(nearer, box_face.reshape(nearer.shape), face[window])
    drawn = owner >= 0
    if drawn.any():
        shade = np.vectorize(FACE_SHADE.get, otypes=[np.float64])(face[drawn])
        image[drawn] = np.asarray(colours, dtype=np.float64)[owner[drawn]] * shade[:, None]
    visible = np.bincount(owner[drawn], minlength=len(solids)) if len(solids) else np.zeros(0, dtype=np.int64)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), visible, unoccluded


def save_jpeg(image: np.ndarray, path: Path) -> None:
    """Upsample a low-resolution render (h, w, 3) to 1600x900 and write it as a JPEG."""
    full = Image.fromarray(image).resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    full.save(path, format="JPEG", quality=JPEG_QUALITY)

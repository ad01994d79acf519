"""Camera images rendered by per-pixel ray casting with the rig's real calibration.

Rays are cast at 1/RENDER_SCALE resolution through the centres of RENDER_SCALE x RENDER_SCALE pixel blocks and the
result is upsampled (bilinear, centre-aligned) to 1600x900, so a low-resolution pixel's colour lands where its
ray points in the full-size image. Background: a ground plane shaded by distance with a faint 2 m grid (a depth
cue a camera model can learn from) under a pale sky. Objects are flat-shaded solids in their class colour, each
face at its own brightness (top brightest, front lighter than the sides, back darkest) so heading is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..geometry.transforms import box_corners, invert_transform, transform_points
from .ego_path import EgoPath
from .layout import LANE, SIDEWALK_WIDTH
from .lidar import face_normals, solid_boxes
from .raycast import FACE_BACK, FACE_BOTTOM, FACE_FRONT, FACE_LEFT, FACE_RIGHT, FACE_TOP, ground_hits, nearest_hits
from .rig import IMAGE_HEIGHT, IMAGE_WIDTH
from .terrain import KERB_FACE
from .world import Scene

RENDER_SCALE = 4  # rays are cast at 400x225 and upsampled
JPEG_QUALITY = 90
GRID_SPACING = 2.0  # [m] between ground grid lines
FACE_SHADE = {FACE_TOP: 1.0, FACE_FRONT: 0.86, FACE_LEFT: 0.7, FACE_RIGHT: 0.7, FACE_BACK: 0.52, FACE_BOTTOM: 0.4}
SKY_HORIZON = np.array([196.0, 206.0, 222.0])
SKY_ZENITH = np.array([150.0, 166.0, 196.0])
HAZE = np.array([172.0, 178.0, 186.0])
TERRAIN_HORIZON = 300.0  # [m] how far a camera ray is followed over terrain before it counts as sky


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


_PAIRS = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)])  # every pair of a box's 8 corners
NEAR_PLANE = 0.05  # [m] in front of a camera; no object comes this close to one


def _window_pixels(corners_camera: np.ndarray, intrinsics: np.ndarray,
                   shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The low-resolution pixels each box with corners (K, 8, 3) in the camera frame can cover: the bounding window
    of its part in front of the near plane (its corners there, and where its edges cross the plane). Returns the
    (pixel, box) pairs: flat pixel indices (P,) and boxes (P,), box by box."""
    height, width = shape
    z = corners_camera[:, :, 2]
    in_front = z > NEAR_PLANE  # (K, 8)
    a, b = corners_camera[:, _PAIRS[:, 0]], corners_camera[:, _PAIRS[:, 1]]  # (K, 28, 3)
    crosses = in_front[:, _PAIRS[:, 0]] != in_front[:, _PAIRS[:, 1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(crosses, (NEAR_PLANE - a[..., 2]) / (b[..., 2] - a[..., 2]), 0.0)
    points = np.concatenate([corners_camera, a + fraction[..., None] * (b - a)], axis=1)  # (K, 36, 3)
    valid = np.concatenate([in_front, crosses], axis=1)
    uvw = points @ intrinsics.T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = uvw[:, :, :2] / uvw[:, :, 2:3]
    offset = (RENDER_SCALE - 1) / 2.0
    low = np.where(valid[..., None], uv, np.inf).min(axis=1)  # (K, 2)
    high = np.where(valid[..., None], uv, -np.inf).max(axis=1)
    seen = in_front.any(axis=1)
    low, high = np.where(seen[:, None], low, 0.0), np.where(seen[:, None], high, 0.0)
    col0 = np.maximum(np.floor((low[:, 0] - offset) / RENDER_SCALE), 0).astype(np.int64)
    col1 = np.minimum(np.ceil((high[:, 0] - offset) / RENDER_SCALE) + 1, width).astype(np.int64)
    row0 = np.maximum(np.floor((low[:, 1] - offset) / RENDER_SCALE), 0).astype(np.int64)
    row1 = np.minimum(np.ceil((high[:, 1] - offset) / RENDER_SCALE) + 1, height).astype(np.int64)
    empty = ~seen | (col0 >= col1) | (row0 >= row1)
    rows_n = np.where(empty, 0, row1 - row0)
    cols_n = np.where(empty, 0, col1 - col0)
    counts = rows_n * cols_n  # (K,) pixels per window
    box_index = np.repeat(np.arange(len(counts)), counts)
    local = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)  # index within its window
    cols_each = np.repeat(np.maximum(cols_n, 1), counts)
    row_in, col_in = np.divmod(local, cols_each)
    pixels = (np.repeat(row0, counts) + row_in) * width + np.repeat(col0, counts) + col_in
    return pixels, box_index


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


@dataclass(frozen=True)
class GroundStyle:
    """World v2 lighting and street surface of one scene: the ego path (for lane markings), the sun direction
    (3,), the exposure, the asphalt grey and a noise seed."""

    path: EgoPath
    sun: np.ndarray
    exposure: float
    asphalt: float
    seed: int
    terrain: object = None  # terrain.Terrain of the scene (slopes, kerbs), None: the plane z = 0

    @classmethod
    def for_scene(cls, scene: Scene, seed: int) -> "GroundStyle":
        rng = np.random.default_rng([seed, scene.index, 77])
        return cls(scene.path, np.asarray(scene.sun[:3]), float(scene.sun[3]), float(rng.uniform(62.0, 96.0)),
                   int(rng.integers(1 << 30)), scene.terrain)

    def shade(self, normals: np.ndarray) -> np.ndarray:
        """Lambert factor (N,) of surfaces with unit normals (N, 3): ambient sky light plus direct sun."""
        return self.exposure * (0.45 + 0.55 * np.clip(normals @ self.sun, 0.0, None))


def value_noise(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth deterministic noise in [-1, 1] over the plane, with features of about `scale` metres."""
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)

    def corner(dx: float, dy: float) -> np.ndarray:
        h = np.sin((ix + dx) * 127.1 + (iy + dy) * 311.7 + seed * 0.001) * 43758.5453
        return 2.0 * (h - np.floor(h)) - 1.0

    top = corner(0, 0) * (1 - fx) + corner(1, 0) * fx
    bottom = corner(0, 1) * (1 - fx) + corner(1, 1) * fx
    return top * (1 - fy) + bottom * fy


def street_coordinates(path: EgoPath, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lateral offset from the ego lane's centre line, positive to the left; arc length along it) of points
    (N, 2), for the constant-curvature path."""
    h0 = path.start_heading
    tangent, normal = np.array([np.cos(h0), np.sin(h0)]), np.array([-np.sin(h0), np.cos(h0)])
    offset = xy - np.asarray(path.start_xy)
    if abs(path.curvature) < 1e-9:
        return offset @ normal, offset @ tangent
    radius = 1.0 / path.curvature  # signed: the centre is on the left for a left turn
    centre = np.asarray(path.start_xy) + radius * normal
    to_point = xy - centre
    lateral = np.sign(radius) * (abs(radius) - np.linalg.norm(to_point, axis=-1))
    angle = np.arctan2(to_point @ tangent, -(to_point @ normal) * np.sign(radius))
    return lateral, angle * abs(radius)


def _street_background(origin: np.ndarray, dirs_global: np.ndarray, visibility_range: float,
                       style: GroundStyle) -> tuple[np.ndarray, np.ndarray]:
    """World v2 ground and sky: textured asphalt with lane markings, sidewalks, sun shading and haze."""
    flat = dirs_global.reshape(-1, 3)
    if style.terrain is None:
        ranges = ground_hits(origin, flat)
        kerb_face = np.zeros(len(flat), dtype=bool)
        normals = None
    else:  # the ground at its height out to TERRAIN_HORIZON; a ray that meets none by then sees the sky
        ranges, kind, normals = style.terrain.ray_hits(origin, flat, TERRAIN_HORIZON)
        kerb_face = kind == KERB_FACE
    colour = np.empty((len(flat), 3))
    ground = np.isfinite(ranges)
    elevation = np.clip(flat[~ground, 2], 0.0, 1.0)[:, None]
    colour[~ground] = (SKY_HORIZON + (SKY_ZENITH - SKY_HORIZON) * np.sqrt(elevation)) * min(style.exposure, 1.1)
    hit = origin + flat[ground] * ranges[ground, None]
    distance = np.hypot(hit[:, 0] - origin[0], hit[:, 1] - origin[1])
    lateral, along = street_coordinates(style.path, hit[:, :2])
    grain = 0.07 * value_noise(hit[:, 0], hit[:, 1], 0.6, style.seed) + 0.05 * value_noise(
        hit[:, 0], hit[:, 1], 4.0, style.seed + 1)
    grey = style.asphalt * (1.0 + grain)
    kerb_right, kerb_left = -(LANE / 2 + 2.6), LANE * 1.5 + 2.6
    sidewalk = (lateral < kerb_right) | (lateral > kerb_left)
    grey = np.where(sidewalk, grey + 55.0 + 10.0 * value_noise(hit[:, 0], hit[:, 1], 1.5, style.seed + 2), grey)
    beyond = (lateral < kerb_right - SIDEWALK_WIDTH) | (lateral > kerb_left + SIDEWALK_WIDTH)
    grey = np.where(beyond, style.asphalt * 0.8 + 25.0 * value_noise(hit[:, 0], hit[:, 1], 3.0, style.seed + 3),
                    grey)

    def line(centre: float, half_width: float = 0.07) -> np.ndarray:
        return np.abs(lateral - centre) < half_width

    dashes = ((along % 9.0) < 3.0) & line(LANE / 2)
    marking = line(-LANE / 2) | line(LANE * 1.5) | dashes
    grey = np.where(marking & ~sidewalk, 205.0 + 10 * grain, grey)
    if normals is None:
        grey = np.where(line(kerb_right, 0.1) | line(kerb_left, 0.1), grey * 0.6, grey)  # kerb shadow line
        brightness = grey * style.shade(np.tile([0.0, 0.0, 1.0], (len(grey), 1)))
    else:  # the kerbs have height: their faces are concrete, lit by the sun as any surface
        grey = np.where(kerb_face[ground], style.asphalt + 70.0 + 6.0 * grain, grey)
        brightness = grey * style.shade(normals[ground])
    tint = np.where(sidewalk[:, None], np.array([1.0, 0.99, 0.95]), np.array([1.0, 1.0, 1.02]))
    fog = (1.0 - np.exp(-distance / (1.2 * visibility_range)))[:, None]
    colour[ground] = brightness[:, None] * tint * (1.0 - fog) + HAZE * fog
    return colour.reshape(*dirs_global.shape[:2], 3), ranges.reshape(dirs_global.shape[:2])


def render_camera(global_from_camera: np.ndarray, intrinsics: np.ndarray, rays_camera: np.ndarray,
                  boxes: np.ndarray, colours: np.ndarray, visibility_range: float, owners: np.ndarray | None = None,
                  num_owners: int | None = None, style: GroundStyle | None = None,
                  owner_out: np.ndarray | None = None, silhouette_out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one low-resolution image.

    global_from_camera: (4, 4) camera pose; intrinsics: (3, 3) of the full-size image; rays_camera: (h, w, 3)
    from `pixel_rays`; boxes: (K, 7) annotation boxes in the global frame (only those to be drawn);
    colours: (K, 3) RGB per box. World v2 (`style` given): boxes are object parts, `owners` (K,) the object slot
    of each (of `num_owners`), shaded by the sun over a textured street.
    Returns the image (h, w, 3) uint8, the visible pixel count and the pixel count each box (each owner) would
    cover without occlusion by other boxes. `owner_out` (h, w) int, when given, receives the box (the owner) that
    is nearest at each pixel, -1 where the ground or the sky is; `silhouette_out` (num_owners,), when given with
    `owners`, the pixels each owner would cover without other owners (the union of its parts, so an object does not
    hide itself).
    """
    rotation, origin = global_from_camera[:3, :3], global_from_camera[:3, 3]
    dirs_global = rays_camera @ rotation.T  # (h, w, 3)
    shape = rays_camera.shape[:2]
    if style is None:
        image, depth = _background(origin, dirs_global, visibility_range)
    else:
        image, depth = _street_background(origin, dirs_global, visibility_range, style)
    solids = solid_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 7)) if style is None else \
        np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    flat_depth = depth.reshape(-1)  # a view: the nearest hit so far per pixel
    owner = np.full(flat_depth.shape, -1)
    face = np.zeros(flat_depth.shape, dtype=np.int64)
    unoccluded = np.zeros(len(solids), dtype=np.int64)
    if len(solids):
        corners_camera = transform_points(invert_transform(global_from_camera),
                                          box_corners(solids).reshape(-1, 3)).reshape(-1, 8, 3)
        pixels, box_index = _window_pixels(corners_camera, intrinsics, shape)
        pair_range = nearest_hits(origin, dirs_global.reshape(-1, 3), solids, pixels, box_index, flat_depth, owner,
                                  face)
        covers = np.isfinite(pair_range)
        unoccluded = np.bincount(box_index[covers], minlength=len(solids)).astype(np.int64)
        if silhouette_out is not None:  # pixels an owner's parts cover, each pixel once per owner
            silhouette_out[...] = 0
            keys = np.unique(np.asarray(owners)[box_index[covers]] * flat_depth.size + pixels[covers])
            if len(keys):
                silhouette_out += np.bincount(keys // flat_depth.size, minlength=len(silhouette_out))[
                    :len(silhouette_out)].astype(silhouette_out.dtype)
    owner, face, depth = owner.reshape(shape), face.reshape(shape), flat_depth.reshape(shape)
    drawn = owner >= 0
    if drawn.any() and style is None:
        shade = np.vectorize(FACE_SHADE.get, otypes=[np.float64])(face[drawn])
        image[drawn] = np.asarray(colours, dtype=np.float64)[owner[drawn]] * shade[:, None]
    elif drawn.any():
        normals = face_normals(face[drawn], solids[owner[drawn], 6])
        distance = depth[drawn][:, None]
        fog = 1.0 - np.exp(-distance / (1.2 * visibility_range))
        lit = np.asarray(colours, dtype=np.float64)[owner[drawn]] * style.shade(normals)[:, None]
        image[drawn] = lit * (1.0 - fog) + HAZE * fog
    visible = np.bincount(owner[drawn], minlength=len(solids)) if len(solids) else np.zeros(0, dtype=np.int64)
    if silhouette_out is not None and not len(solids):
        silhouette_out[...] = 0
    if owner_out is not None:
        owner_out[...] = np.where(drawn, np.asarray(owners)[np.maximum(owner, 0)], -1) if owners is not None \
            and len(solids) else owner
    if owners is not None:  # parts -> objects
        count = int(num_owners if num_owners is not None else (owners.max() + 1 if len(owners) else 0))
        visible = np.bincount(owners, weights=visible, minlength=count).astype(np.int64) if len(owners) else \
            np.zeros(count, dtype=np.int64)
        unoccluded = np.bincount(owners, weights=unoccluded, minlength=count).astype(np.int64) if len(owners) \
            else np.zeros(count, dtype=np.int64)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), visible, unoccluded


def save_jpeg(image: np.ndarray, path: Path) -> None:
    """Upsample a low-resolution render (h, w, 3) to 1600x900 and write it as a JPEG."""
    full = Image.fromarray(image).resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    full.save(path, format="JPEG", quality=JPEG_QUALITY)

"""Reading a nuScenes-format dataroot: up-front checks, splits, LiDAR key frame + sweeps, camera images.

Every problem a user can fix (a missing folder, table, split, sensor file, or a malformed file) is raised as a
one-line `DataError` before the devkit gets a chance to fail with a raw traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError
from .config import DataConfig

if TYPE_CHECKING:
    from .digest import InputDigests

# The 13 tables `nuscenes.NuScenes` loads from <dataroot>/<version>/.
TABLE_NAMES: tuple[str, ...] = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log", "scene",
    "sample", "sample_data", "sample_annotation", "map",
)
# Which version suffix each predefined devkit split belongs to (the detection eval asserts the same).
PREDEFINED_SPLIT_VERSION = {
    "train": "trainval", "val": "trainval", "train_detect": "trainval", "train_track": "trainval",
    "mini_train": "mini", "mini_val": "mini", "test": "test",
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_PIXEL_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)[:, None, None]  # (3, 1, 1)
_PIXEL_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)[:, None, None]  # (3, 1, 1)


# ----------------------------------------------------------------------------------------------- dataroot, splits
def check_dataroot(dataroot: str | Path, version: str) -> Path:
    """Check the dataroot, the version folder and the 13 table files exist; returns the table folder.

    Every missing table is named in the one `DataError` line; the tables are not parsed here (`check_tables`).
    """
    root = Path(dataroot)
    if not root.is_dir():
        raise DataError(f"{root}: dataroot not found; pass the folder that holds {version}/, samples/ and sweeps/ "
                        f"(or create one with `distillbev make-synthetic --out DIR`)")
    table_root = root / version
    if not table_root.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v1.0"))
        raise DataError(f"{table_root}: version folder not found (versions in the dataroot: {found or 'none'}); "
                        f"pass --version with one of them")
    problems = check_tables(table_root, parse=False)
    if problems:
        raise DataError("; ".join(problems))
    return table_root


def check_tables(table_root: str | Path, parse: bool = True) -> list[str]:
    """One problem line per missing table file and, with `parse`, per table that is not a JSON list.

    Each of the 13 tables is checked on its own (json.load, then dropped), so every broken table is named with
    its full path and the parser's position, not only the first one the devkit trips over.
    """
    table_root = Path(table_root)
    problems = []
    for table in TABLE_NAMES:
        path = table_root / f"{table}.json"
        if not path.is_file():
            problems.append(f"{path}: table file missing; a nuScenes dataroot needs all 13 tables "
                            f"({', '.join(TABLE_NAMES)}); re-extract or regenerate the metadata")
        elif parse:
            problem = _table_json_problem(path)
            if problem:
                problems.append(problem)
    return problems


def _table_json_problem(path: Path) -> str | None:
    """The problem line of one table file that does not parse as a JSON list, else None."""
    try:
        with path.open(encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{path}: not valid JSON ({exc}); re-extract or regenerate this table"
    if not isinstance(records, list):
        return (f"{path}: expected a JSON list of records, found {type(records).__name__}; re-extract or "
                f"regenerate this table")
    return None


def load_nuscenes(dataroot: str | Path, version: str):
    """`nuscenes.NuScenes` after `check_dataroot`; broken tables become one `DataError` naming each of them."""
    from nuscenes import NuScenes

    table_root = check_dataroot(dataroot, version)
    try:
        return NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # The devkit stops at the first broken table; parse each one to name all of them.
        problems = check_tables(table_root) or [f"{table_root}: a table is not valid JSON ({exc}); re-extract or "
                                                f"regenerate it"]
        raise DataError("; ".join(problems)) from exc
    except (AssertionError, KeyError, IndexError, FileNotFoundError, TypeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{table_root}: the devkit could not load the tables ({type(exc).__name__}: {message}); "
                        f"check the map table/PNG and the token links") from exc


def _custom_splits(nusc) -> dict:
    path = Path(nusc.dataroot) / nusc.version / "splits.json"
    if not path.is_file():
        return {}
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected {{split name: [scene names]}}") from exc
    if not isinstance(splits, dict):
        raise DataError(f"{path}: expected a mapping {{split name: [scene names]}}, found {type(splits).__name__}")
    return splits


def available_splits(nusc) -> list[str]:
    """Custom split names from splits.json plus predefined names whose scenes exist in this dataroot/version."""
    from nuscenes.utils.splits import create_splits_scenes

    present = {scene["name"] for scene in nusc.scene}
    names = list(_custom_splits(nusc))
    for name, scenes in create_splits_scenes().items():
        if nusc.version.endswith(PREDEFINED_SPLIT_VERSION.get(name, "")) and present.intersection(scenes):
            names.append(name)
    return names


def split_scene_names(nusc, split: str) -> list[str]:
    """Scene names of `split`: the devkit's hard-coded lists for predefined names, else <version>/splits.json."""
    from nuscenes.utils.splits import create_splits_scenes

    predefined = create_splits_scenes()
    splits_path = Path(nusc.dataroot) / nusc.version / "splits.json"
    present = {scene["name"] for scene in nusc.scene}
    if split in predefined:
        suffix = PREDEFINED_SPLIT_VERSION[split]
        if not nusc.version.endswith(suffix):
            raise DataError(f"split {split!r} is a predefined devkit split that needs a version ending in "
                            f"'{suffix}', found {nusc.version!r}; use a custom split name from {splits_path} "
                            f"(available: {available_splits(nusc)})")
        names = [name for name in predefined[split] if name in present]
    else:
        custom = _custom_splits(nusc)
        if split not in custom:
            raise DataError(f"unknown split {split!r} for {Path(nusc.dataroot) / nusc.version}; available: "
                            f"{available_splits(nusc)} (custom splits live in {splits_path})")
        names = custom[split]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{splits_path}: split {split!r} must be a list of scene names, found {names!r}")
        unknown = [name for name in names if name not in present]
        if unknown:
            raise DataError(f"{splits_path}: split {split!r} names scenes not in the scene table, e.g. "
                            f"{unknown[0]!r}; list scene names (not tokens) that exist")
    if not names:
        raise DataError(f"split {split!r} has no scenes in {Path(nusc.dataroot) / nusc.version}; "
                        f"available: {available_splits(nusc)}")
    return names


def split_sample_tokens(nusc, split: str) -> list[str]:
    """Sample tokens of `split`, ordered by the split's scene order, then by time."""
    scene_order = {name: i for i, name in enumerate(split_scene_names(nusc, split))}
    scene_names = {scene["token"]: scene["name"] for scene in nusc.scene}
    keyed = [(scene_order[scene_names[s["scene_token"]]], s["timestamp"], s["token"])
             for s in nusc.sample if scene_names[s["scene_token"]] in scene_order]
    return [token for _, _, token in sorted(keyed)]


# ------------------------------------------------------------------------------------------------------ LiDAR
def read_points(path: str | Path, sample_token: str, digests: InputDigests | None = None) -> np.ndarray:
    """A nuScenes .pcd.bin -> (P, 5) float32 x, y, z, intensity, ring (sensor frame).

    digests: records the SHA-256 of the bytes read (hashed from the array they were read into, no second read).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LiDAR file of sample {sample_token} not found; check that samples/ and sweeps/ "
                        f"were extracted into the dataroot")
    size = path.stat().st_size
    if size % 20 != 0:
        raise DataError(f"{path}: {size} bytes is not a multiple of 20 (5 float32 x, y, z, intensity, ring per "
                        f"point) in sample {sample_token}; the file is truncated or not a .pcd.bin, re-extract it")
    points = np.empty(size // 4, dtype=np.float32)
    with open(path, "rb") as handle:
        read = handle.readinto(points)
        extra = handle.read(1)
    if read != size or extra:
        raise DataError(f"{path}: the LiDAR file of sample {sample_token} changed size while it was read ({size} "
                        f"bytes when opened); rerun once nothing writes into the dataroot")
    if digests is not None:
        digests.add(path, points)
    return points.reshape(-1, 5)  # (P, 5)


# [m] half side of the square around the sensor whose rows are not returns from the scene: the devkit's
# LidarPointCloud.remove_close(1.0) and mmdet3d's remove_close (radius 1.0) drop rows with |x| < 1 and |y| < 1.
NEAR_SENSOR_BOX = 1.0


def near_sensor(points: np.ndarray) -> np.ndarray:
    """(P,) True for the rows of a .pcd.bin cloud (P, >= 2), sensor frame, inside the devkit's near-sensor box.

    A nuScenes LIDAR_TOP file holds every ray (32 rings x about 1,084 firing columns). Rows in the box are not the
    scene: a ray without a return is written as the sensor's own position when it fired, moved like every row to
    the sweep's end time (within speed x 50 ms of the origin: 0.45 m at 9 m/s, outside the box only above 20 m/s),
    and the lower rings see the car's roof 0.4-1.2 m from the sensor. The synthetic world writes rays without a
    return at the origin exactly and has no car body.
    """
    return (np.abs(points[:, 0]) < NEAR_SENSOR_BOX) & (np.abs(points[:, 1]) < NEAR_SENSOR_BOX)


def lidar_returns(points: np.ndarray) -> np.ndarray:
    """(P,) True for the rows of a .pcd.bin cloud (P, >= 2) that are returns from the scene: outside the devkit's
    near-sensor box (`near_sensor`), the rows the devkit's remove_close(1.0) keeps."""
    return ~near_sensor(points)


def lidar_records(nusc, sample_token: str, num_sweeps: int, sweep_candidates: int,
                  rng: np.random.Generator | None) -> list[dict]:
    """LIDAR_TOP sample_data records a key frame's point cloud is built from: [key frame, sweep, ...].

    Sweeps follow sample_data `prev` from the key frame, nearest first, up to `sweep_candidates`; with `rng`
    `num_sweeps` of them are drawn at random (kept in nearest-first order), without it the nearest `num_sweeps`.
    """
    sample = nusc.get("sample", sample_token)
    key = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    candidates = []
    record = key
    while record["prev"] and len(candidates) < sweep_candidates:
        record = nusc.get("sample_data", record["prev"])
        candidates.append(record)
    if rng is not None and len(candidates) > num_sweeps:
        chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), num_sweeps, replace=False))]
    else:
        chosen = candidates[:num_sweeps]
    return [key, *chosen]


def crop_points(points: np.ndarray, point_cloud_range: tuple[float, ...]) -> np.ndarray:
    """Keep points with min <= coordinate < max for x, y, z."""
    x_min, y_min, z_min, x_max, y_max, z_max = point_cloud_range
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    # Column-wise comparisons: several times faster than a broadcast over (P, 3) for 300k points.
    keep = (x >= x_min) & (x < x_max) & (y >= y_min) & (y < y_max) & (z >= z_min) & (z < z_max)
    return points[keep]


# ----------------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageAugmentation:
    """Resize to `resize_dims` (W, H), crop at `crop` (x0, y0) to `final_size` (H, W), flip, rotate (degrees CCW)."""

    source_size: tuple[int, int]  # (W, H) of the original image
    resize_dims: tuple[int, int]
    crop: tuple[int, int]
    final_size: tuple[int, int]
    flip: bool = False
    rotation: float = 0.0

    def matrix(self) -> np.ndarray:
        """(3, 3) map from original pixel coordinates to augmented pixel coordinates (pixel-edge convention)."""
        width, height = self.source_size
        final_h, final_w = self.final_size
        m = np.diag([self.resize_dims[0] / width, self.resize_dims[1] / height, 1.0])
        m = np.array([[1.0, 0, -self.crop[0]], [0, 1.0, -self.crop[1]], [0, 0, 1.0]]) @ m
        if self.flip:
            m = np.array([[-1.0, 0, final_w], [0, 1.0, 0], [0, 0, 1.0]]) @ m
        if self.rotation != 0.0:
            # Counter-clockwise on screen (y down) about the image centre, as PIL's Image.rotate.
            a = np.deg2rad(self.rotation)
            c = np.array([final_w / 2.0, final_h / 2.0])
            rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
            step = np.eye(3)
            step[:2, :2] = rot
            step[:2, 2] = c - rot @ c
            m = step @ m
        return m


def sample_image_augmentation(config: DataConfig, source_size: tuple[int, int],
                              rng: np.random.Generator | None) -> ImageAugmentation:
    """BEVDet's recipe: a random scale/crop/flip/rotation with `rng`, else the deterministic centre-bottom crop."""
    width, height = source_size
    final_h, final_w = config.final_size
    resize = max(final_w / width, final_h / height)
    if rng is not None:
        resize += float(rng.uniform(*config.resize_lim))
    new_w, new_h = int(width * resize), int(height * resize)
    if rng is None:
        crop_y = int((1 - float(np.mean(config.crop_h_lim))) * new_h) - final_h
        crop_x = int(max(0, new_w - final_w) / 2)
        return ImageAugmentation((width, height), (new_w, new_h), (crop_x, crop_y), (final_h, final_w))
    crop_y = int((1 - float(rng.uniform(*config.crop_h_lim))) * new_h) - final_h
    crop_x = int(rng.uniform(0, max(0, new_w - final_w)))
    flip = bool(rng.uniform() < 0.5) if config.image_flip else False
    rotation = float(rng.uniform(*config.rot_lim))
    return ImageAugmentation((width, height), (new_w, new_h), (crop_x, crop_y), (final_h, final_w), flip, rotation)


def open_image(path: str | Path, sample_token: str):
    """Open an image lazily (header only) so its size is known before decoding."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: camera image of sample {sample_token} not found; check that samples/ was "
                        f"extracted into the dataroot")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image in sample {sample_token} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}); re-extract or regenerate the file") from exc


def decode_image(image, augmentation: ImageAugmentation, path: str | Path, sample_token: str) -> np.ndarray:
    """Decode (at a reduced JPEG scale where exact), augment and normalise -> (3, H, W) float32."""
    from PIL import Image

    width, height = augmentation.source_size
    new_w, new_h = augmentation.resize_dims
    # JPEG decoding at 1/2, 1/4 or 1/8 scale is much cheaper; only used when it divides the size exactly, so the
    # resize below still maps the full image extent onto itself.
    scale = 1
    for candidate in (8, 4, 2):
        if width % candidate == 0 and height % candidate == 0 and width // candidate >= new_w \
                and height // candidate >= new_h:
            scale = candidate
            break
    final_h, final_w = augmentation.final_size
    try:
        if image.size != (width, height):
            raise DataError(f"{path}: image is {image.size[0]}x{image.size[1]} in sample {sample_token}, expected "
                            f"{width}x{height} like the other frames of this camera")
        if scale > 1:
            image.draft("RGB", (width // scale, height // scale))
        image = image.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
        x0, y0 = augmentation.crop
        image = image.crop((x0, y0, x0 + final_w, y0 + final_h))
        if augmentation.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if augmentation.rotation != 0.0:
            image = image.rotate(augmentation.rotation, resample=Image.BILINEAR)
        pixels = np.asarray(image).transpose(2, 0, 1).astype(np.float32)  # (3, H, W) in 0..255
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image in sample {sample_token} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}); re-extract or regenerate the file") from exc
    # (x / 255 - mean) / std as one in-place multiply-add (half the time of the plain expression).
    pixels *= _PIXEL_SCALE
    pixels += _PIXEL_OFFSET
    return pixels  # (3, H, W)

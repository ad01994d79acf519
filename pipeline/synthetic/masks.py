"""World 2: per-camera 2D instance masks as an instance segmenter would produce them, not as an oracle.

MVP lifts the pixels of 2D instance masks (CenterNet2 trained on nuImages) to 3D. The renderer knows, per
low-resolution pixel, which object is nearest; `MaskErrorModel` turns that truth into a segmenter's output:

- **misses** that grow with distance, with the hidden fraction of the object in that camera and with small pixel
  size (an object under `min_pixels` visible pixels is never found);
- **false masks** on unannotated clutter and objects of other categories (a pole taken for a pedestrian), and
  blobs on the background;
- **class confusions** between similar classes (a truck called a car, a bicycle a motorcycle);
- **boundaries** eroded or dilated, shifted, with ragged edges;
- a **confidence score** that falls with the same difficulty that causes misses.

A mask's class is the model's (possibly confused) prediction; nothing else about the object reaches the mask files.

Files, per key-frame camera image `samples/CAM_X/<stem>.jpg`:
    masks/CAM_X/<stem>.png    8-bit instance ids at 1600x900 (0: no instance; ids 1..255)
    masks/CAM_X/<stem>.json   {"image", "width", "height", "instances": [{"id", "label", "score"}]}
    masks_truth/CAM_X/<stem>.json   what the error model did, for `mask_rates` (true instances and their match,
                                    the source of every mask); no consumer of masks reads it
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.classes import DETECTION_CLASSES
from ..data.masks import TRUTH_FOLDER, mask_paths
from .camera import RENDER_SCALE
from .rig import IMAGE_HEIGHT, IMAGE_WIDTH

MAX_INSTANCES = 255  # ids of an 8-bit PNG
MATCH_IOU = 0.5  # a mask matches a true instance at this IoU or more
DISTANCE_BANDS = ((0.0, 15.0), (15.0, 30.0), (30.0, 45.0), (45.0, float("inf")))
_MASK_STREAM = 9  # random stream of the masks, apart from the sensors' streams


@dataclass(frozen=True)
class MaskErrorModel:
    """How far the written masks are from the truth. Pixel sizes are in full-size (1600x900) pixels.

    An object visible in a camera is found with probability (1 - base)(1 - far)(1 - hidden)(1 - small), where
    far = miss_far * clip((d - near_distance) / (far_distance - near_distance), 0, 1) for its ego distance d,
    hidden = miss_occluded * (1 - its visible fraction in that camera), small = miss_small * clip(log(small_pixels /
    p) / log(small_pixels / min_pixels), 0, 1) for its visible pixels p; below min_pixels it is never found.
    """

    miss_base: float = 0.03
    miss_far: float = 0.5  # extra miss probability reached at far_distance
    near_distance: float = 20.0  # [m] the distance term starts here
    far_distance: float = 70.0  # [m] and is full here
    miss_occluded: float = 0.5  # extra miss probability of a fully hidden object, linear in its hidden fraction
    min_pixels: int = 64  # visible pixels below which an object is never found (an 8x8 patch)
    small_pixels: int = 2500  # objects smaller than this (a 50x50 patch) are harder to find
    miss_small: float = 0.5  # extra miss probability at min_pixels, falling to 0 at small_pixels (log scale)
    confusion: float = 0.08  # probability that a found object takes another class of its group in `similar`
    similar: tuple[tuple[str, ...], ...] = (("car", "truck", "bus", "trailer", "construction_vehicle"),
                                            ("bicycle", "motorcycle"), ("traffic_cone", "barrier"))
    false_per_clutter: float = 0.04  # probability that a visible clutter object (>= min_pixels) gets a mask
    clutter_classes: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("pole", ("pedestrian", "traffic_cone")), ("tree", ("pedestrian",)), ("building", ("truck", "bus")),
        ("animal", ("pedestrian",)), ("box_thing", ("barrier", "traffic_cone")), ("rack", ("bicycle", "barrier")))
    false_background: float = 0.15  # mean number of background blobs per image (Poisson)
    background_classes: tuple[str, ...] = ("car", "pedestrian", "barrier", "traffic_cone")
    background_radius: tuple[float, float] = (6.0, 30.0)  # semi-axes of a background blob [px], uniform
    boundary_sigma: float = 1.5  # std of the erosion (< 0) / dilation (> 0) radius [px], rounded
    boundary_bias: float = 0.0  # mean of that radius [px]
    jitter_sigma: float = 1.5  # std of the mask shift [px] in x and y, rounded
    ragged: float = 0.3  # probability that each pixel of a mask's one-pixel edge band flips
    score_noise: float = 0.08  # std of the noise on a found object's score
    false_score: tuple[float, float] = (0.15, 0.6)  # a false mask's score, uniform
    confused_score: float = 0.8  # a confused class multiplies the score by this

    def check(self) -> None:
        """Raises ValueError naming the first field out of range."""
        probabilities = ("miss_base", "miss_far", "miss_occluded", "miss_small", "confusion", "false_per_clutter",
                         "ragged", "confused_score")
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"mask error model field '{name}' must be in [0, 1], found {getattr(self, name)}")
        if not 0 < self.near_distance < self.far_distance:
            raise ValueError(f"mask error model needs 0 < near_distance < far_distance, found {self.near_distance} "
                             f"and {self.far_distance}")
        if not 0 <= self.min_pixels < self.small_pixels:
            raise ValueError(f"mask error model needs 0 <= min_pixels < small_pixels, found {self.min_pixels} and "
                             f"{self.small_pixels}")
        names = [c for group in self.similar for c in group] + list(self.background_classes) + \
            [c for _, classes in self.clutter_classes for c in classes]
        unknown = sorted(set(names) - set(DETECTION_CLASSES))
        if unknown:
            raise ValueError(f"mask error model names unknown classes {unknown}; use the 10 detection classes")

    def miss_probability(self, distance: np.ndarray, visible_fraction: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """Miss probability (K,) of objects at ego distance (K,) [m], with visible fraction (K,) and visible full-size
        pixels (K,) in one camera."""
        distance, pixels = np.asarray(distance, dtype=np.float64), np.asarray(pixels, dtype=np.float64)
        far = self.miss_far * np.clip((distance - self.near_distance) / (self.far_distance - self.near_distance),
                                      0.0, 1.0)
        hidden = self.miss_occluded * (1.0 - np.clip(visible_fraction, 0.0, 1.0))
        lower = max(self.min_pixels, 1)
        small = self.miss_small * np.clip(np.log(self.small_pixels / np.maximum(pixels, 1.0))
                                          / np.log(self.small_pixels / lower), 0.0, 1.0)
        found = (1.0 - self.miss_base) * (1.0 - far) * (1.0 - hidden) * (1.0 - small)
        return np.where(pixels < self.min_pixels, 1.0, 1.0 - found)

    def confusable(self, name: str) -> tuple[str, ...]:
        """The other classes of `name`'s group in `similar` (empty: never confused)."""
        for group in self.similar:
            if name in group:
                return tuple(c for c in group if c != name)
        return ()


@dataclass
class CameraTruth:
    """What the renderer knows about one camera image, at low resolution (h, w).

    owners: (h, w) int slot of the nearest object (-1: ground or sky); per slot (R,): class_names (a detection class,
    or a clutter / other kind), annotated (detection-class objects only count as true instances), distance [m] from
    the ego, visible_fraction in this camera, pixels (visible low-resolution pixels).
    """

    owners: np.ndarray
    class_names: list[str]
    is_true: np.ndarray
    distance: np.ndarray
    visible_fraction: np.ndarray
    pixels: np.ndarray


@dataclass
class MaskImage:
    """A segmenter's output for one image: ids (H, W) uint8 (0: none) and per mask id - 1 the label and score;
    `truth` (JSON-ready) records the true instances with their best match and the source of every mask."""

    ids: np.ndarray
    labels: list[str]
    scores: list[float]
    truth: dict = field(default_factory=dict)


@dataclass
class _Region:
    """A boolean mask `crop` placed at full-size pixel (row, col) of the image."""

    row: int
    col: int
    crop: np.ndarray

    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.crop.shape[0]), slice(self.col, self.col + self.crop.shape[1])


def _object_regions(owners: np.ndarray) -> list[_Region | None]:
    """Each slot's full-size region (None where it has no pixel) from the low-resolution owner map (h, w)."""
    out: list[_Region | None] = []
    for slot, found in enumerate(ndimage.find_objects(owners + 1)):
        if found is None:
            out.append(None)
            continue
        rows, cols = found
        block = np.repeat(np.repeat(owners[rows, cols] == slot, RENDER_SCALE, axis=0), RENDER_SCALE, axis=1)
        out.append(_Region(rows.start * RENDER_SCALE, cols.start * RENDER_SCALE, block))
    return out


def _perturb(region: _Region, model: MaskErrorModel, rng: np.random.Generator) -> _Region:
    """Erode / dilate, shift and fray a region; the result is clipped to the image and may be empty."""
    radius = int(np.round(rng.normal(model.boundary_bias, model.boundary_sigma))) if model.boundary_sigma else \
        int(np.round(model.boundary_bias))
    shift = np.round(rng.normal(0.0, model.jitter_sigma, size=2)).astype(int) if model.jitter_sigma else \
        np.zeros(2, dtype=int)
    pad = max(radius, 0) + 2
    crop = np.pad(region.crop, pad)
    if radius > 0:
        crop = ndimage.binary_dilation(crop, iterations=radius)
    elif radius < 0:
        crop = ndimage.binary_erosion(crop, iterations=-radius)
    if model.ragged > 0 and crop.any():
        edge = crop ^ ndimage.binary_erosion(crop)
        outer = ndimage.binary_dilation(crop) & ~crop
        flips = rng.random(crop.shape) < model.ragged
        crop = (crop & ~(edge & flips)) | (outer & flips)
    row, col = region.row - pad + int(shift[0]), region.col - pad + int(shift[1])
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + crop.shape[0], IMAGE_HEIGHT), min(col + crop.shape[1], IMAGE_WIDTH)
    if r0 >= r1 or c0 >= c1:
        return _Region(0, 0, np.zeros((0, 0), dtype=bool))
    return _Region(r0, c0, crop[r0 - row:r1 - row, c0 - col:c1 - col])


def _background_blob(owners: np.ndarray, model: MaskErrorModel, rng: np.random.Generator) -> _Region:
    """An elliptic blob on the lower half of the image, where no object is (owners: low-resolution map)."""
    cy, cx = rng.uniform(0.55 * IMAGE_HEIGHT, IMAGE_HEIGHT), rng.uniform(0, IMAGE_WIDTH)
    ay, ax = rng.uniform(*model.background_radius, size=2)
    r0, r1 = int(max(cy - ay, 0)), int(min(cy + ay + 1, IMAGE_HEIGHT))
    c0, c1 = int(max(cx - ax, 0)), int(min(cx + ax + 1, IMAGE_WIDTH))
    yy, xx = np.mgrid[r0:r1, c0:c1]
    free = owners[yy // RENDER_SCALE, xx // RENDER_SCALE] < 0
    return _Region(r0, c0, (((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0) & free)


def segment(truth: CameraTruth, model: MaskErrorModel, rng: np.random.Generator) -> MaskImage:
    """Draw one image's masks from the truth under the error model (see the module doc)."""
    regions = _object_regions(truth.owners)
    clutter_classes = dict(model.clutter_classes)
    full_pixels = truth.pixels * RENDER_SCALE * RENDER_SCALE
    miss = model.miss_probability(truth.distance, truth.visible_fraction, full_pixels)
    # (region, label, score, source slot or -1, source kind, distance); painted in this order: far to near, so
    # nearer masks cover farther ones
    drawn: list[tuple[_Region, str, float, int, str, float]] = []
    for _ in range(int(rng.poisson(model.false_background))):
        blob = _background_blob(truth.owners, model, rng)
        label = str(rng.choice(model.background_classes))
        if blob.crop.any():
            drawn.append((blob, label, float(rng.uniform(*model.false_score)), -1, "background", float("inf")))
    for slot in np.argsort(-truth.distance, kind="stable"):
        slot = int(slot)
        if truth.pixels[slot] == 0 or regions[slot] is None:
            continue
        name = truth.class_names[slot]
        if truth.is_true[slot]:
            found = rng.random() >= miss[slot]
            confused = rng.random() < model.confusion
            noise = rng.normal(0.0, model.score_noise)
            if not found:
                continue
            label = name
            score = 0.35 + 0.6 * (1.0 - miss[slot]) + noise
            others = model.confusable(name)
            if confused and others:
                label = str(rng.choice(others))
                score *= model.confused_score
            kind = "object"
        else:
            options = clutter_classes.get(name, ())
            if not options or full_pixels[slot] < model.min_pixels or rng.random() >= model.false_per_clutter:
                continue
            label = str(rng.choice(options))
            score = rng.uniform(*model.false_score)
            kind = "clutter"
        region = _perturb(regions[slot], model, rng)
        if region.crop.any():
            drawn.append((region, label, float(np.clip(score, 0.05, 0.99)), slot, kind, float(truth.distance[slot])))
    drawn = drawn[:MAX_INSTANCES]
    ids = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH), dtype=np.uint8)
    for k, (region, *_rest) in enumerate(drawn):
        window = ids[region.slices()]
        window[region.crop] = k + 1
    return MaskImage(ids, [d[1] for d in drawn], [d[2] for d in drawn], _truth_record(truth, regions, ids, drawn))


def _truth_record(truth: CameraTruth, regions: list, ids: np.ndarray, drawn: list) -> dict:
    """The true instances of an image with their best-IoU mask, and every mask's source (for `mask_rates`)."""
    count = len(drawn)
    sizes = np.bincount(ids.reshape(-1), minlength=count + 1)[1:]  # (count,) pixels each mask kept
    instances = []
    for slot in np.nonzero(truth.is_true & (truth.pixels > 0))[0]:
        region = regions[slot]
        if region is None:
            continue
        area = int(region.crop.sum())
        overlap = np.bincount(ids[region.slices()][region.crop], minlength=count + 1)[1:]  # (count,)
        best, iou = 0, 0.0
        if count and overlap.any():
            ious = overlap / (sizes + area - overlap)
            best, iou = int(np.argmax(ious)) + 1, float(ious.max())
        instances.append({"slot": int(slot), "class": truth.class_names[slot],
                          "distance": round(float(truth.distance[slot]), 3),
                          "visible_fraction": round(float(truth.visible_fraction[slot]), 4), "pixels": area,
                          "match": best if iou >= MATCH_IOU else 0, "iou": round(iou, 4)})
    masks = [{"id": k + 1, "label": d[1], "source": d[4], "slot": d[3],
              "source_class": truth.class_names[d[3]] if d[3] >= 0 else "",
              "distance": None if not np.isfinite(d[5]) else round(d[5], 3)} for k, d in enumerate(drawn)]
    return {"instances": instances, "masks": masks}


def camera_truths(frame, scene, key_time_us: int, camera_times_us: list[int], ego_xy_at) -> list[CameraTruth]:
    """CameraTruth of each camera of a `CameraFrame` rendered `with_owners`; `ego_xy_at(t)` is the ego's xy."""
    out = []
    rendered = frame.rendered
    names = [scene.objects[i].class_name for i in rendered]
    is_true = np.array([scene.objects[i].annotated and not scene.objects[i].category
                        and scene.objects[i].class_name in DETECTION_CLASSES for i in rendered], dtype=bool)
    for k, time_us in enumerate(camera_times_us):
        boxes = scene.boxes_at(time_us)[rendered] if len(rendered) else np.zeros((0, 7))
        ego_xy = np.asarray(ego_xy_at(time_us))
        distance = np.hypot(boxes[:, 0] - ego_xy[0], boxes[:, 1] - ego_xy[1]) if len(boxes) else np.zeros(0)
        pixels, coverable = frame.pixels[k], frame.coverable[k]
        fraction = np.where(coverable > 0, pixels / np.maximum(coverable, 1), 0.0)
        out.append(CameraTruth(frame.owners[k], names, is_true.reshape(-1), distance, fraction, pixels))
    return out


def mask_rng(seed: int, scene_index: int, offset_us: int, camera_index: int) -> np.random.Generator:
    """The generator of one image's masks (independent of every sensor stream, any order)."""
    return np.random.default_rng([seed, scene_index, offset_us + 10_000_000, _MASK_STREAM, camera_index])


def write_mask_image(dataroot: Path, image_filename: str, result: MaskImage) -> None:
    """Write the PNG and JSON of one image and its truth record."""
    png, meta = mask_paths(dataroot, image_filename)
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.ids, mode="L").save(png, optimize=False)
    instances = [{"id": k + 1, "label": label, "score": round(score, 4)}
                 for k, (label, score) in enumerate(zip(result.labels, result.scores))]
    meta.write_text(json.dumps({"image": image_filename, "width": IMAGE_WIDTH, "height": IMAGE_HEIGHT,
                                "instances": instances}))
    truth = Path(dataroot) / TRUTH_FOLDER / png.parent.name / meta.name
    truth.parent.mkdir(parents=True, exist_ok=True)
    truth.write_text(json.dumps({"image": image_filename, **result.truth}))


# ------------------------------------------------------------------------------------------------- measured rates
def band_name(distance: float | None) -> str:
    """The DISTANCE_BANDS label of an ego distance [m] ("background" for a mask on no object)."""
    if distance is None:
        return "background"
    for low, high in DISTANCE_BANDS:
        if low <= distance < high:
            return f"{low:g}-{high:g} m" if np.isfinite(high) else f">= {low:g} m"
    return "background"


def mask_rates(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Measured mask recall and precision against the true instances.

    A true instance is found when a mask overlaps it with IoU >= MATCH_IOU; its label is right when that mask names
    its class. A mask is correct when it is the match of a true instance of the class it names. Returns
    {"class": {name: row}, "distance": {band: row}, "all": {"all": row}} with rows of true, found, recall,
    label_accuracy (right label among found), masks, correct, precision (NaN where a count is 0).
    """
    def empty() -> dict[str, float]:
        return {"true": 0, "found": 0, "right_label": 0, "masks": 0, "correct": 0}

    tables: dict[str, dict[str, dict[str, float]]] = {"class": {c: empty() for c in DETECTION_CLASSES},
                                                     "distance": {band_name(low): empty() for low, _ in
                                                                  DISTANCE_BANDS}, "all": {"all": empty()}}
    tables["distance"]["background"] = empty()
    for record in records:
        labels = {m["id"]: m for m in record["masks"]}
        correct_ids = set()
        for inst in record["instances"]:
            rows = (tables["class"][inst["class"]], tables["distance"][band_name(inst["distance"])],
                    tables["all"]["all"])
            match = labels.get(inst["match"])
            for row in rows:
                row["true"] += 1
                row["found"] += int(match is not None)
                row["right_label"] += int(match is not None and match["label"] == inst["class"])
            if match is not None and match["label"] == inst["class"]:
                correct_ids.add(match["id"])
        for mask in record["masks"]:
            for row in (tables["class"][mask["label"]], tables["distance"][band_name(mask["distance"])],
                        tables["all"]["all"]):
                row["masks"] += 1
                row["correct"] += int(mask["id"] in correct_ids)
    for table in tables.values():
        for row in table.values():
            row["recall"] = row["found"] / row["true"] if row["true"] else float("nan")
            row["label_accuracy"] = row["right_label"] / row["found"] if row["found"] else float("nan")
            row["precision"] = row["correct"] / row["masks"] if row["masks"] else float("nan")
    return tables


def format_mask_table(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown tables of `mask_rates`: by true class (recall) / predicted class (precision), then by distance."""
    def cell(value: float, digits: int = 3) -> str:
        return "-" if value != value else f"{value:.{digits}f}"

    lines = []
    for key, title in (("class", "class"), ("distance", "ego distance"), ("all", "all")):
        lines += [f"| {title} | true instances | recall | right label | masks | precision |",
                  "|---|---|---|---|---|---|"]
        for name, row in tables[key].items():
            if row["true"] == 0 and row["masks"] == 0:
                continue
            lines.append(f"| {name} | {row['true']} | {cell(row['recall'])} | {cell(row['label_accuracy'])} | "
                         f"{row['masks']} | {cell(row['precision'])} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_key_frame_masks(dataroot: Path, scene, frame, image_filenames: list[str], camera_times_us: list[int],
                          seed: int, model: MaskErrorModel) -> None:
    """Masks of the six cameras of one key frame (`frame` rendered `with_owners`), written beside `samples/`."""
    truths = camera_truths(frame, scene, frame.timestamp, camera_times_us, lambda t: scene.ego_pose_2d(t)[0])
    offset_us = int(frame.timestamp - scene.start_timestamp)
    for k, (truth, filename) in enumerate(zip(truths, image_filenames)):
        write_mask_image(dataroot, filename, segment(truth, model, mask_rng(seed, scene.index, offset_us, k)))

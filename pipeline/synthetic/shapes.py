"""Objects of the synthetic world (v2) built from a few boxes, so a class shows in its shape, not its colour.

A part is a box in its object's frame (x forward, y left, z up from the ground), inside the object's annotation
box (length l along x, width w along y, height h):

    parts = class_parts("car", l=4.6, w=1.9, h=1.7, rng=rng)      # body, cabin with glass, four wheels
    solids = parts_in_world(parts, box)                          # (N, 7) boxes in the frame of `box`

Vehicles have a body, a cabin set toward the back (cars) or a cab at the front (trucks, construction vehicles),
and wheels, so the front is visible by shape; pedestrians have legs, a torso and a head; bicycles and motorcycles
are thin frames on two wheels with or without a rider; cones are stacked tiers with a reflective collar; barriers
are a plank on two feet. Static clutter (buildings, trees, poles, walls) and the annotated objects of categories
outside the 10 detection classes are built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """A box of an object: centre (x, y) and bottom z in the object frame, size (l, w, h), material name."""

    x: float
    y: float
    z0: float
    l: float
    w: float
    h: float
    material: str


def _wheels(l: float, w: float, radius: float, inset: float, axles: list[float]) -> list[Part]:
    width = min(0.28, 0.16 * w + 0.05)
    return [Part(x, side * (w / 2 - width / 2), 0.0, 2 * radius, width, 2 * radius, "rubber")
            for x in axles for side in (-1.0, 1.0)]


def _car(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    r = min(0.34, 0.2 * h)
    body_h = 0.55 * h
    cabin_l = l * rng.uniform(0.48, 0.58)
    cabin_x = -l / 2 + 0.12 * l + cabin_l / 2  # cabin set back: the bonnet is in front
    parts = [Part(0.0, 0.0, r * 0.6, l, w * 0.98, body_h - r * 0.6, "paint"),
             Part(cabin_x, 0.0, body_h, cabin_l, w * 0.86, h - body_h, "glass"),
             Part(cabin_x - 0.05 * cabin_l, 0.0, h - 0.06 * h, cabin_l * 0.8, w * 0.8, 0.06 * h, "paint")]
    return parts + _wheels(l, w, r, 0.0, [l / 2 - 0.2 * l, -l / 2 + 0.2 * l])


def _truck(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    r = min(0.5, 0.16 * h)
    cab_l = min(2.4, 0.3 * l)
    cab_h = h * rng.uniform(0.75, 0.9)
    cargo_l = l - cab_l - 0.15
    parts = [Part(l / 2 - cab_l / 2, 0.0, r, cab_l, w, cab_h - r - 0.35 * cab_h, "paint"),
             Part(l / 2 - cab_l / 2, 0.0, cab_h * 0.65, cab_l * 0.9, w * 0.96, cab_h * 0.35, "glass"),
             Part(-l / 2 + cargo_l / 2, 0.0, r * 1.3, cargo_l, w, h - r * 1.3, "paint"),
             Part(0.0, 0.0, r * 0.5, l * 0.95, w * 0.5, r * 0.8, "metal")]
    return parts + _wheels(l, w, r, 0.0, [l / 2 - 0.6 * cab_l, -l / 2 + 0.25 * cargo_l, -l / 2 + 0.1 * cargo_l])


def _bus(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    r = 0.5
    parts = [Part(0.0, 0.0, r * 0.7, l, w, h * 0.45, "paint"),
             Part(0.0, 0.0, r * 0.7 + h * 0.45, l * 0.99, w * 0.98, h * 0.32, "glass"),
             Part(0.0, 0.0, r * 0.7 + h * 0.77, l, w, h - (r * 0.7 + h * 0.77), "paint"),
             Part(l / 2 - 0.06, 0.0, r * 0.7, 0.12, w * 0.9, h * 0.7, "glass")]  # windscreen down to the bumper
    return parts + _wheels(l, w, r, 0.0, [l / 2 - 2.4, -l / 2 + 2.8])


def _trailer(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    r = 0.5
    drawbar = min(1.6, 0.15 * l)
    box_l = l - drawbar
    parts = [Part(-l / 2 + box_l / 2, 0.0, 1.1, box_l, w, h - 1.1, "paint"),
             Part(l / 2 - drawbar / 2, 0.0, 0.9, drawbar, 0.25, 0.2, "metal")]
    return parts + _wheels(l, w, r, 0.0, [-l / 2 + 1.2, -l / 2 + 2.4])


def _construction(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    r = min(0.7, 0.22 * h)
    body_h = 0.45 * h
    parts = [Part(-0.1 * l, 0.0, r, l * 0.7, w, body_h, "paint"),
             Part(-0.25 * l, w * 0.15, r + body_h, l * 0.3, w * 0.55, h - r - body_h, "glass"),
             Part(0.32 * l, 0.0, r * 1.6, l * 0.36, w * 0.22, 0.22 * h, "paint"),  # boom / arm reaching forward
             Part(0.45 * l, 0.0, 0.0, l * 0.1, w * 0.9, r * 1.4, "metal")]  # bucket / blade in front
    return parts + _wheels(l, w, r, 0.0, [0.15 * l, -0.35 * l])


def _person(l: float, w: float, h: float, centre_x: float = 0.0, base: float = 0.0) -> list[Part]:
    leg_h = 0.47 * h
    torso_h = 0.33 * h
    head = 0.13 * h
    return [Part(centre_x, 0.22 * w, base, 0.45 * l, 0.28 * w, leg_h, "cloth"),
            Part(centre_x, -0.22 * w, base, 0.45 * l, 0.28 * w, leg_h, "cloth"),
            Part(centre_x, 0.0, base + leg_h, 0.55 * l, 0.9 * w, torso_h, "cloth"),
            Part(centre_x + 0.05 * l, 0.0, base + leg_h + torso_h + 0.02, 0.32 * l, 0.3 * w, head * 0.8, "skin"),
            Part(centre_x - 0.03 * l, 0.0, base + leg_h + torso_h + 0.02 + head * 0.8, 0.34 * l, 0.32 * w,
                 max(h - (base + leg_h + torso_h + 0.02 + head * 0.8), 0.02), "hair")]


def _pedestrian(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    return _person(l, w, h)


def _two_wheeler(l: float, w: float, h: float, rng: np.random.Generator, rider: bool, motor: bool) -> list[Part]:
    r = 0.33 if not motor else 0.32
    frame_h = 0.55 * h if not rider else 0.45 * h
    parts = [Part(l / 2 - r, 0.0, 0.0, 2 * r, 0.08, 2 * r, "rubber"),
             Part(-l / 2 + r, 0.0, 0.0, 2 * r, 0.08, 2 * r, "rubber"),
             Part(0.0, 0.0, r, l - 2 * r, 0.12 if not motor else 0.4 * w, frame_h - r, "frame"),
             Part(l / 2 - r * 1.2, 0.0, frame_h, 0.1, 0.9 * w, 0.08, "chrome")]  # handlebar at the front
    if rider:
        parts += _person(0.5 * l, 0.9 * w, h - 0.35 * h, centre_x=-0.08 * l, base=0.35 * h)
    return parts


def _motorcycle(l: float, w: float, h: float, rng: np.random.Generator, rider: bool = False) -> list[Part]:
    return _two_wheeler(l, w, h, rng, rider, motor=True)


def _bicycle(l: float, w: float, h: float, rng: np.random.Generator, rider: bool = False) -> list[Part]:
    return _two_wheeler(l, w, h, rng, rider, motor=False)


def _cone(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    return [Part(0.0, 0.0, 0.0, l, w, 0.05 * h, "cone"),
            Part(0.0, 0.0, 0.05 * h, 0.7 * l, 0.7 * w, 0.35 * h, "cone"),
            Part(0.0, 0.0, 0.4 * h, 0.5 * l, 0.5 * w, 0.2 * h, "cone_band"),
            Part(0.0, 0.0, 0.6 * h, 0.32 * l, 0.32 * w, 0.4 * h, "cone")]


def _barrier(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    # barriers stand across the road: their long side is the annotation width (y)
    return [Part(0.0, 0.4 * w, 0.0, l, 0.12 * w, 0.45 * h, "concrete"),
            Part(0.0, -0.4 * w, 0.0, l, 0.12 * w, 0.45 * h, "concrete"),
            Part(0.0, 0.0, 0.45 * h, 0.6 * l, w, 0.55 * h, "barrier")]


CLASS_BUILDERS = {"car": _car, "truck": _truck, "bus": _bus, "trailer": _trailer,
                  "construction_vehicle": _construction, "pedestrian": _pedestrian, "motorcycle": _motorcycle,
                  "bicycle": _bicycle, "traffic_cone": _cone, "barrier": _barrier}


def class_parts(kind: str, l: float, w: float, h: float, rng: np.random.Generator, rider: bool = False
                ) -> tuple[Part, ...]:
    """The parts of one object of `kind` (a detection class or a clutter / other-category kind)."""
    if kind in ("motorcycle", "bicycle"):
        parts = CLASS_BUILDERS[kind](l, w, h, rng, rider=rider)
    elif kind in CLASS_BUILDERS:
        parts = CLASS_BUILDERS[kind](l, w, h, rng)
    else:
        parts = CLUTTER_BUILDERS[kind](l, w, h, rng)
    return tuple(_clip_to_box(p, l, w, h) for p in parts)


def _clip_to_box(part: Part, l: float, w: float, h: float) -> Part:
    """The part cut to the annotation box (parts never stick out of it)."""
    x0, x1 = max(part.x - part.l / 2, -l / 2), min(part.x + part.l / 2, l / 2)
    y0, y1 = max(part.y - part.w / 2, -w / 2), min(part.y + part.w / 2, w / 2)
    z0, z1 = max(part.z0, 0.0), min(part.z0 + part.h, h)
    return Part((x0 + x1) / 2, (y0 + y1) / 2, z0, max(x1 - x0, 0.02), max(y1 - y0, 0.02), max(z1 - z0, 0.02),
                part.material)


# ------------------------------------------------------------------------------------------------ clutter
def _building(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    parts = [Part(0.0, 0.0, 0.0, l, w, h, "building")]
    floors = max(1, int(h // 3.2))
    for floor in range(floors):  # window bands on the long facades
        parts.append(Part(0.0, 0.0, 1.0 + floor * 3.2, l * 0.96, w + 0.02, 1.3, "glass"))
    return parts


def _tree(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    trunk = 0.12 * l
    crown_z = h * rng.uniform(0.35, 0.5)
    return [Part(0.0, 0.0, 0.0, trunk, trunk, crown_z + 0.3, "bark"),
            Part(0.0, 0.0, crown_z, l, w, h - crown_z, "foliage"),
            Part(0.0, 0.0, crown_z + 0.25 * (h - crown_z), l * 1.0, w * 1.0, 0.5 * (h - crown_z), "foliage")]


def _pole(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    return [Part(0.0, 0.0, 0.0, l, w, h, "metal"), Part(0.0, 0.0, h * 0.85, l, w, h * 0.15, "metal")]


def _wall(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    return [Part(0.0, 0.0, 0.0, l, w, h, "concrete")]


def _box_thing(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    return [Part(0.0, 0.0, 0.05, l, w, h - 0.05, "plastic")]


def _rack(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    hoops = max(2, int(l // 0.8))
    return [Part(-l / 2 + (i + 0.5) * l / hoops, 0.0, 0.0, 0.06, w, h, "metal") for i in range(hoops)]


def _animal(l: float, w: float, h: float, rng: np.random.Generator) -> list[Part]:
    legs = 0.5 * h
    return [Part(0.3 * l, 0.3 * w, 0.0, 0.12 * l, 0.2 * w, legs, "fur"),
            Part(-0.3 * l, -0.3 * w, 0.0, 0.12 * l, 0.2 * w, legs, "fur"),
            Part(0.0, 0.0, legs, 0.75 * l, w, 0.35 * h, "fur"),
            Part(0.42 * l, 0.0, 0.7 * h, 0.16 * l, 0.5 * w, 0.3 * h, "fur")]


CLUTTER_BUILDERS = {"building": _building, "tree": _tree, "pole": _pole, "wall": _wall, "box_thing": _box_thing,
                    "rack": _rack, "animal": _animal}


def parts_in_world(parts: tuple[Part, ...], box: np.ndarray) -> np.ndarray:
    """Boxes (N, 7) = (x, y, z, l, w, h, yaw) of `parts` for an object whose annotation box is `box` (7,)
    (z its gravity centre), in the frame of `box`."""
    if not parts:
        return np.zeros((0, 7))
    local = np.array([[p.x, p.y, p.z0 + p.h / 2, p.l, p.w, p.h] for p in parts])  # (N, 6)
    c, s = np.cos(box[6]), np.sin(box[6])
    bottom = box[2] - box[5] / 2
    out = np.empty((len(parts), 7))
    out[:, 0] = box[0] + c * local[:, 0] - s * local[:, 1]
    out[:, 1] = box[1] + s * local[:, 0] + c * local[:, 1]
    out[:, 2] = bottom + local[:, 2]
    out[:, 3:6] = local[:, 3:6]
    out[:, 6] = box[6]
    return out

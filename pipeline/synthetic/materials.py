"""Surface materials of the synthetic world (v2): a LiDAR reflectivity and a colour, never a class.

An object's parts are painted from per-class palettes that overlap across classes (a car, a truck or a bus may
be any of the common paint colours; only cones and barriers keep the colours they have in the real world, as in
nuScenes), and the LiDAR intensity of a return depends on the material and the angle of incidence, so neither
sensor names the class by a colour or an intensity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Material:
    """reflectivity: diffuse LiDAR reflectance in [0, 1] (intensity 255 at normal incidence and reflectance 1);
    colour: albedo RGB 0..255, or None for "painted" (the part takes its object's paint colour)."""

    reflectivity: float
    colour: tuple[int, int, int] | None = None


MATERIALS: dict[str, Material] = {
    "paint": Material(0.30),  # vehicle body: the object's paint colour
    "glass": Material(0.06, (38, 44, 52)),
    "rubber": Material(0.04, (24, 24, 26)),
    "chrome": Material(0.45, (150, 152, 156)),
    "cloth": Material(0.18),  # clothes: the object's paint colour
    "skin": Material(0.22, (198, 160, 130)),
    "hair": Material(0.10, (46, 36, 30)),
    "frame": Material(0.25),  # bicycle / motorcycle frame: the paint colour
    "cone": Material(0.55, (236, 96, 24)),
    "cone_band": Material(0.90, (236, 236, 230)),  # retro-reflective collar
    "barrier": Material(0.35),  # painted concrete or plastic: the paint colour
    "concrete": Material(0.32, (150, 148, 142)),
    "building": Material(0.28),  # facade: the paint colour
    "bark": Material(0.20, (82, 64, 48)),
    "foliage": Material(0.24, (62, 98, 52)),
    "metal": Material(0.40, (120, 122, 126)),
    "plastic": Material(0.30),  # bins, debris, carts: the paint colour
    "fur": Material(0.15, (120, 96, 70)),
}

# RGB paint colours shared by every vehicle class; the classes differ only in how often they use each.
VEHICLE_PAINT = {
    "white": (228, 228, 226), "black": (30, 30, 34), "silver": (168, 170, 174), "grey": (104, 106, 110),
    "red": (168, 30, 34), "blue": (36, 64, 140), "green": (40, 92, 56), "beige": (196, 182, 150),
    "yellow": (220, 184, 40), "orange": (216, 110, 30), "brown": (100, 70, 48),
}
_PALETTES: dict[str, dict[str, float]] = {
    "car": {"white": 3, "black": 3, "silver": 3, "grey": 2.5, "red": 1.2, "blue": 1.2, "green": 0.4, "beige": 0.4,
            "yellow": 0.2, "orange": 0.1, "brown": 0.3},
    "truck": {"white": 4, "black": 1, "silver": 1.5, "grey": 1.5, "red": 1, "blue": 1, "green": 0.6, "beige": 0.4,
              "yellow": 0.6, "orange": 0.4, "brown": 0.3},
    "bus": {"white": 3, "black": 0.5, "silver": 1, "grey": 1, "red": 1.5, "blue": 1.5, "green": 1, "yellow": 1,
            "orange": 0.5},
    "trailer": {"white": 3, "black": 0.5, "silver": 2, "grey": 2, "red": 0.6, "blue": 0.6, "green": 0.3,
                "yellow": 0.3, "orange": 0.3, "brown": 0.3},
    "construction_vehicle": {"yellow": 2.5, "orange": 2, "white": 1.5, "grey": 1, "red": 0.6, "green": 0.4,
                             "black": 0.4, "blue": 0.3},
    "motorcycle": {"black": 3, "red": 1.5, "blue": 1, "silver": 1, "white": 1, "orange": 0.5, "green": 0.4,
                   "yellow": 0.4},
    "bicycle": {"black": 2, "red": 1, "blue": 1, "silver": 1, "white": 1, "green": 0.6, "yellow": 0.5,
                "orange": 0.5},
}
CLOTHES = [(30, 30, 36), (52, 58, 82), (90, 92, 96), (140, 30, 36), (196, 196, 190), (60, 86, 60),
           (170, 140, 100), (32, 60, 120), (220, 200, 60), (110, 60, 90)]
BARRIER_PAINT = [(222, 222, 218), (200, 40, 36), (150, 148, 142), (232, 150, 40)]
BUILDING_PAINT = [(176, 160, 140), (150, 140, 130), (196, 190, 176), (120, 96, 80), (160, 164, 170), (210, 200, 180)]
PLASTIC_PAINT = [(40, 90, 50), (40, 40, 44), (30, 70, 140), (150, 150, 150), (190, 120, 40)]


def paint_colour(kind: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A paint colour for an object of `kind` (a detection class, "pedestrian", "barrier", "building", ...),
    jittered so no two instances share the exact RGB."""
    if kind in _PALETTES:
        names = list(_PALETTES[kind])
        weights = np.array([_PALETTES[kind][n] for n in names], dtype=np.float64)
        base = np.array(VEHICLE_PAINT[names[rng.choice(len(names), p=weights / weights.sum())]], dtype=np.float64)
    else:
        choices = {"pedestrian": CLOTHES, "barrier": BARRIER_PAINT, "building": BUILDING_PAINT}.get(kind, PLASTIC_PAINT)
        base = np.array(choices[rng.integers(len(choices))], dtype=np.float64)
    jittered = base * rng.uniform(0.85, 1.12) + rng.normal(0.0, 6.0, size=3)
    return tuple(int(v) for v in np.clip(np.round(jittered), 0, 255))


def part_colour(material: str, paint: tuple[int, int, int]) -> tuple[int, int, int]:
    """The albedo of a part: its material's own colour, or the object's paint for painted materials."""
    own = MATERIALS[material].colour
    return paint if own is None else own

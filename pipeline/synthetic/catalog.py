"""What each of the 10 detection classes looks like in the synthetic world: nuScenes category, size, colour,
LiDAR intensity, how it moves and where it is placed."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

from ..data.classes import DETECTION_CLASSES


@dataclass(frozen=True)
class ClassSpec:
    """Appearance and behaviour of one detection class."""

    name: str  # detection class name (classes.DETECTION_CLASSES)
    category: str  # real nuScenes category name (the devkit maps it back to `name`)
    size_wlh: tuple[float, float, float]  # mean nuScenes box size: width, length, height [m]
    hue: float  # colour hue in [0, 1); rendered with high saturation so every class is told apart by hue
    intensity: float  # mean LiDAR intensity (nuScenes scale 0..255)
    speed_range: tuple[float, float]  # speed when moving [m/s]
    moving_probability: float  # chance that an object of this class moves
    moving_attribute: str  # attribute while moving ("" for none)
    static_attributes: tuple[str, ...]  # attributes drawn for a static object ("" for none)
    lateral_range: tuple[float, float]  # distance from the ego path centre line [m]
    heading: str  # "road": along the path tangent (either way), "across": perpendicular to it, "any": uniform
    weight: float  # relative frequency among the extra (non-guaranteed) objects of a scene

    @property
    def colour(self) -> tuple[int, int, int]:
        """Base RGB colour (0..255) of the class' solid."""
        r, g, b = colorsys.hsv_to_rgb(self.hue, 0.85, 0.95)
        return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


_VEHICLE_STATIC = ("vehicle.parked", "vehicle.parked", "vehicle.stopped")

# Sizes: means of the nuScenes training annotations per class (w, l, h), as used for anchors by public detectors.
# Hues are 36 degrees apart so a pixel's hue alone names its class.
CLASS_SPECS: dict[str, ClassSpec] = {
    spec.name: spec for spec in (
        ClassSpec("car", "vehicle.car", (1.95, 4.62, 1.73), 0.0 / 10, 30.0, (3.0, 8.0), 0.5,
                  "vehicle.moving", _VEHICLE_STATIC, (3.5, 14.0), "road", 6.0),
        ClassSpec("truck", "vehicle.truck", (2.51, 6.93, 2.84), 1.0 / 10, 25.0, (3.0, 7.0), 0.4,
                  "vehicle.moving", _VEHICLE_STATIC, (4.0, 16.0), "road", 1.5),
        ClassSpec("construction_vehicle", "vehicle.construction", (2.85, 6.37, 3.19), 2.0 / 10, 40.0, (1.0, 3.0),
                  0.2, "vehicle.moving", _VEHICLE_STATIC, (5.0, 16.0), "any", 0.7),
        ClassSpec("bus", "vehicle.bus.rigid", (2.94, 10.50, 3.47), 3.0 / 10, 20.0, (3.0, 7.0), 0.5,
                  "vehicle.moving", _VEHICLE_STATIC, (4.5, 16.0), "road", 0.7),
        ClassSpec("trailer", "vehicle.trailer", (2.90, 12.29, 3.87), 4.0 / 10, 22.0, (2.0, 5.0), 0.1,
                  "vehicle.moving", ("vehicle.parked",), (5.0, 16.0), "road", 0.5),
        ClassSpec("barrier", "movable_object.barrier", (2.53, 0.50, 0.98), 5.0 / 10, 60.0, (0.0, 0.0), 0.0,
                  "", ("",), (3.0, 12.0), "across", 2.5),
        ClassSpec("motorcycle", "vehicle.motorcycle", (0.77, 2.11, 1.47), 6.0 / 10, 35.0, (3.0, 8.0), 0.5,
                  "cycle.with_rider", ("cycle.without_rider",), (3.0, 12.0), "road", 1.0),
        ClassSpec("bicycle", "vehicle.bicycle", (0.60, 1.70, 1.28), 7.0 / 10, 15.0, (2.0, 5.0), 0.5,
                  "cycle.with_rider", ("cycle.without_rider",), (3.0, 12.0), "road", 1.0),
        ClassSpec("pedestrian", "human.pedestrian.adult", (0.67, 0.73, 1.77), 8.0 / 10, 10.0, (0.8, 1.6), 0.6,
                  "pedestrian.moving", ("pedestrian.standing", "pedestrian.standing",
                                        "pedestrian.sitting_lying_down"), (3.0, 12.0), "any", 4.0),
        ClassSpec("traffic_cone", "movable_object.trafficcone", (0.41, 0.41, 1.07), 9.0 / 10, 90.0, (0.0, 0.0),
                  0.0, "", ("",), (2.5, 10.0), "any", 2.5),
    )
}
assert tuple(CLASS_SPECS) == DETECTION_CLASSES

GROUND_INTENSITY = 8.0  # mean LiDAR intensity of the asphalt ground plane

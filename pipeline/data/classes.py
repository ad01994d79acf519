"""The nuScenes detection classes, CenterPoint's task groups and the attribute vocabulary."""

from __future__ import annotations

# The 10 nuScenes detection classes in the order CenterPoint / mmdet3d use (class id = index).
DETECTION_CLASSES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)
CLASS_ID = {name: i for i, name in enumerate(DETECTION_CLASSES)}

# CenterHead task groups (nuScenes): one heatmap head per group.
TASK_GROUPS: tuple[tuple[str, ...], ...] = (
    ("car",), ("truck", "construction_vehicle"), ("bus", "trailer"),
    ("barrier",), ("motorcycle", "bicycle"), ("pedestrian", "traffic_cone"),
)

# nuScenes attribute names; id = index, NO_ATTRIBUTE for barrier / traffic_cone.
ATTRIBUTES: tuple[str, ...] = (
    "cycle.with_rider", "cycle.without_rider",
    "pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down",
    "vehicle.moving", "vehicle.parked", "vehicle.stopped",
)
ATTRIBUTE_ID = {name: i for i, name in enumerate(ATTRIBUTES)}
NO_ATTRIBUTE = -1

# mmdet3d's per-class default attributes (NuScenesDataset.DefaultAttribute).
DEFAULT_ATTRIBUTE = {
    "car": "vehicle.parked", "truck": "vehicle.parked", "construction_vehicle": "vehicle.parked",
    "bus": "vehicle.moving", "trailer": "vehicle.parked", "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider", "pedestrian": "pedestrian.moving", "barrier": "", "traffic_cone": "",
}
MOVING_SPEED = 0.2  # m/s: above it a box counts as moving (mmdet3d's rule)
_VEHICLES = ("car", "construction_vehicle", "bus", "truck", "trailer")
_CYCLES = ("bicycle", "motorcycle")


def attribute_from_speed(name: str, speed: float) -> str:
    """The attribute mmdet3d reports for a detection of class `name` moving at `speed` m/s (no predicted one):
    vehicles moving / parked (a slow bus: stopped), cycles with / without rider, pedestrians moving / standing."""
    if speed > MOVING_SPEED:
        if name in _VEHICLES:
            return "vehicle.moving"
        if name in _CYCLES:
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTE[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTE[name]


def category_to_class(category_name: str) -> str | None:
    """nuScenes category -> detection class, or None for categories the detection benchmark ignores."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    return category_to_detection_name(category_name)

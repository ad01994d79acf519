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

# The attribute a detection is reported with when a model predicts none (mmdet3d's defaults).
DEFAULT_ATTRIBUTE = {
    "car": "vehicle.parked", "truck": "vehicle.parked", "construction_vehicle": "vehicle.parked",
    "bus": "vehicle.moving", "trailer": "vehicle.parked", "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider", "pedestrian": "pedestrian.standing", "barrier": "", "traffic_cone": "",
}


def category_to_class(category_name: str) -> str | None:
    """nuScenes category -> detection class, or None for categories the detection benchmark ignores."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    return category_to_detection_name(category_name)

"""The real nuScenes sensor rig (calibrated_sensor of v1.0-mini, log n015): one LIDAR_TOP and six 1600x900 cameras.

Translations are metres in the ego frame (x forward, y left, z up; origin at the rear axle on the ground),
rotations are sensor -> ego quaternions (w, x, y, z). Camera frames are x right, y down, z forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry.transforms import make_transform

IMAGE_WIDTH = 1600
IMAGE_HEIGHT = 900
LIDAR_CHANNEL = "LIDAR_TOP"
CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)


@dataclass(frozen=True)
class SensorCalibration:
    """One sensor's mounting: translation (3,), rotation (w, x, y, z) sensor -> ego, intrinsics (3, 3) or None."""

    channel: str
    modality: str  # "lidar" or "camera"
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    focal: float | None = None
    principal_point: tuple[float, float] | None = None

    @property
    def ego_from_sensor(self) -> np.ndarray:
        """(4, 4) T_ego_from_sensor."""
        return make_transform(self.rotation, self.translation)

    @property
    def intrinsics(self) -> np.ndarray:
        """(3, 3) pinhole intrinsics for the 1600x900 image (fx = fy); cameras only."""
        if self.focal is None or self.principal_point is None:
            raise ValueError(f"{self.channel} is not a camera and has no intrinsics")
        cx, cy = self.principal_point
        return np.array([[self.focal, 0.0, cx], [0.0, self.focal, cy], [0.0, 0.0, 1.0]])


RIG: dict[str, SensorCalibration] = {
    "LIDAR_TOP": SensorCalibration(
        "LIDAR_TOP", "lidar", (0.943713, 0.0, 1.84023),
        (0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817)),
    "CAM_FRONT": SensorCalibration(
        "CAM_FRONT", "camera", (1.70079118954, 0.0159456324149, 1.51095763913),
        (0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755),
        1266.417203046554, (816.2670197447984, 491.50706579294757)),
    "CAM_FRONT_RIGHT": SensorCalibration(
        "CAM_FRONT_RIGHT", "camera", (1.5508477543, -0.493404796419, 1.49574800619),
        (0.2060347966337182, -0.2026940577919598, 0.6824507824531167, -0.6713610884174485),
        1260.8474446004698, (807.968244525554, 495.3344268742088)),
    "CAM_FRONT_LEFT": SensorCalibration(
        "CAM_FRONT_LEFT", "camera", (1.52387798135, 0.494631336551, 1.50932822144),
        (0.6757265034669446, -0.6736266522251881, 0.21214015046209478, -0.21122827103904068),
        1272.5979470598488, (826.6154927353808, 479.75165386361925)),
    "CAM_BACK": SensorCalibration(
        "CAM_BACK", "camera", (0.0283260309358, 0.00345136761476, 1.57910346144),
        (0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578),
        809.2209905677063, (829.2196003259838, 481.77842384512485)),
    "CAM_BACK_LEFT": SensorCalibration(
        "CAM_BACK_LEFT", "camera", (1.03569100218, 0.484795032713, 1.59097014818),
        (0.6924185592174665, -0.7031619420114925, -0.11648342771943819, 0.11203317912370753),
        1256.7414812095406, (792.1125740759628, 492.7757465151356)),
    "CAM_BACK_RIGHT": SensorCalibration(
        "CAM_BACK_RIGHT", "camera", (1.0148780988, -0.480568219723, 1.56239545128),
        (0.12280980120078765, -0.132400842670559, -0.7004305821388234, 0.690496031265798),
        1259.5137405846733, (807.2529053838625, 501.19579884916527)),
}

# The ego vehicle's footprint in its own frame (a Renault Zoe: about 4.1 m x 1.7 m, rear axle 0.8 m from the back),
# as (centre x, centre y, length, width); objects are kept clear of it at every LiDAR timestamp.
EGO_FOOTPRINT: tuple[float, float, float, float] = (1.25, 0.0, 4.1, 1.8)


def rig_variant(index: int) -> dict[str, SensorCalibration]:
    """The rig of car `index`: car 0 is the calibration above; every other car has its own, as each nuScenes log's
    car was calibrated on its own: every sensor moved by up to 3 cm and turned by up to 0.6 degrees about each
    axis, every camera's focal length changed by up to 1.5% and its principal point by up to 6 px. Drawn from
    a fixed generator per car, so car k has the same rig in every dataroot."""
    if index == 0:
        return RIG
    rng = np.random.default_rng([20260, index])
    out = {}
    for channel, calibration in RIG.items():
        angles = np.deg2rad(rng.uniform(-0.6, 0.6, size=3))
        half = angles / 2
        # small rotation about x, y, z composed as one quaternion (w, x, y, z), applied after the sensor's own
        qx = np.array([np.cos(half[0]), np.sin(half[0]), 0, 0])
        qy = np.array([np.cos(half[1]), 0, np.sin(half[1]), 0])
        qz = np.array([np.cos(half[2]), 0, 0, np.sin(half[2])])
        turn = _quaternion_product(qz, _quaternion_product(qy, qx))
        rotation = _quaternion_product(turn, np.asarray(calibration.rotation))
        translation = np.asarray(calibration.translation) + rng.uniform(-0.03, 0.03, size=3)
        focal, principal = calibration.focal, calibration.principal_point
        if focal is not None:
            focal = float(focal * (1.0 + rng.uniform(-0.015, 0.015)))
            principal = tuple(float(v) for v in np.asarray(principal) + rng.uniform(-6.0, 6.0, size=2))
        out[channel] = SensorCalibration(channel, calibration.modality, tuple(float(v) for v in translation),
                                         tuple(float(v) for v in rotation / np.linalg.norm(rotation)), focal, principal)
    return out


def _quaternion_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b of quaternions (w, x, y, z)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])

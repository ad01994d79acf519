"""`DataConfig`: where the nuScenes-format data lives and how a key frame is turned into a `Sample`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

# nuScenes camera order used by BEVDet-family models (and therefore by the student's camera index).
CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT",
)

# Columns of a loaded point per `DataConfig.point_features`.
POINT_DIMS = {"lidar": 5, "mvp": 17}

# The crop of a DataConfig whose range is given neither by itself nor by an experiment config's model: mmdet3d's
# nuScenes LiDAR range (x_min, y_min, z_min, x_max, y_max, z_max).
DEFAULT_POINT_CLOUD_RANGE: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


@dataclass
class DataConfig:
    """Dataset location, point/image loading and the augmentation ranges (BEVDet / CenterPoint recipes)."""

    # Keys a config written by an earlier version (a run's config.yaml) may hold, with the only value that remains:
    # `load_config` ignores them; any other value is a ConfigError. The crop always runs after the BEV augmentation.
    RETIRED_KEYS: ClassVar[dict[str, object]] = {"range_filter": "after_bev_augmentation"}

    dataroot: str = "data/nuscenes"  # folder holding <version>/, samples/, sweeps/, maps/
    version: str = "v1.0-trainval"  # table folder name under dataroot, e.g. v1.0-mini, v1.0-synthetic
    train_split: str = "train"  # predefined devkit split name or a custom name from <version>/splits.json
    val_split: str = "val"  # split evaluated after training
    # The split index every process maps (pipeline/data/index_store.py): built once per dataroot, split and
    # loading parameters, saved as raw arrays, rebuilt when a source table changes.
    infos: str = ""  # folder of mmdet3d's nuscenes_infos_{train,val}.pkl to build it from; "" = the devkit tables
    index_dir: str = ""  # where it is saved; "" = <dataroot>/.distillbev/index when writable, else
    # $XDG_CACHE_HOME/distillbev/index (~/.cache/distillbev/index)
    seed: int = 0  # train-mode draws use numpy default_rng(seed + epoch * len(dataset) + index)

    # LiDAR
    num_sweeps: int = 9  # previous LIDAR_TOP sweeps added to the key frame (10 frames in total)
    sweep_candidates: int = 10  # train mode picks num_sweeps of this many nearest previous sweeps (mmdet3d)
    sweep_min_distance: float = 1.0  # sweep points with |x| and |y| below this (own sensor frame) are dropped
    pad_empty_sweeps: bool = True  # a key frame with no previous sweep repeats itself num_sweeps times (mmdet3d)
    point_features: str = "lidar"  # "lidar": 5-dim x, y, z, intensity, time lag; "mvp": MVP's 17-dim points with
    # the virtual points of `distillbev make-virtual-points` (or MVP's released files), docs/mvp.md
    point_cloud_range: tuple[float, float, float, float, float, float] | None = None
    # x_min, y_min, z_min, x_max, y_max, z_max in the key-frame LiDAR frame; points are cropped after the BEV aug.
    # Not given: the model's range in an experiment config (`with_model_range`: a teacher's model.point_cloud_range,
    # a student's model.lidar_range), DEFAULT_POINT_CLOUD_RANGE on its own; filled in at construction

    # Cameras
    load_images: bool = True  # False for LiDAR-only consumers (the teacher)
    camera_channels: tuple[str, ...] = CAMERA_CHANNELS  # image order of CameraInputs
    final_size: tuple[int, int] = (256, 704)  # (H, W) fed to the image network
    resize_lim: tuple[float, float] = (-0.06, 0.11)  # train: added to the base scale final_W / image_W
    crop_h_lim: tuple[float, float] = (0.0, 0.0)  # fraction of the resized height kept below the crop (BEVDet)
    rot_lim: tuple[float, float] = (-5.4, 5.4)  # train: image rotation in degrees
    image_flip: bool = True  # train: flip each image horizontally with probability 0.5
    load_previous_frame: bool = False  # also load an adjacent frame's cameras (4D students)
    # The 4D adjacent frame, as BEVDet4D's sequential infos: candidate a is the reference camera's (CAM_FRONT)
    # record number (a + 1) * adjacent_interval - 1 counted back from the key frame, the other cameras nearest in
    # time to it; train draws a uniformly from [adjacent_train_range), test takes adjacent_test_candidate (the
    # DistillBEV BEVDepth4D recipe: interval 3 at 12 Hz, [2, 9), 5). With camera records at key frames only (the
    # synthetic world) interval 1 and candidate 0 is the previous key frame.
    adjacent_interval: int = 1
    adjacent_train_range: tuple[int, int] = (0, 1)
    adjacent_test_candidate: int = 0

    # BEV augmentation (train mode), applied identically to points and GT boxes
    bev_rotation_lim: tuple[float, float] = (-0.3925, 0.3925)  # radians
    bev_scale_lim: tuple[float, float] = (0.95, 1.05)
    bev_flip_x_prob: float = 0.5  # mirror y -> -y
    bev_flip_y_prob: float = 0.5  # mirror x -> -x
    train_drop_out_of_range_boxes: bool = True  # train: drop GT whose centre leaves the x/y range after aug

    def __post_init__(self) -> None:
        # whether the range was given, so an experiment config knows to put its model's range in its place
        self.point_cloud_range_given = self.point_cloud_range is not None
        if self.point_cloud_range is None:
            self.point_cloud_range = DEFAULT_POINT_CLOUD_RANGE
        if len(self.point_cloud_range) != 6 or not (self.point_cloud_range[0] < self.point_cloud_range[3]
                                                    and self.point_cloud_range[1] < self.point_cloud_range[4]
                                                    and self.point_cloud_range[2] < self.point_cloud_range[5]):
            raise ValueError(f"point_cloud_range must be (x_min, y_min, z_min, x_max, y_max, z_max) with min < max, "
                             f"found {self.point_cloud_range}")
        if self.num_sweeps < 0 or self.sweep_candidates < self.num_sweeps:
            raise ValueError(f"need 0 <= num_sweeps <= sweep_candidates, found {self.num_sweeps} and "
                             f"{self.sweep_candidates}")
        if self.point_features not in POINT_DIMS:
            raise ValueError(f"point_features must be one of {sorted(POINT_DIMS)}, found {self.point_features!r}")
        low, high = self.adjacent_train_range
        if self.adjacent_interval < 1 or not 0 <= low < high or self.adjacent_test_candidate < 0:
            raise ValueError(f"need adjacent_interval >= 1, 0 <= adjacent_train_range[0] < adjacent_train_range[1] "
                             f"and adjacent_test_candidate >= 0, found {self.adjacent_interval}, "
                             f"{self.adjacent_train_range} and {self.adjacent_test_candidate}")
        if len(self.final_size) != 2 or min(self.final_size) <= 0:
            raise ValueError(f"final_size must be (H, W) with positive values, found {self.final_size}")

    def with_model_range(self, point_cloud_range: tuple[float, ...]) -> "DataConfig":
        """This config cropping to the model's `point_cloud_range` when no range was given to it, else itself."""
        if self.point_cloud_range_given:
            return self
        return dataclasses.replace(self, point_cloud_range=tuple(float(v) for v in point_cloud_range))

    @property
    def point_dims(self) -> int:
        """Columns of a loaded point: 5 (x, y, z, intensity, time lag) or 17 (MVP)."""
        return POINT_DIMS[self.point_features]

    @property
    def adjacent_candidates(self) -> int:
        """Adjacent-frame candidates a split index needs per sample (0 without a previous frame)."""
        if not (self.load_images and self.load_previous_frame):
            return 0
        return max(self.adjacent_train_range[1], self.adjacent_test_candidate + 1)

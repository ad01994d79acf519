"""`NuScenesDetectionDataset`: one key frame of a nuScenes-format dataroot as a `Sample`, through the devkit.

Real nuScenes and the synthetic dataroot go through exactly the same code. Everything is expressed in the
key-frame LIDAR_TOP frame; BEV augmentation is applied identically to points and GT boxes (cameras keep their
un-augmented `camera_to_lidar` and carry the augmentation in `Sample.bev_aug`), and the point range filter comes
after it, on the augmented cloud.

GT filtering follows the devkit's detection eval: only the 10 detection classes, and boxes with
num_lidar_pts + num_radar_pts == 0 are dropped in BOTH modes (the eval drops them from its GT, so keeping them in
test mode would turn GT-as-prediction into false positives).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import DataError
from ..geometry.bev import BEVAugmentation, sample_bev_augmentation
from ..geometry.transforms import invert_transform, quaternion_to_matrix
from .classes import ATTRIBUTE_ID, CLASS_ID, NO_ATTRIBUTE, category_to_class
from .config import DataConfig
from .loading import (crop_points, decode_image, load_lidar_points, load_nuscenes, open_image,
                      sample_data_transforms, sample_image_augmentation, split_sample_tokens)
from .types import CameraInputs, Sample


class NuScenesDetectionDataset(torch.utils.data.Dataset):
    """Key frames of one split. `dataset[i]` draws train-mode augmentation; `get` replays an exact view."""

    def __init__(self, config: DataConfig, split: str, mode: Literal["train", "test"], nusc=None) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', found {mode!r}")
        self.config = config
        self.split = split
        self.mode = mode
        self.nusc = nusc if nusc is not None else load_nuscenes(config.dataroot, config.version)
        self.epoch = 0
        self.sample_tokens: list[str] = split_sample_tokens(self.nusc, split)
        self._index = {token: i for i, token in enumerate(self.sample_tokens)}
        self._attribute_names = {record["token"]: record["name"] for record in self.nusc.attribute}

    # ------------------------------------------------------------------------------------------- indexing
    def __len__(self) -> int:
        return len(self.sample_tokens)

    def index_of(self, token: str) -> int:
        """Position of a sample token in this split."""
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"sample token {token!r} is not in split {self.split!r}") from None

    def set_epoch(self, epoch: int) -> None:
        """Train-mode draws depend on the epoch so every epoch sees new views (set it before each epoch)."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        """The train-mode generator of `index` in the current epoch (independent of DataLoader workers)."""
        return np.random.default_rng(self.config.seed + self.epoch * len(self) + index)

    def __getitem__(self, index: int) -> Sample:
        return self.get(index)

    # --------------------------------------------------------------------------------------------- records
    def _sample(self, index: int) -> dict:
        return self.nusc.get("sample", self.sample_tokens[index])

    def _sample_data(self, sample: dict, channel: str) -> dict:
        if channel not in sample["data"]:
            raise DataError(f"{self.config.dataroot}: sample {sample['token']} has no key-frame {channel} "
                            f"sample_data; every sample needs LIDAR_TOP and the configured cameras")
        return self.nusc.get("sample_data", sample["data"][channel])

    def poses(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(lidar_to_ego, ego_to_global) 4x4 float64 of the key-frame LIDAR_TOP sample_data."""
        return sample_data_transforms(self.nusc, self._sample_data(self._sample(index), "LIDAR_TOP"))

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Un-augmented GT in the key-frame LiDAR frame: boxes (K, 9) float64, labels (K,), attributes (K,)."""
        sample = self._sample(index)
        lidar_to_ego, ego_to_global = self.poses(index)
        lidar_from_global = invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
        rotation = lidar_from_global[:3, :3]
        boxes, labels, attributes = [], [], []
        for token in sample["anns"]:
            ann = self.nusc.get("sample_annotation", token)
            name = category_to_class(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue
            centre = rotation @ np.asarray(ann["translation"], dtype=np.float64) + lidar_from_global[:3, 3]
            box_axes = rotation @ quaternion_to_matrix(ann["rotation"])
            yaw = np.arctan2(box_axes[1, 0], box_axes[0, 0])
            width, length, height = ann["size"]
            velocity = np.nan_to_num(self.nusc.box_velocity(token), nan=0.0)  # global (3,)
            velocity = rotation @ velocity
            boxes.append([*centre, length, width, height, yaw, velocity[0], velocity[1]])
            labels.append(CLASS_ID[name])
            attribute_tokens = ann["attribute_tokens"]
            attributes.append(ATTRIBUTE_ID.get(self._attribute_names.get(attribute_tokens[0], ""), NO_ATTRIBUTE)
                              if attribute_tokens else NO_ATTRIBUTE)
        return (np.asarray(boxes, dtype=np.float64).reshape(-1, 9), np.asarray(labels, dtype=np.int64),
                np.asarray(attributes, dtype=np.int64))

    # ---------------------------------------------------------------------------------------------- views
    def get(self, index: int, bev_aug: BEVAugmentation | None = None, with_images: bool | None = None,
            rng: np.random.Generator | None = None) -> Sample:
        """The sample at `index`.

        Train mode draws (in this order) the BEV augmentation unless `bev_aug` is given, the sweep choice and the
        image augmentations from `rng` (default: `rng_for(index)`). Test mode draws nothing: identity BEV
        augmentation unless `bev_aug` is given, nearest sweeps, deterministic resize/crop.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        config = self.config
        if self.mode == "train":
            rng = rng if rng is not None else self.rng_for(index)
        else:
            rng = None
        if bev_aug is None:
            bev_aug = BEVAugmentation() if rng is None else sample_bev_augmentation(
                rng, config.bev_rotation_lim, config.bev_scale_lim, config.bev_flip_x_prob, config.bev_flip_y_prob)
        with_images = config.load_images if with_images is None else with_images

        sample = self._sample(index)
        lidar_to_ego, ego_to_global = self.poses(index)
        points = load_lidar_points(self.nusc, sample["token"], config, rng)
        if not bev_aug.is_identity:
            points = bev_aug.apply_points(points)
        # the camera students' depth targets: every key-frame point, not only those inside the crop
        depth_points = points[points[:, 4] == 0] if with_images else None  # (P_key, 5)
        # the range filter runs after the BEV augmentation (as the reference pipelines do): a rotated view keeps
        # every point that lands inside the range, so no wedge of the augmented grid is left empty
        points = crop_points(points, config.point_cloud_range)  # (P, 5)

        boxes, labels, attributes = self.annotations(index)
        boxes = bev_aug.apply_boxes(boxes)  # (K, 9)
        if self.mode == "train" and config.train_drop_out_of_range_boxes:
            pcr = config.point_cloud_range
            keep = (boxes[:, 0] >= pcr[0]) & (boxes[:, 0] < pcr[3]) & (boxes[:, 1] >= pcr[1]) & (boxes[:, 1] < pcr[4])
            boxes, labels, attributes = boxes[keep], labels[keep], attributes[keep]

        cameras = prev_cameras = prev_lidar_to_lidar = None
        if with_images:
            cameras, augmentations = self._load_cameras(sample, lidar_to_ego, ego_to_global, rng)
            if config.load_previous_frame:
                prev_cameras, prev_lidar_to_lidar = self._load_previous(sample, lidar_to_ego, ego_to_global,
                                                                        augmentations)
        return Sample(
            sample_token=sample["token"],
            timestamp=int(sample["timestamp"]),
            points=torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)),
            depth_points=None if depth_points is None else
            torch.from_numpy(np.ascontiguousarray(depth_points, dtype=np.float32)),
            cameras=cameras,
            gt_boxes=torch.from_numpy(boxes.astype(np.float32)),
            gt_labels=torch.from_numpy(labels),
            gt_attributes=torch.from_numpy(attributes),
            bev_aug=torch.from_numpy(bev_aug.matrix().astype(np.float32)),
            lidar_to_ego=lidar_to_ego,
            ego_to_global=ego_to_global,
            prev_cameras=prev_cameras,
            prev_lidar_to_lidar=prev_lidar_to_lidar,
        )

    def _load_cameras(self, sample: dict, lidar_to_ego: np.ndarray, ego_to_global: np.ndarray,
                      rng: np.random.Generator | None, augmentations: list | None = None) -> tuple[CameraInputs, list]:
        """The configured cameras of `sample`; camera_to_lidar goes through the ego pose at each camera's time."""
        lidar_from_global = invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
        images, intrinsics, camera_to_lidar, image_aug, used = [], [], [], [], []
        for k, channel in enumerate(self.config.camera_channels):
            record = self._sample_data(sample, channel)
            calibration = self.nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
            camera_to_ego, camera_ego_to_global = sample_data_transforms(self.nusc, record)
            path = f"{self.nusc.dataroot}/{record['filename']}"
            with open_image(path, sample["token"]) as image:
                augmentation = augmentations[k] if augmentations is not None else \
                    sample_image_augmentation(self.config, image.size, rng)
                images.append(decode_image(image, augmentation, path, sample["token"]))
            intrinsics.append(np.asarray(calibration["camera_intrinsic"], dtype=np.float64))
            camera_to_lidar.append(lidar_from_global @ camera_ego_to_global @ camera_to_ego)
            image_aug.append(augmentation.matrix())
            used.append(augmentation)
        cameras = CameraInputs(
            images=torch.from_numpy(np.stack(images)),  # (N, 3, H, W)
            intrinsics=torch.from_numpy(np.stack(intrinsics).astype(np.float32)),  # (N, 3, 3)
            camera_to_lidar=torch.from_numpy(np.stack(camera_to_lidar).astype(np.float32)),  # (N, 4, 4)
            image_aug=torch.from_numpy(np.stack(image_aug).astype(np.float32)),  # (N, 3, 3)
            channels=tuple(self.config.camera_channels),
        )
        return cameras, used

    def _load_previous(self, sample: dict, lidar_to_ego: np.ndarray, ego_to_global: np.ndarray,
                       augmentations: list) -> tuple[CameraInputs, torch.Tensor]:
        """The previous key frame's cameras (same image augmentation) and prev-LiDAR -> current-LiDAR.

        The first sample of a scene uses itself as its previous frame (as BEVDet4D does).
        """
        previous = self.nusc.get("sample", sample["prev"]) if sample["prev"] else sample
        prev_lidar_to_ego, prev_ego_to_global = sample_data_transforms(
            self.nusc, self._sample_data(previous, "LIDAR_TOP"))
        cameras, _ = self._load_cameras(previous, prev_lidar_to_ego, prev_ego_to_global, None, augmentations)
        prev_to_current = (invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
                           @ prev_ego_to_global @ prev_lidar_to_ego)
        return cameras, torch.from_numpy(prev_to_current.astype(np.float32))

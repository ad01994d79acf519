"""`NuScenesDetectionDataset`: one key frame of a nuScenes-format dataroot as a `Sample`.

Real nuScenes and the synthetic dataroot go through exactly the same code. The devkit tables are read once into a
flat `SplitIndex` (`data/index.py`), saved, and mapped by every process that opens the split
(`data/index_store.py`), so ranks and DataLoader workers share the index's pages instead of each growing a copy of
the devkit's dicts. Everything is expressed in the key-frame LIDAR_TOP
frame; BEV augmentation is applied identically to points and GT boxes (cameras keep their un-augmented
`camera_to_lidar` and carry the augmentation in `Sample.bev_aug`), and the point range filter comes after it, on the
augmented cloud.

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
from ..geometry.transforms import invert_transform, make_transform
from .config import DataConfig
from .digest import InputDigests
from .index import FrameTable, SplitIndex, build_split_index, key_frame_lidar, load_lidar_points
from .index_store import open_split_index
from .loading import crop_points, decode_image, load_nuscenes, open_image, sample_image_augmentation
from .types import CameraInputs, Sample


class NuScenesDetectionDataset(torch.utils.data.Dataset):
    """Key frames of one split. `dataset[i]` draws train-mode augmentation; `get` replays an exact view.

    Reads the split's saved index (`index_store.open_split_index`: mapped read-only, built and saved on first use
    from the devkit tables or `config.infos`), or a ready `index`; a given devkit `nusc` builds one in memory
    instead (used for the index only and not kept).
    """

    def __init__(self, config: DataConfig, split: str, mode: Literal["train", "test"], nusc=None,
                 index: SplitIndex | None = None) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', found {mode!r}")
        self.config = config
        self.split = split
        self.mode = mode
        self.epoch = 0
        channels = tuple(config.camera_channels) if config.load_images else ()
        adjacent = config.adjacent_candidates
        if index is None and nusc is None:
            index = open_split_index(config, split)  # mapped from its saved folder, built there once
        elif index is None:
            index = build_split_index(nusc, split, config.sweep_candidates, channels, adjacent,
                                      config.adjacent_interval)
        elif index.split != split or index.camera_channels != channels \
                or index.sweeps.files.shape[1] < config.sweep_candidates or index.adjacent.files.shape[1] < adjacent \
                or (adjacent and index.adjacent_interval != config.adjacent_interval):
            raise DataError(f"the split index of {index.split!r} (cameras {list(index.camera_channels)}, "
                            f"{index.sweeps.files.shape[1]} sweep candidates, {index.adjacent.files.shape[1]} adjacent "
                            f"every {index.adjacent_interval}) does not fit split {split!r} with cameras "
                            f"{list(channels)}, {config.sweep_candidates} sweep candidates and {adjacent} adjacent "
                            f"every {config.adjacent_interval}; rebuild it")
        self.index = index
        self.sample_tokens: list[str] = [token.decode() for token in index.tokens]
        self._position = {token: i for i, token in enumerate(self.sample_tokens)}

    # ------------------------------------------------------------------------------------------- indexing
    def __len__(self) -> int:
        return len(self.sample_tokens)

    def index_of(self, token: str) -> int:
        """Position of a sample token in this split."""
        try:
            return self._position[token]
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

    def devkit(self):
        """A fresh devkit `NuScenes` of this dataset's dataroot (for the detection eval; not kept)."""
        return load_nuscenes(self.index.dataroot, self.index.version)

    # --------------------------------------------------------------------------------------------- records
    def poses(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(lidar_to_ego, ego_to_global) 4x4 float64 of the key-frame LIDAR_TOP sample_data."""
        return self.index.transforms(self.index.lidar, index)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Un-augmented GT in the key-frame LiDAR frame: boxes (K, 9) float64, labels (K,), attributes (K,)."""
        return self.index.annotations(index)

    # ---------------------------------------------------------------------------------------------- views
    def get(self, index: int, bev_aug: BEVAugmentation | None = None, with_images: bool | None = None,
            rng: np.random.Generator | None = None, digests: InputDigests | None = None) -> Sample:
        """The sample at `index`.

        Train mode draws (in this order) the BEV augmentation unless `bev_aug` is given, the sweep choice and the
        image augmentations and the adjacent frame from `rng` (default: `rng_for(index)`). Test mode draws nothing:
        identity BEV augmentation unless `bev_aug` is given, nearest sweeps, deterministic resize/crop.
        `with_images=False` skips the cameras of a dataset that loads them (e.g. the teacher's points only).
        `digests` records the SHA-256 of each LiDAR (and virtual-point) file as it is read (`data/digest.py`).
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
        if with_images and not self.index.camera_channels:
            raise ValueError("with_images=True needs a dataset built with data.load_images (its index has no cameras)")

        lidar_to_ego, ego_to_global = self.poses(index)
        points = load_lidar_points(self.index, index, config, rng, digests)
        if not bev_aug.is_identity:
            points = bev_aug.apply_points(points)
        # the camera students' depth targets: every key-frame point, not only those inside the crop
        depth_points = key_frame_lidar(points) if with_images else None  # (P_key, 5)
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
            lidar_from_global = invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
            cameras, augmentations = self._load_cameras(self.index.cameras, (index,), lidar_from_global, index, rng)
            if config.load_previous_frame:
                prev_cameras, prev_lidar_to_lidar = self._load_adjacent(index, lidar_to_ego, lidar_from_global,
                                                                        augmentations, rng)
        return Sample(
            sample_token=self.sample_tokens[index],
            timestamp=int(self.index.timestamps[index]),
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

    def _load_cameras(self, table: FrameTable, where: tuple[int, ...], lidar_from_global: np.ndarray, index: int,
                      rng: np.random.Generator | None, augmentations: list | None = None) -> tuple[CameraInputs, list]:
        """The cameras of `table[where]` (one record per configured camera) in the LiDAR frame `lidar_from_global`;
        camera_to_lidar goes through the ego pose at each camera's own time."""
        token = self.sample_tokens[index]
        images, intrinsics, camera_to_lidar, image_aug, used = [], [], [], [], []
        for k in range(len(self.index.camera_channels)):
            camera_to_ego, camera_ego_to_global = self.index.transforms(table, *where, k)
            path = self.index.path(table, *where, k)
            with open_image(path, token) as image:
                augmentation = augmentations[k] if augmentations is not None else \
                    sample_image_augmentation(self.config, image.size, rng)
                images.append(decode_image(image, augmentation, path, token))
            intrinsics.append(self.index.intrinsics[table.calibration[(*where, k)]])
            camera_to_lidar.append(lidar_from_global @ camera_ego_to_global @ camera_to_ego)
            image_aug.append(augmentation.matrix())
            used.append(augmentation)
        cameras = CameraInputs(
            images=torch.from_numpy(np.stack(images)),  # (N, 3, H, W)
            intrinsics=torch.from_numpy(np.stack(intrinsics).astype(np.float32)),  # (N, 3, 3)
            camera_to_lidar=torch.from_numpy(np.stack(camera_to_lidar).astype(np.float32)),  # (N, 4, 4)
            image_aug=torch.from_numpy(np.stack(image_aug).astype(np.float32)),  # (N, 3, 3)
            channels=tuple(self.index.camera_channels),
        )
        return cameras, used

    def adjacent_choice(self, index: int, rng: np.random.Generator | None) -> int:
        """The adjacent-frame candidate of sample `index` (-1: none, the frame is its own previous frame).

        As BEVDet4D's dataset: train draws uniformly from [low, min(high, count)) of the `count` candidates, or
        takes the last one when count <= low; test takes min(adjacent_test_candidate, count - 1). A single-choice
        train range draws nothing.
        """
        count = int(self.index.adjacent_counts[index])
        if count == 0:
            return -1
        low, high = self.config.adjacent_train_range
        if rng is None:
            return min(self.config.adjacent_test_candidate, count - 1)
        if count <= low:
            return count - 1
        high = min(high, count)
        return low if high - low == 1 else int(rng.integers(low, high))

    def _load_adjacent(self, index: int, lidar_to_ego: np.ndarray, lidar_from_global: np.ndarray, augmentations: list,
                       rng: np.random.Generator | None) -> tuple[CameraInputs, torch.Tensor]:
        """The adjacent frame's cameras (same image augmentation) in its own LiDAR frame, and that frame -> the
        current LiDAR frame.

        The adjacent LiDAR frame is the current LiDAR calibration on the ego pose of the reference camera's record
        (the reference anchors the adjacent frame on CAM_FRONT's ego pose). The first sample of a scene uses itself
        as its previous frame, with the identity transform (as BEVDet4D does).
        """
        choice = self.adjacent_choice(index, rng)
        if choice < 0:
            cameras, _ = self._load_cameras(self.index.cameras, (index,), lidar_from_global, index, None,
                                            augmentations)
            return cameras, torch.eye(4)
        table = self.index.adjacent
        pose = table.ego_pose[index, choice, self.index.reference_camera]
        adjacent_lidar_to_global = make_transform(pose[:4], pose[4:]) @ lidar_to_ego
        cameras, _ = self._load_cameras(table, (index, choice), invert_transform(adjacent_lidar_to_global), index,
                                        None, augmentations)
        adjacent_to_current = lidar_from_global @ adjacent_lidar_to_global
        return cameras, torch.from_numpy(adjacent_to_current.astype(np.float32))

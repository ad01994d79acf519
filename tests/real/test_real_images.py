"""The six real 1600x900 JPEGs through the student's 256x704 image augmentation (test mode and train draws).

A 3-D point is followed from the camera frame to the augmented image: the centre of an annotated box, in the
camera frame as mmdet3d's info file gives it, projected with the camera intrinsics, is marked on a copy of the
image by a small disc; the marked and the plain copies go through the same augmentation, and the centroid of the
disc in the difference of the two outputs must lie within a pixel of where the recorded augmentation matrix maps the
projected point.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from real_keyframe import CAMERA_FILES, IMAGE_SIZE, camera_path, read_info

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.loading import ImageAugmentation, decode_image, open_image, sample_image_augmentation

FINAL_SIZE = (256, 704)  # (H, W) of the student (configs/nuscenes/student_bevdet.yaml)
DISC_RADIUS = 14.0  # [original pixels]: about 6 pixels across after the 0.44 resize
MARGIN = 16.0  # [augmented pixels] the marked point stays this far inside the output
TRAIN_SEEDS = {"CAM_FRONT": 3, "CAM_FRONT_RIGHT": 4, "CAM_FRONT_LEFT": 5, "CAM_BACK": 6, "CAM_BACK_LEFT": 7,
               "CAM_BACK_RIGHT": 8}


@pytest.fixture(scope="module")
def info() -> dict:
    return read_info()[1]


def box_centre_pixels(info: dict, channel: str) -> np.ndarray:
    """(K, 2) pixels of the camera's annotated box centres: camera-frame centre projected with cam2img."""
    intrinsics = np.asarray(info["images"][channel]["cam2img"], dtype=np.float64)[:3, :3]
    centres = np.array([instance["bbox_3d"][:3] for instance in info["cam_instances"][channel]], dtype=np.float64)
    projected = centres @ intrinsics.T  # (K, 3)
    pixels = projected[:, :2] / projected[:, 2:3]
    recorded = np.array([instance["center_2d"] for instance in info["cam_instances"][channel]])
    assert np.abs(pixels - recorded).max() < 1e-2  # the projection is mmdet3d's center_2d
    return pixels


def augmented(matrix: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(K, 2) pixels mapped by a (3, 3) augmentation matrix."""
    return (np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1) @ matrix.T)[:, :2]


def pick_point(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The box centre inside the original image whose augmented pixel is farthest from the output's borders."""
    width, height = IMAGE_SIZE
    final_h, final_w = FINAL_SIZE
    target = augmented(matrix, pixels)
    inside = (pixels[:, 0] > DISC_RADIUS) & (pixels[:, 0] < width - DISC_RADIUS) \
        & (pixels[:, 1] > DISC_RADIUS) & (pixels[:, 1] < height - DISC_RADIUS)
    room = np.minimum.reduce([target[:, 0], final_w - target[:, 0], target[:, 1], final_h - target[:, 1]])
    room[~inside] = -np.inf
    best = int(np.argmax(room))
    assert room[best] > MARGIN, "no annotated box centre lands well inside the augmented image"
    return pixels[best]


def marked_copy(path, point: np.ndarray, out) -> None:
    """Save the image with a disc of DISC_RADIUS around `point` (pixel-edge coordinates) as a near-lossless JPEG."""
    pixels = np.asarray(Image.open(path).convert("RGB")).copy()
    rows, cols = np.mgrid[:pixels.shape[0], :pixels.shape[1]]
    disc = (cols + 0.5 - point[0]) ** 2 + (rows + 0.5 - point[1]) ** 2 <= DISC_RADIUS ** 2
    # the disc contrasts with what it covers
    pixels[disc] = 0 if pixels[disc].mean() > 127 else 255
    Image.fromarray(pixels).save(out, quality=100, subsampling=0)


def disc_centroid(plain: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """(2,) pixel-edge centroid of where two (3, H, W) outputs differ strongly."""
    difference = np.abs(marked - plain).sum(axis=0)  # (H, W)
    weight = np.where(difference > 0.5 * difference.max(), difference, 0.0)
    rows, cols = np.nonzero(weight)
    w = weight[rows, cols]
    return np.array([np.sum((cols + 0.5) * w), np.sum((rows + 0.5) * w)]) / w.sum()


def follow_point(tmp_path, info: dict, channel: str, rng: np.random.Generator | None) -> tuple[ImageAugmentation,
                                                                                              np.ndarray, np.ndarray]:
    """(augmentation, centroid of the marked box centre in the output, where its matrix maps that centre)."""
    config = DataConfig(final_size=FINAL_SIZE)
    augmentation = sample_image_augmentation(config, IMAGE_SIZE, rng)
    matrix = augmentation.matrix()
    point = pick_point(box_centre_pixels(info, channel), matrix)
    plain_path, marked_path = tmp_path / f"{channel}_plain.jpg", tmp_path / f"{channel}_marked.jpg"
    Image.open(camera_path(channel)).convert("RGB").save(plain_path, quality=100, subsampling=0)
    marked_copy(camera_path(channel), point, marked_path)
    outputs = []
    for path in (plain_path, marked_path):
        with open_image(path, "sample") as image:
            outputs.append(decode_image(image, augmentation, path, "sample"))
    assert outputs[0].shape == (3, *FINAL_SIZE) and outputs[0].dtype == np.float32
    return augmentation, disc_centroid(*outputs), augmented(matrix, point[None])[0]


def test_the_test_mode_augmentation_of_a_real_image():
    """BEVDet's test-mode resize and crop, derived by hand: scale max(704/1600, 256/900) = 0.44 to 704x396, then
    the bottom 256 rows (crop_h_lim (0, 0)) at x 0."""
    augmentation = sample_image_augmentation(DataConfig(final_size=FINAL_SIZE), IMAGE_SIZE, None)
    assert augmentation == ImageAugmentation((1600, 900), (704, 396), (0, 140), (256, 704))
    assert np.allclose(augmentation.matrix(), [[0.44, 0, 0], [0, 0.44, -140], [0, 0, 1]])


@pytest.mark.parametrize("channel", list(CAMERA_FILES))
def test_the_six_jpegs_decode_to_the_student_input(channel):
    augmentation = sample_image_augmentation(DataConfig(final_size=FINAL_SIZE), IMAGE_SIZE, None)
    with open_image(camera_path(channel), "sample") as image:
        assert image.size == IMAGE_SIZE and image.format == "JPEG"
        pixels = decode_image(image, augmentation, camera_path(channel), "sample")
    assert pixels.shape == (3, 256, 704) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    # ImageNet normalisation of 0..255: every value lies in [(0 - 0.485) / 0.229, (1 - 0.406) / 0.225]
    assert pixels.min() >= -2.12 and pixels.max() <= 2.64 and pixels.std() > 0.3


@pytest.mark.parametrize("channel", list(CAMERA_FILES))
def test_a_projected_box_centre_lands_on_its_augmented_pixel_in_test_mode(tmp_path, info, channel):
    _, found, predicted = follow_point(tmp_path, info, channel, None)
    assert np.linalg.norm(found - predicted) < 1.0


@pytest.mark.parametrize("channel", list(CAMERA_FILES))
def test_a_projected_box_centre_lands_on_its_augmented_pixel_in_a_train_draw(tmp_path, info, channel):
    augmentation, found, predicted = follow_point(tmp_path, info, channel, np.random.default_rng(TRAIN_SEEDS[channel]))
    assert augmentation.rotation != 0.0 and augmentation.resize_dims != (704, 396)
    assert np.linalg.norm(found - predicted) < 1.0


def test_the_train_draws_cover_flips_and_both_rotation_signs():
    config = DataConfig(final_size=FINAL_SIZE)
    draws = [sample_image_augmentation(config, IMAGE_SIZE, np.random.default_rng(seed))
             for seed in TRAIN_SEEDS.values()]
    assert {d.flip for d in draws} == {True, False}
    assert min(d.rotation for d in draws) < 0 < max(d.rotation for d in draws)

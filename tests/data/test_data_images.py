"""The recorded image_aug matrix says where each original pixel lands in the decoded, augmented image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from distillbev.pipeline.data.loading import IMAGENET_MEAN, IMAGENET_STD, ImageAugmentation, decode_image, open_image


def marker_centroid(channels: np.ndarray) -> np.ndarray:
    """Centroid (pixel-edge coordinates) of the bright marker in a normalised (3, H, W) image."""
    red = channels[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to 0..1
    ys, xs = np.nonzero(red > 0.5)
    assert len(xs) > 0, "marker not visible"
    weights = red[ys, xs]
    return np.array([np.average(xs, weights=weights) + 0.5, np.average(ys, weights=weights) + 0.5])


@pytest.mark.parametrize("flip, rotation", [(False, 0.0), (True, 0.0), (False, 5.0), (True, -4.0)])
def test_marker_lands_where_image_aug_says(tmp_path, flip, rotation):
    width, height = 800, 448  # divisible by 8: the reduced-scale JPEG path is used
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[300:316, 200:216] = 255  # a 16x16 marker centred at (208, 308)
    path = tmp_path / "marker.png"
    Image.fromarray(pixels).save(path)
    aug = ImageAugmentation(source_size=(width, height), resize_dims=(400, 224), crop=(30, 60), final_size=(128, 320),
                            flip=flip, rotation=rotation)
    with open_image(path, "sample-x") as image:
        decoded = decode_image(image, aug, path, "sample-x")
    assert decoded.shape == (3, 128, 320) and decoded.dtype == np.float32
    expected = (aug.matrix() @ np.array([208.0, 308.0, 1.0]))[:2]
    np.testing.assert_allclose(marker_centroid(decoded), expected, atol=1.0)


def test_reduced_scale_jpeg_decode_matches_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, size=(9, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((1600, 900), Image.BILINEAR)  # smooth content, JPEG-friendly
    path = tmp_path / "smooth.jpg"
    image.save(path, quality=95)
    aug = ImageAugmentation((1600, 900), (352, 198), (0, 70), (128, 352))
    with open_image(path, "s") as opened:
        fast = decode_image(opened, aug, path, "s")
    full = np.asarray(Image.open(path).convert("RGB").resize((352, 198), Image.BILINEAR).crop((0, 70, 352, 198)),
                      dtype=np.float32)
    full = ((full / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert np.abs(fast - full).mean() < 0.05  # normalised units; 1/255/0.229 = 0.017 per grey level

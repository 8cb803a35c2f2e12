"""Issue 15, training images: 16-bit greyscale converted by its bit depth, tiny images warned about."""

import logging

import numpy as np
from PIL import Image

from mindflux.training.dataset import DreamBoothDataset, load_image


def test_16_bit_greyscale_is_scaled_by_its_bit_depth(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # a ramp over the whole 16-bit range
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    rgb = np.asarray(load_image(str(tmp_path / "grey16.png")))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    expected = np.round(ramp / 65535 * 255)
    assert np.abs(rgb[..., 0].astype(np.float64) - expected).max() <= 0.5  # not clipped to an all-white image
    assert rgb.min() == 0 and rgb.max() == 255 and 120 <= rgb.mean() <= 135


def test_images_under_half_the_resolution_are_warned_about(tmp_path, caplog):
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(tmp_path / "dot.png")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "fine.png")
    with caplog.at_level(logging.WARNING):
        DreamBoothDataset(str(tmp_path), "a photo", resolution=64, center_crop=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 image(s) are smaller than half the training size 64x64" in warnings[0]
    assert "dot.png (1x1)" in warnings[0] and "fine.png" not in warnings[0]

"""Files of any mode and format decode to uint8 HWC arrays with the configured 1 or 3 channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import decode_image, match_channels

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (10, 12), dtype=np.uint8)


def saved(path: Path, image: Image.Image, **options: object) -> Path:
    image.save(path, **options)
    return path


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_grayscale_file_gives_one_channel_or_three_equal_ones(tmp_path: Path, suffix: str) -> None:
    path = saved(tmp_path / f"gray.{suffix}", Image.fromarray(GRAY), **({"quality": 95} if suffix == "jpg" else {}))
    gray, rgb = decode_image(path, 1), decode_image(path, 3)
    assert gray.shape == (10, 12, 1) and rgb.shape == (10, 12, 3) and gray.dtype == rgb.dtype == np.uint8
    assert np.array_equal(rgb, np.repeat(gray, 3, axis=-1))
    if suffix == "png":
        assert np.array_equal(gray[..., 0], GRAY)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_rgb_file_gives_three_channels_or_pillows_luminance(tmp_path: Path, suffix: str) -> None:
    path = saved(tmp_path / f"rgb.{suffix}", Image.fromarray(RGB), **({"quality": 95} if suffix == "jpg" else {}))
    rgb, gray = decode_image(path, 3), decode_image(path, 1)
    assert rgb.shape == (10, 12, 3) and gray.shape == (10, 12, 1)
    assert np.array_equal(gray[..., 0], np.asarray(Image.open(path).convert("L")))
    if suffix == "png":
        assert np.array_equal(rgb, RGB)


def test_transparency_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)  # black everywhere; the left half fully transparent
    rgba[:, 2:, 3] = 255
    rgba[0, 0] = (0, 0, 0, 128)  # half transparent black → mid gray
    path = saved(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA"))
    rgb, gray = decode_image(path, 3), decode_image(path, 1)
    assert (rgb[1:, :2] == 255).all() and (rgb[:, 2:] == 0).all()
    assert 120 <= rgb[0, 0, 0] <= 135
    assert np.array_equal(gray[..., 0], rgb[..., 0])


def test_palette_with_a_transparent_colour_is_composited_too(tmp_path: Path) -> None:
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    path = saved(tmp_path / "palette.png", palette, transparency=0)
    assert decode_image(path, 3).tolist() == [[[255] * 3, [255, 0, 0]], [[255, 0, 0], [255] * 3]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    deep = np.array([[0, 257 * 100], [65535, 257 * 3]], np.uint16)
    path = saved(tmp_path / "deep.png", Image.fromarray(deep))
    assert decode_image(path, 1)[..., 0].tolist() == [[0, 100], [255, 3]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90° clockwise
    path = saved(tmp_path / "phone.jpg", Image.fromarray(RGB), exif=exif)
    assert decode_image(path, 3).shape == (12, 10, 3)


def test_array_stacks_convert_like_single_images() -> None:
    stack = np.stack([RGB, RGB[::-1]])
    gray = match_channels(stack, 1)
    assert gray.shape == (2, 10, 12, 1)
    assert np.array_equal(gray[1, ..., 0], np.asarray(Image.fromarray(RGB[::-1].copy()).convert("L")))
    assert match_channels(gray, 3).shape == (2, 10, 12, 3) and match_channels(stack, 3) is stack

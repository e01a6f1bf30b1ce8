"""Pixels from an image file: uint8 HWC arrays with the channel count the model is built for.

Every source ends in `match_channels`, so grayscale ↔ RGB conversion is defined once:
- gray → 3 channels repeats the gray value;
- RGB → 1 channel is the ITU-R 601-2 luma, with Pillow's integer weights, so an array converted here
  equals the same image converted by `PIL.Image.convert("L")`;
- transparency (RGBA, LA, palette with a transparent colour) is composited onto white. Dropping alpha
  instead would expose whatever colour the transparent pixels happen to store — often black, so a black
  drawing on a transparent background would vanish; white is how the image looks on a page or in a viewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

CHANNEL_COUNTS = (1, 3)
# Pillow refuses to open an image of more pixels than this (2 × Image.MAX_IMAGE_PIXELS, its guard against
# decompression bombs: small files that decode to gigabytes), and warns above half of it.
PILLOW_MAX_PIXELS = 178_956_970
LUMA_WEIGHTS = (19595, 38470, 7471)  # Pillow's ITU-R 601-2 weights, in 1/65536 (sum 65536)
WHITE = (255, 255, 255, 255)
GRAY_MODES = {"1", "L"}
DEEP_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit grayscale PNG and TIFF


def luminance(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) → uint8 (..., 1), rounded exactly like Pillow's RGB → L conversion."""
    red, green, blue = (rgb[..., channel].astype(np.uint32) for channel in range(3))
    luma = (red * LUMA_WEIGHTS[0] + green * LUMA_WEIGHTS[1] + blue * LUMA_WEIGHTS[2] + 0x8000) >> 16
    return luma.astype(np.uint8)[..., np.newaxis]


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 images with 1 or 3 channels last (one image or a stack) → the same with `channels` channels."""
    if channels not in CHANNEL_COUNTS:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1:
        return np.repeat(images, channels, axis=-1)
    return luminance(images)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def pixels(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode → uint8 HW1 (grayscale sources) or HW3 (everything else)."""
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        return np.array(Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB"))
    if image.mode in GRAY_MODES:
        return np.array(image.convert("L"))[..., np.newaxis]
    if image.mode in DEEP_GRAY_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them; scale 0..65535 → 0..255.
        deep = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)[..., np.newaxis]
    return np.array(image.convert("RGB"))


def decode_image(path: str | Path | BinaryIO, channels: int) -> np.ndarray:
    """The image at `path` (a file, or an open binary stream of a file's bytes) as uint8 (H, W, channels), upright as
    its EXIF orientation says."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        return match_channels(pixels(upright), channels)


def allow_pixels(max_pixels: int | None) -> None:
    """Let Pillow open images of up to `max_pixels` (None: any size) in this process and the loader workers it forks.

    Only ever raises Pillow's guard: below PILLOW_MAX_PIXELS the scan refuses larger images itself, with a reason.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (max_pixels is None or max_pixels > 2 * current):
        Image.MAX_IMAGE_PIXELS = max_pixels

"""Pixels from an image file: uint8 HWC arrays with the channel count the model is built for.

Every source ends in `match_channels`, so grayscale ↔ RGB conversion is defined once:
- gray → 3 channels repeats the gray value;
- RGB → 1 channel is the ITU-R 601-2 luma, with Pillow's integer weights, so an array converted here
  equals the same image converted by `PIL.Image.convert("L")`;
- transparency (RGBA, LA, palette with a transparent colour) is composited onto white. Dropping alpha
  instead would expose whatever colour the transparent pixels happen to store — often black, so a black
  drawing on a transparent background would vanish; white is how the image looks on a page or in a viewer.

Decoding makes one copy of the pixels, out of Pillow's storage into the array: the EXIF rotation is applied in place
(and only when the file asks for one), an image already in RGB or L mode is not converted, and the array is NumPy's
view of Pillow's bytes (read-only: the transforms make new arrays, they never write into their input).

A JPEG may be decoded smaller: libjpeg scales by 1/2, 1/4 or 1/8 while it decodes (Pillow's `draft`), which saves
part of the work for a large photo (1.4–2.4× less CPU on 1600×1200 photos here: the entropy decoding still reads every
byte). `decode_image(..., min_scale=…)` allows it down to the scale that still leaves the
transforms at least the pixels they resample to the model's input (pipeline.data.transforms.draft_scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

CHANNEL_COUNTS = (1, 3)
# Pillow refuses to open an image of more pixels than this (2 × Image.MAX_IMAGE_PIXELS, its guard against
# decompression bombs: small files that decode to gigabytes), and warns above half of it.
PILLOW_MAX_PIXELS = 178_956_970
LUMA_WEIGHTS = (19595, 38470, 7471)  # Pillow's ITU-R 601-2 weights, in 1/65536 (sum 65536)
WHITE = (255, 255, 255, 255)
GRAY_MODES = {"1", "L"}
DEEP_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit grayscale PNG and TIFF
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# (width, height) of the upright image → the smallest scale it may be decoded at (1 = full size)
MinScale = Callable[[int, int], float]


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
    if image.mode == "L":
        return np.asarray(image)[..., np.newaxis]
    if image.mode in GRAY_MODES:
        return np.asarray(image.convert("L"))[..., np.newaxis]
    if image.mode in DEEP_GRAY_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them; scale 0..65535 → 0..255.
        deep = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)[..., np.newaxis]
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def draft(image: Image.Image, min_scale: MinScale) -> None:
    """Let libjpeg decode the JPEG `image` (opened, not loaded) at 1/2, 1/4 or 1/8 of its size, the smallest of them
    no smaller than `min_scale` of the upright image's size allows; other formats are decoded in full."""
    if image.format != "JPEG":
        return
    width, height = image.size
    upright = (height, width) if image.getexif().get(ExifTags.Base.Orientation, 1) in TRANSPOSED else (width, height)
    scale = min_scale(*upright)
    if scale <= 0.5:  # Pillow picks the largest reduction that keeps at least the size asked for on both sides
        image.draft(image.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))


def decode_image(path: str | Path | BinaryIO, channels: int, min_scale: MinScale | None = None) -> np.ndarray:
    """The image at `path` (a file, or an open binary stream of a file's bytes) as uint8 (H, W, channels), upright as
    its EXIF orientation says; a JPEG decoded smaller where `min_scale` allows it (None: full size)."""
    with Image.open(path) as image:
        if min_scale is not None:
            draft(image, min_scale)
        ImageOps.exif_transpose(image, in_place=True)  # no copy unless the file asks for a rotation or a flip
        return match_channels(pixels(image), channels)


def allow_pixels(max_pixels: int | None) -> None:
    """Let Pillow open images of up to `max_pixels` (None: any size) in this process and the loader workers it forks.

    Only ever raises Pillow's guard: below PILLOW_MAX_PIXELS the scan refuses larger images itself, with a reason.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (max_pixels is None or max_pixels > 2 * current):
        Image.MAX_IMAGE_PIXELS = max_pixels

"""A picture of what an augmentation does: one row per sample, the original then N augmented views."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.transforms import InputSpec, build_transforms

MIN_TILE = 96  # tiles are enlarged (nearest neighbour) to at least this many pixels, so 8-px digits are visible
MARGIN = 4
LINE = 14  # caption line height in pixels, for PIL's default font


def describe(entries: Mapping[str, Any] | None) -> str:
    """'RandomResizedCrop, warp=OneOf(ElasticTransform, GridDistortion)' for the figure's caption."""
    parts = []
    for label, options in (entries or {}).items():
        if options is None:
            continue
        name = options.get("transform", label)
        text = name if name == label else f"{label}={name}"
        if "transforms" in options:
            text += f"({describe(options['transforms'])})"
        parts.append(text)
    return ", ".join(parts) or "no augmentation"


def _tile(image: np.ndarray, size: int) -> Image.Image:
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    tile = Image.fromarray(rgb)
    scale = max(1, -(-size // max(tile.size)))
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


def augmentation_grid(
    dataset: Sequence[tuple[np.ndarray, int]],
    samples: int,
    entries: Mapping[str, Any] | None,
    spec: InputSpec,
    views: int,
    seed: int | None,
    title: str,
) -> Image.Image:
    """The first `samples` images, resized to the model's input, each followed by `views` augmented draws."""
    images = [dataset[index][0] for index in range(min(samples, len(dataset)))]
    augment = A.Compose([*build_transforms(entries, spec), A.Resize(*spec.size)], seed=seed)
    original = A.Compose([A.Resize(*spec.size)])
    rows = [[original(image=img)["image"], *(augment(image=img)["image"] for _ in range(views))] for img in images]
    tiles = [[_tile(image, MIN_TILE) for image in row] for row in rows]
    tile_w, tile_h = tiles[0][0].size
    width = (tile_w + MARGIN) * (views + 1) + MARGIN
    caption = [title, *textwrap.wrap(f"original | {views} augmented views: {describe(entries)}", width // 7)]
    header = LINE * len(caption) + MARGIN
    grid = Image.new("RGB", (width, header + (tile_h + MARGIN) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for line_number, line in enumerate(caption):
        draw.text((MARGIN, MARGIN + line_number * LINE), line, fill="black")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile, (MARGIN + c * (tile_w + MARGIN), header + r * (tile_h + MARGIN)))
    return grid


def save_augmentation_grid(path: Path, *args: Any, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    augmentation_grid(*args, **kwargs).save(path)
    return path

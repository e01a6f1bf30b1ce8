"""One pass over every image file before training, so a bad file stops the run at load time, not mid-epoch.

Each file is fully decoded once. `Image.verify()` would be cheaper but it only parses headers and chunk
checksums: a truncated JPEG passes it and then fails in a loader worker hours into training. JPEGs are
decoded in draft mode (libjpeg scales by 1/8 while decoding): every byte of the stream is still read,
so truncation and corrupt data are caught, at well under a millisecond per photo. Decoding releases the
GIL, so a thread pool scans on all cores.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.data.decode import PILLOW_MAX_PIXELS
from pipeline.data.workers import available_cpus

log = logging.getLogger(__name__)
DRAFT_SCALE = 8  # libjpeg's largest DCT scaling
# Pillow warns about images of more than half its limit; the scan refuses those above data.max_image_pixels itself,
# with the file's name and the fix, so the warning (once, without the file) says nothing more.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Scan:
    """The files that can be trained on, and the others with the reason each was refused."""

    usable: list[Path]
    bad: list[tuple[Path, str]]


def _too_large(pixels: int, max_pixels: int | None, size: str = "") -> str:
    return (
        f"{size}{pixels} pixels is more than data.max_image_pixels={max_pixels}, a guard against decompression bombs "
        f"(small files that decode to gigabytes); if the image is genuine, raise it: data.max_image_pixels={pixels} "
        "(null = no limit)"
    )


def problem_with(path: Path, min_size: int, max_pixels: int | None = PILLOW_MAX_PIXELS) -> str | None:
    """Why `path` cannot be trained on, or None when it decodes, is at least `min_size` on each side and has at most
    `max_pixels` pixels (None: any number)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:  # refused before its pixels are decoded
                return _too_large(width * height, max_pixels, f"{width}x{height} = ")
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, width // DRAFT_SCALE), max(1, height // DRAFT_SCALE)))
            image.load()
    except Image.DecompressionBombError as error:  # over Pillow's own limit: its message has the pixel count
        found = re.search(r"\((\d+) pixels\)", str(error))
        return _too_large(int(found.group(1)), max_pixels) if found else f"refused by Pillow ({error})"
    except Image.UnidentifiedImageError:
        return "not an image Pillow can read (wrong extension, or a non-image file)"
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, struct.error...) for broken data
        return f"corrupt or truncated image ({type(error).__name__}: {error})"
    if min(width, height) < min_size:
        return f"{width}x{height} px is smaller than data.min_size={min_size} px on a side"
    return None


def scan_images(paths: Sequence[Path], min_size: int, max_pixels: int | None = PILLOW_MAX_PIXELS) -> Scan:
    """Decode every file in `paths` once; keeps their order."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=available_cpus()) as pool:
        problems = list(pool.map(lambda path: problem_with(path, min_size, max_pixels), paths))
    log.info("Scanned %d image files in %.1f s", len(paths), time.perf_counter() - started)
    return Scan(
        usable=[path for path, problem in zip(paths, problems, strict=True) if problem is None],
        bad=[(path, problem) for path, problem in zip(paths, problems, strict=True) if problem is not None],
    )

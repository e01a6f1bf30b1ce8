"""One pass over every image file before training, so a bad file stops the run at load time, not mid-epoch; its
results are remembered (pipeline.data.verified) so each file is checked once, not at every start.

`data.verify` says how deep a check goes:
- full: every file is decoded. `Image.verify()` would be cheaper but it only parses headers and chunk checksums: a
  truncated JPEG passes it and then fails in a loader worker hours into training. JPEGs are decoded in draft mode
  (libjpeg scales by 1/8 while decoding): every byte of the stream is still read, so truncation and corrupt data
  are caught, at well under a millisecond per photo.
- header: Pillow opens each file and `verify()`s it: non-images, unreadable or damaged headers, sizes, and for PNG
  every chunk's checksum to the end of the file; a JPEG whose image data is cut short passes.
- off: the listing is trusted; nothing is opened.

Decoding releases the GIL, so a thread pool scans on all cores, with a bounded number of files in flight: memory
stays flat however many files there are.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image

from pipeline.data.decode import PILLOW_MAX_PIXELS
from pipeline.data.verified import DECODED, HEADER, LOOKUP_BATCH, SIZE_READ, Facts, Key, VerifiedFiles
from pipeline.data.workers import available_cpus

log = logging.getLogger(__name__)
DRAFT_SCALE = 8  # libjpeg's largest DCT scaling
VERIFY = {"full": DECODED, "header": HEADER, "off": None}  # data.verify → the level a file is checked to
IN_FLIGHT_PER_THREAD = 16  # files queued per scanning thread: enough to keep it busy, few enough to bound memory
REMEMBER_EVERY = 2000  # checked files written to the cache per transaction
# Pillow warns about images of more than half its limit; the scan refuses those above data.max_image_pixels itself,
# with the file's name and the fix, so the warning (once, without the file) says nothing more.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
Item, Result = TypeVar("Item"), TypeVar("Result")


@dataclass(frozen=True)
class Scan:
    """The files that can be trained on, and the others with the reason each was refused; how many files this scan
    opened, and how many results it took from the cache of verified files."""

    usable: list[Path]
    bad: list[tuple[Path, str]]
    checked: int = 0
    remembered: int = 0


def _too_large(pixels: int, max_pixels: int | None, size: str = "") -> str:
    return (
        f"{size}{pixels} pixels is more than data.max_image_pixels={max_pixels}, a guard against decompression bombs "
        f"(small files that decode to gigabytes); if the image is genuine, raise it: data.max_image_pixels={pixels} "
        "(null = no limit)"
    )


def inspect(path: Path, level: int, max_pixels: int | None = PILLOW_MAX_PIXELS) -> tuple[Facts, bool]:
    """What checking `path` to `level` (HEADER or DECODED) finds, and whether it may be remembered: not when the
    file could not be read (a missing file, no permission: the error is the file system's, not the file's), nor
    when Pillow's own pixel limit refused it (that depends on data.max_image_pixels)."""
    width = height = 0
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:  # refused before its pixels are decoded
                return Facts(SIZE_READ, width, height), True
            if level == DECODED:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, width // DRAFT_SCALE), max(1, height // DRAFT_SCALE)))
                image.load()
            else:
                image.verify()
    except Image.DecompressionBombError as error:  # over Pillow's own limit: its message has the pixel count
        found = re.search(r"\((\d+) pixels\)", str(error))
        reason = _too_large(int(found.group(1)), max_pixels) if found else f"refused by Pillow ({error})"
        return Facts(level, error=reason), False
    except Image.UnidentifiedImageError:
        return Facts(level, error="not an image Pillow can read (wrong extension, or a non-image file)"), True
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, struct.error...) for broken data
        if isinstance(error, OSError) and error.errno is not None:  # the file system's error, not the file's
            return Facts(level, error=f"cannot be read ({type(error).__name__}: {error})"), False
        return Facts(level, width, height, f"corrupt or truncated image ({type(error).__name__}: {error})"), True
    return Facts(level, width, height), True


def reason(facts: Facts, min_size: int, max_pixels: int | None) -> str | None:
    """Why a file with these facts cannot be trained on, or None when it can."""
    if facts.error is not None:
        return facts.error
    if max_pixels is not None and facts.width * facts.height > max_pixels:
        return _too_large(facts.width * facts.height, max_pixels, f"{facts.width}x{facts.height} = ")
    if min(facts.width, facts.height) < min_size:
        return f"{facts.width}x{facts.height} px is smaller than data.min_size={min_size} px on a side"
    return None


def answers(facts: Facts, level: int, max_pixels: int | None) -> bool:
    """Whether remembered facts answer a check to `level`: a sound file verified at least that deep (or too large
    to be opened at all), or an error found at that very depth (another depth may see the file otherwise)."""
    if facts.error is not None:
        return facts.level == level
    too_large = max_pixels is not None and facts.width * facts.height > max_pixels
    return facts.level >= level or too_large


def problem_with(
    path: Path, min_size: int, max_pixels: int | None = PILLOW_MAX_PIXELS, verify: str = "full"
) -> str | None:
    """Why `path` cannot be trained on, or None when it passes the `verify` check (see the module's docstring), is
    at least `min_size` on each side and has at most `max_pixels` pixels (None: any number)."""
    level = VERIFY[verify]
    return None if level is None else reason(inspect(path, level, max_pixels)[0], min_size, max_pixels)


def bounded_map(function: Callable[[Item], Result], items: Iterable[Item], threads: int) -> Iterator[Result]:
    """`function` of each item, in order, on `threads` threads, with at most IN_FLIGHT_PER_THREAD items per thread
    submitted and not yet consumed (Executor.map submits every item first: a future each, held to the end)."""
    window: deque[Future[Result]] = deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for item in items:
            window.append(pool.submit(function, item))
            if len(window) >= threads * IN_FLIGHT_PER_THREAD:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _check(path: Path, level: int, max_pixels: int | None) -> tuple[Key | None, Facts, bool]:
    """The file's key, taken before it is read (a file changed while it is checked is checked again next time),
    what checking it found, and whether that may be remembered."""
    try:
        key: Key | None = Key.of(path)
    except OSError:  # gone or unreadable: refused below, never remembered
        key = None
    return key, *inspect(path, level, max_pixels)


def _unremembered(
    paths: Sequence[Path], cache: VerifiedFiles, level: int, min_size: int, max_pixels: int | None
) -> tuple[array[int], list[str | None]]:
    """The indices of the files the cache cannot answer for, and the problems of those it can (None elsewhere).
    Read a batch at a time: no more than a batch of keys is held at once."""
    unchecked = array("q")
    problems: list[str | None] = [None] * len(paths)
    for start in range(0, len(paths), LOOKUP_BATCH):
        keys = {}
        for index in range(start, min(start + LOOKUP_BATCH, len(paths))):
            try:
                keys[index] = Key.of(paths[index])
            except OSError:
                unchecked.append(index)  # checked, to say why it cannot be read
        for (index, _), facts in zip(keys.items(), cache.lookup(list(keys.values())), strict=True):
            if facts is not None and answers(facts, level, max_pixels):
                problems[index] = reason(facts, min_size, max_pixels)
            else:
                unchecked.append(index)
    return array("q", sorted(unchecked)), problems


def scan_images(
    paths: Sequence[Path],
    min_size: int,
    max_pixels: int | None = PILLOW_MAX_PIXELS,
    verify: str = "full",
    cache_dir: str | Path | None = None,
) -> Scan:
    """Check every file in `paths` as `verify` says, taking what `cache_dir` remembers of files unchanged since
    (None: no cache); keeps their order."""
    level = VERIFY[verify]
    if level is None:
        log.info("Trusting the %d listed image files unchecked (data.verify=off)", len(paths))
        return Scan(usable=list(paths), bad=[])
    started = time.perf_counter()
    cache = VerifiedFiles.open(cache_dir) if cache_dir is not None else None
    try:
        if cache:
            unchecked, problems = _unremembered(paths, cache, level, min_size, max_pixels)
        else:
            unchecked, problems = array("q", range(len(paths))), [None for _ in paths]
        checked = bounded_map(lambda index: _check(paths[index], level, max_pixels), unchecked, available_cpus())
        results: list[tuple[Key, Facts]] = []
        for index, (key, facts, lasting) in zip(unchecked, checked, strict=True):
            problems[index] = reason(facts, min_size, max_pixels)
            if cache and key is not None and lasting:
                results.append((key, facts))
                if len(results) >= REMEMBER_EVERY:  # written as it goes: a scan stopped midway keeps what it did
                    cache.remember(results)
                    results = []
        if cache:
            cache.remember(results)
    finally:
        if cache:
            cache.close()
    remembered = len(paths) - len(unchecked)
    log.info(
        "Scanned %d image files in %.1f s (data.verify=%s): %d checked, %d remembered from earlier runs",
        len(paths),
        time.perf_counter() - started,
        verify,
        len(unchecked),
        remembered,
    )
    return Scan(
        usable=[path for path, problem in zip(paths, problems, strict=True) if problem is None],
        bad=[(path, problem) for path, problem in zip(paths, problems, strict=True) if problem is not None],
        checked=len(unchecked),
        remembered=remembered,
    )

"""Writing any source's splits as WebDataset shards (pipeline.data.shard_format) into a folder or an S3 prefix.

Image files (image folders) go in as they are stored — the same bytes, so nothing is decoded again or changed;
images held in memory (digits, MNIST, CIFAR) as lossless PNG. The training split is written in an order shuffled
with `shuffle_seed`: a folder lists its files class by class, and shards read in turn must each hold every class for
shard-level and block shuffling to mix well. Validation and test keep the source's order. A shard is closed when it
holds `max_samples` samples or `max_bytes` bytes; each is uploaded as soon as it is closed (S3), and the index last,
so an interrupted conversion leaves no index and is never read as a whole data set.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.images import ImageFileSet, ImageSet, ImageSplits, ImageSubset, LabelledImages, stored_path
from pipeline.data.shard_format import IMAGE_EXTENSIONS, SPLITS, DatasetIndex, ShardInfo, ShardWriter
from pipeline.data.shard_store import INDEX, Store

EXTENSION_ALIASES = {"jpeg": "jpg", "tif": "tiff"}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(part: LabelledImages, index: int) -> tuple[bytes, str]:
    """The stored bytes of image `index` of `part` and their extension: a file's own bytes, else a PNG."""
    if isinstance(part, ImageSubset):
        return encoded(part.base, int(part.indices[index]))
    if isinstance(part, ImageFileSet):
        path = Path(stored_path(str(part.paths[index])))
        extension = path.suffix.lower().lstrip(".")
        extension = EXTENSION_ALIASES.get(extension, extension)
        if extension in IMAGE_EXTENSIONS:
            return path.read_bytes(), extension
    if isinstance(part, ImageSet):
        return png(part.images[index]), "png"
    return png(part[index][0]), "png"  # any other set, or a file whose name does not say its format


def write_split(
    part: LabelledImages,
    split: str,
    store: Store,
    staging: Path,
    max_samples: int,
    max_bytes: int,
    order: np.ndarray,
) -> Iterator[ShardInfo]:
    """Shards `<split>-NNNNNN.tar` of `part`'s images in `order`, each put into `store` once closed."""
    writer: ShardWriter | None = None
    number = 0

    def close(writer: ShardWriter) -> ShardInfo:
        info = writer.close()
        store.put_file(info.name, writer.path)
        return info

    for position, index in enumerate(order):
        data, extension = encoded(part, int(index))
        if writer is not None and (len(writer.labels) >= max_samples or writer.size + len(data) > max_bytes):
            yield close(writer)
            writer = None
        if writer is None:
            writer = ShardWriter(staging / f"{split}-{number:06d}.tar")
            number += 1
        writer.add(f"{position:09d}", data, extension, int(part.labels[int(index)]))
    if writer is not None:
        yield close(writer)


def write_shards(
    splits: ImageSplits,
    store: Store,
    max_samples: int,
    max_bytes: int,
    shuffle_seed: int,
    source: dict[str, Any],
    progress: Any = None,
) -> DatasetIndex:
    """Every split of `splits` as shards in `store`, then the index; returns the index."""
    written: dict[str, list[ShardInfo]] = {}
    with tempfile.TemporaryDirectory(prefix="shards-") as scratch:
        staging = store.folder if not store.is_s3 else Path(scratch)
        staging.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            part = getattr(splits, split)
            order = np.arange(len(part))
            if split == "train":
                order = np.random.default_rng(shuffle_seed).permutation(order)
            written[split] = []
            for info in write_split(part, split, store, staging, max_samples, max_bytes, order):
                written[split].append(info)
                if progress is not None:
                    progress(split, info)
        index = DatasetIndex(list(splits.classes), splits.channels, written, source)
        index_file = staging / f"{INDEX}.partial"  # beside the index: renamed over it in one step (a folder)
        index_file.write_text(json.dumps(index.to_json()))
        store.put_file(INDEX, index_file)
    return index

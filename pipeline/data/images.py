"""The forms every source returns: labelled uint8 HWC images, split three ways.

A set is either held in memory (`ImageSet`: small or compact sets such as digits, MNIST, CIFAR) or read
from files when an item is asked for (`ImageFileSet`: image folders, which may not fit in memory). Both
offer what the DataModule uses — `len`, `set[i] -> (uint8 HWC array, label)`, `.labels`, `.channels` —
written down as the `LabelledImages` protocol.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipeline.data.contents import FileHashes
from pipeline.data.decode import CHANNEL_COUNTS, MinScale, decode_image
from pipeline.data.errors import DataError

# A file name that is not valid UTF-8 reaches Python with each undecodable byte as a lone surrogate (PEP 383): the
# path opens the file, but cannot be encoded as UTF-8 — not by NumPy's StringDType, a log file or MLflow.
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")
_STORED_BYTE = re.compile("\0([0-9a-f]{2})")


def storable(path: str) -> str:
    """`path` in a form StringDType can hold: NUL never occurs in a path, so NUL + two hex digits stands for each
    byte that is not UTF-8. Every other path is unchanged."""
    return _UNDECODED_BYTE.sub(lambda match: f"\0{ord(match.group()) - 0xDC00:02x}", path)


def stored_path(stored: str) -> str:
    """The path `storable` was given, which opens the file."""
    return _STORED_BYTE.sub(lambda match: chr(0xDC00 + int(match.group(1), 16)), stored) if "\0" in stored else stored


def printable(path: str | os.PathLike[str]) -> str:
    """`path` for messages, logs and run records: each byte that is not UTF-8 written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class LabelledImages(Protocol):
    """Images with integer labels, indexable like a sequence of (uint8 HWC array, label)."""

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def channels(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 arrays of shape (N, H, W, C) and their integer labels (N,), all in memory."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])


@dataclass(frozen=True)
class ImageFileSet:
    """Image files and their integer labels; each file is decoded when its item is asked for.

    Images may differ in size: the transforms resize every image to the model's input. The paths are kept
    in one NumPy array of StringDType rather than a list of str: forked loader workers that touch millions
    of Python objects copy their memory pages (reading a reference count writes it), one array stays
    shared; and unlike a fixed-width "<U" array, each path takes only its own length. They are stored as
    `storable` makes them, so a file name that is not UTF-8 trains like any other.
    """

    paths: np.ndarray
    labels: np.ndarray
    channels: int

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} files but {len(self.labels)} labels")
        if self.channels not in CHANNEL_COUNTS:
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.read(index)

    def read(self, index: int, min_scale: MinScale | None = None) -> tuple[np.ndarray, int]:
        """Item `index`, a JPEG decoded smaller where `min_scale` allows (see pipeline.data.decode)."""
        path = stored_path(str(self.paths[index]))
        try:
            image = decode_image(path, self.channels, min_scale)
        except Exception as error:  # the load-time scan passed it: the file changed since, or the disk failed
            raise DataError(
                f"{printable(path)}: could not be decoded ({type(error).__name__}: {error}). It was readable when the "
                "data were loaded; replace or remove the file and start the run again."
            ) from error
        return image, int(self.labels[index])


@dataclass(frozen=True)
class ImageSubset:
    """Some items of another set, in the given order, with their labels renumbered."""

    base: LabelledImages
    indices: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, _ = self.base[int(self.indices[index])]
        return image, int(self.labels[index])

    @property
    def channels(self) -> int:
        return self.base.channels


def read(part: LabelledImages, index: int, min_scale: MinScale | None = None) -> tuple[np.ndarray, int]:
    """`part[index]`, with image files decoded smaller where `min_scale` allows (JPEG draft decoding); images held in
    memory are returned as they are."""
    if isinstance(part, ImageSubset):
        image, _ = read(part.base, int(part.indices[index]), min_scale)
        return image, int(part.labels[index])
    if isinstance(part, ImageFileSet):
        return part.read(index, min_scale)
    return part[index]


@dataclass(frozen=True)
class ImageSplits:
    """A data set split for training, model selection and the final held-out test.

    `skipped` lists the files left out with data.on_bad_file=skip, as (path, reason), for the run's record.
    """

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train.channels

    def subset(self, classes: Sequence[str] | None, train_per_class: int | None, seed: int) -> ImageSplits:
        """Only `classes` (in the order given, relabelled 0..k-1; None = all) and, if `train_per_class` is set,
        only that many training images of each, drawn with `seed`. Validation and test keep every image of the
        kept classes. `data.classes` and `data.train_per_class` set these."""
        if classes is None and train_per_class is None:
            return self
        names = [str(name) for name in classes] if classes is not None else list(self.classes)
        unknown = [name for name in names if name not in self.classes]
        if unknown or len(set(names)) != len(names) or len(names) < 2:
            raise DataError(
                f"data.classes={names}: must name at least 2 distinct classes of this data set, which has "
                f"{self.classes}" + (f"; unknown: {unknown}" if unknown else "") + " (e.g. data.classes=null for all)."
            )
        old_label = np.array([self.classes.index(name) for name in names])
        rng = np.random.default_rng(seed)

        def keep(part: LabelledImages, per_class: int | None) -> ImageSubset:
            chosen = []
            for new, old in enumerate(old_label):
                members = np.flatnonzero(part.labels == old)
                if per_class is not None:
                    if len(members) < per_class:
                        raise DataError(
                            f"data.train_per_class={per_class}: class {names[new]!r} has only {len(members)} "
                            f"training images (e.g. data.train_per_class={len(members)})."
                        )
                    members = np.sort(rng.choice(members, size=per_class, replace=False))
                chosen.append(members)
            indices = np.sort(np.concatenate(chosen))  # in the source's order
            relabel = np.full(len(self.classes), -1)
            relabel[old_label] = np.arange(len(names))
            return ImageSubset(part, indices, relabel[part.labels[indices]])

        train, val, test = keep(self.train, train_per_class), keep(self.val, None), keep(self.test, None)
        return ImageSplits(train, val, test, names, self.skipped)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, for the run's record."""
        return {
            split: {name: int((part.labels == index).sum()) for index, name in enumerate(self.classes)}
            for split, part in (("train", self.train), ("val", self.val), ("test", self.test))
        }


CHUNK_IMAGES = 4096  # images hashed per call: a bounded copy of a set that may be large


def content_chunks(
    part: LabelledImages, indices: np.ndarray | None = None, hashes: FileHashes | None = None
) -> Iterator[bytes | np.ndarray]:
    """The contents of the images of `part` (at `indices`, default all), in order, as byte chunks for a fingerprint:
    the pixels of images held in memory (with their shape), the MD5 of each image file's bytes as stored (from
    `hashes`, which remembers them between runs; None: each file is read). A subset yields its base's images at its
    indices, so the same images in the same order give the same chunks however they were cut."""
    if indices is None and hasattr(part, "content_chunks"):  # a set that fingerprints itself (shards: their checksums)
        yield from part.content_chunks()
        return
    indices = np.arange(len(part)) if indices is None else indices
    if isinstance(part, ImageSubset):
        yield from content_chunks(part.base, part.indices[indices], hashes)
    elif isinstance(part, ImageSet):
        yield np.asarray(part.images.shape[1:], dtype=np.int64)
        for start in range(0, len(indices), CHUNK_IMAGES):
            yield np.ascontiguousarray(part.images[indices[start : start + CHUNK_IMAGES]])
    elif isinstance(part, ImageFileSet):
        hash_files = hashes or FileHashes()
        for start in range(0, len(indices), CHUNK_IMAGES):
            chunk = indices[start : start + CHUNK_IMAGES]
            yield b"".join(hash_files([stored_path(str(part.paths[index])) for index in chunk]))
    else:  # any other LabelledImages: its decoded pixels
        for index in indices:
            image = np.ascontiguousarray(part[int(index)][0])
            yield np.asarray(image.shape, dtype=np.int64).tobytes() + image.tobytes()

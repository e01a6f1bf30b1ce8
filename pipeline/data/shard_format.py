"""The shard format: WebDataset tar shards and the index beside them.

A shard is a plain tar file (readable by `tar`, Python's tarfile, the `webdataset` library, any tool). Each sample
is two consecutive members sharing a key, as WebDataset lays them out: `<key>.<image extension>` (the image file's own
bytes — a JPEG stays the same JPEG; images held in memory, such as digits, MNIST and CIFAR, are written as lossless
PNG) and `<key>.cls` (the class index as decimal text). The converter writes `train-000000.tar`, `val-…`, `test-…`.

`dataset.json`, written last, is what makes a folder of shards a data set here: the class names, the channel count,
the source it was made from, and for each split its shards — name, samples, bytes, SHA-256, each sample's label and
the byte offset where each sample begins. The offsets let a reader start any sample without reading what comes before
it (a rank's share of an epoch, a resumed position, a single image), with one ranged read of a file or an S3 object.

Reading and writing use Python's tarfile rather than the `webdataset` package: its reader streams whole shards and
splits them between ranks by shard, which cannot give every rank the same exact number of batches nor start mid-shard;
the tests read our shards with `webdataset` to show the format is its own.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.data.errors import DataError

FORMAT, VERSION = "webdataset", 1
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
LABEL_EXTENSION = "cls"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the index describes it."""

    name: str
    bytes: int
    sha256: str
    offsets: np.ndarray  # where each sample's first tar header begins
    end: int  # where the last sample ends (the tar's end-of-archive blocks follow)
    labels: np.ndarray

    @property
    def samples(self) -> int:
        return len(self.labels)

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """The bytes holding samples [start, stop)."""
        return int(self.offsets[start]), int(self.offsets[stop]) if stop < self.samples else self.end

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "end": self.end,
            "offsets": self.offsets.tolist(),
            "labels": self.labels.tolist(),
        }


@dataclass(frozen=True)
class DatasetIndex:
    classes: list[str]
    channels: int
    splits: dict[str, list[ShardInfo]]
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "classes": self.classes,
            "channels": self.channels,
            "source": self.source,
            "splits": {
                split: {"shards": [shard.to_json() for shard in shards]} for split, shards in self.splits.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> DatasetIndex:
        """The index as written by the converter; anything else is a DataError naming `where`."""
        try:
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            splits = {
                split: [
                    ShardInfo(
                        name=str(shard["name"]),
                        bytes=int(shard["bytes"]),
                        sha256=str(shard["sha256"]),
                        offsets=np.asarray(shard["offsets"], dtype=np.int64),
                        end=int(shard["end"]),
                        labels=np.asarray(shard["labels"], dtype=np.int64),
                    )
                    for shard in data["splits"][split]["shards"]
                ]
                for split in SPLITS
            }
            index = cls([str(name) for name in data["classes"]], int(data["channels"]), splits, dict(data["source"]))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{where} is not an index written by `python -m pipeline.shard` ({FORMAT} version {VERSION}): "
                f"{type(error).__name__}: {error}. Convert the data again with python -m pipeline.shard."
            ) from error
        return index


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes one tar shard, sample by sample, noting where each begins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # plain tar: no compression, no PAX headers; open until close() (a shard is written sample by sample)
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.offsets: list[int] = []
        self.labels: list[int] = []

    def add(self, key: str, image: bytes, extension: str, label: int) -> None:
        self.offsets.append(self.tar.offset)
        self.labels.append(label)
        for name, data in ((f"{key}.{extension}", image), (f"{key}.{LABEL_EXTENSION}", str(label).encode())):
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(data), 0o444, 0  # fixed: the same data give the same bytes
            self.tar.addfile(member, io.BytesIO(data))

    @property
    def size(self) -> int:
        return self.tar.offset

    def close(self) -> ShardInfo:
        end = self.tar.offset
        self.tar.close()
        return ShardInfo(
            name=self.path.name,
            bytes=self.path.stat().st_size,
            sha256=sha256(self.path),
            offsets=np.asarray(self.offsets, dtype=np.int64),
            end=end,
            labels=np.asarray(self.labels, dtype=np.int64),
        )


def read_samples(stream: BinaryIO, where: str) -> Iterator[tuple[bytes, int]]:
    """(image bytes, label) of each sample in a stream of whole samples, in order."""
    key: str | None = None
    image: bytes | None = None
    label: int | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                name, _, extension = base.partition(".")
                if name != key:
                    if key is not None:
                        yield _sample(image, label, key, where)
                    key, image, label = name, None, None
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if extension.lower() in IMAGE_EXTENSIONS:
                    image = data
                elif extension == LABEL_EXTENSION:
                    label = int(data)
    except (tarfile.TarError, ValueError, OSError) as error:
        raise DataError(
            f"{where}: not a WebDataset tar shard ({type(error).__name__}: {error}). Convert the data again with "
            "python -m pipeline.shard."
        ) from error
    finally:
        stream.close()
    if key is not None:
        yield _sample(image, label, key, where)


def _sample(image: bytes | None, label: int | None, key: str, where: str) -> tuple[bytes, int]:
    if image is None or label is None:
        missing = "an image" if image is None else f"a .{LABEL_EXTENSION} label"
        raise DataError(
            f"{where}: sample {key!r} has no {missing}. Convert the data again with python -m pipeline.shard."
        )
    return image, label

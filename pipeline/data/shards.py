"""`data=shards`: a data set converted to WebDataset shards (`python -m pipeline.shard`), read from a local folder or
an S3-compatible object store.

`load_shards` reads the index (`dataset.json`), checks that every shard it lists is there with the size it had, and
reads the first training sample, so a wrong URL, an unreachable server, a folder without shards or a file that is not
a shard stops the run before anything trains. The three splits are the ones the converter wrote (the source's own
train/val/test). Each split is a `ShardSet`: it has the length, labels and channels every source has, and gives single
images on request (the augmentation preview, the model's input example, Grad-CAM, pipeline.evaluate), reading a few
samples ahead from where the index says they begin. Training streams them instead (pipeline.data.shard_stream).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.decode import CHANNEL_COUNTS, decode_image
from pipeline.data.errors import DataError
from pipeline.data.images import ImageSplits
from pipeline.data.shard_format import SPLITS, DatasetIndex, ShardInfo, read_samples
from pipeline.data.shard_store import INDEX, Store, check_url

READ_AHEAD = 32  # samples fetched at once for single-image access (sequential access then costs one read per 32)


@dataclass(frozen=True)
class StreamOptions:
    """How training streams the shards (data.shard_shuffle, data.shuffle_block)."""

    shard_shuffle: bool = True
    shuffle_block: int = 1000


@dataclass
class ShardSet:
    """The samples of one split's shards, in index order."""

    store: Store
    shards: list[ShardInfo]
    channels: int
    options: StreamOptions = field(default_factory=StreamOptions)
    _cache: dict[int, tuple[bytes, int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum([shard.samples for shard in self.shards])]).astype(np.int64)
        self._labels = (
            np.concatenate([shard.labels for shard in self.shards]) if self.shards else np.zeros(0, dtype=np.int64)
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def encoded(self, shard: int, start: int, stop: int) -> Iterator[tuple[bytes, int]]:
        """(image bytes, label) of samples [start, stop) of shard number `shard`, in one ranged read."""
        info = self.shards[shard]
        first, last = info.byte_range(start, stop)
        stream = self.store.open_range(info.name, first, last)
        where = self.store.where(info.name)
        read = 0
        for sample in read_samples(stream, where):
            read += 1
            yield sample
        # tarfile reads a damaged header of a stream as the archive's end: without this, samples would go missing
        # silently (and ranks would train unequal batch counts). The size is checked at start-up; this is the bytes.
        if read != stop - start:
            raise DataError(
                f"{where}: samples {start}-{stop - 1} hold {read} readable samples, {INDEX} says "
                f"{stop - start}: the shard is damaged. Copy it again, or convert the data again with "
                "python -m pipeline.shard."
            )

    def decode(self, data: bytes, where: str) -> np.ndarray:
        try:
            return decode_image(io.BytesIO(data), self.channels)
        except Exception as error:
            raise DataError(
                f"{where}: an image in it cannot be decoded ({type(error).__name__}: {error}). Convert the data again "
                "with python -m pipeline.shard."
            ) from error

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        if index not in self._cache:
            start = index - int(self.starts[shard])
            stop = min(start + READ_AHEAD, self.shards[shard].samples)
            self._cache.clear()
            for offset, sample in enumerate(self.encoded(shard, start, stop)):
                self._cache[index + offset] = sample
        data, label = self._cache[index]
        return self.decode(data, self.store.where(self.shards[shard].name)), label

    def content_chunks(self) -> Iterator[bytes]:
        """What fingerprints the split (tracking's dataset digest): each shard's name, size and SHA-256, which the
        converter took of every byte, so no image is read again."""
        for shard in self.shards:
            yield json.dumps([shard.name, shard.bytes, shard.sha256]).encode()

    def __getstate__(self) -> dict[str, Any]:  # loader workers get the set without its cached images
        return {**self.__dict__, "_cache": {}}


def _check_shards(store: Store, index: DatasetIndex, present: dict[str, int]) -> None:
    problems = []
    for split in SPLITS:
        for shard in index.splits[split]:
            size = present.get(shard.name)
            if size is None:
                problems.append(f"{store.where(shard.name)}: missing")
            elif size != shard.bytes:
                problems.append(f"{store.where(shard.name)}: {size:,} bytes, the index says {shard.bytes:,}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise DataError(
            f"data.url={store.url}: {len(problems)} shard(s) listed in {INDEX} are missing or changed:\n  "
            + "\n  ".join(shown)
            + "\nCopy the shards again, or convert the data again with python -m pipeline.shard."
        )


def load_shards(
    url: str,
    endpoint_url: str | None = None,
    shard_shuffle: bool = True,
    shuffle_block: int = 1000,
) -> ImageSplits:
    """The train, val and test shards at `url` (a folder or s3://bucket/prefix) as ImageSplits of ShardSets."""
    if not url:
        raise DataError("data.url is not set: give the folder or s3:// prefix of the shards (e.g. data.url=s3://b/p).")
    url = str(url)
    check_url(url)
    if not (isinstance(shuffle_block, int) and shuffle_block >= 1):
        raise DataError(f"data.shuffle_block={shuffle_block!r}: must be an integer >= 1 (e.g. data.shuffle_block=1000)")
    store = Store(url, endpoint_url or None)
    sizes = store.sizes()
    if INDEX not in sizes:
        tars = sorted(name for name in sizes if name.endswith(".tar"))
        found = f" (it holds {len(tars)} .tar files but no index)" if tars else ""
        raise DataError(
            f"data.url={url}: no shards there: {INDEX} not found{found}. Convert a data set with "
            f"python -m pipeline.shard data=<source> output={url}, or point data.url at where it wrote them."
        )
    index = DatasetIndex.from_json(store.read_json(INDEX), store.where(INDEX))
    if index.channels not in CHANNEL_COUNTS or len(index.classes) < 2:
        raise DataError(f"{store.where(INDEX)}: needs >= 2 classes and 1 or 3 channels; convert the data again.")
    _check_shards(store, index, sizes)  # the listing made above: one pass over the store
    options = StreamOptions(bool(shard_shuffle), int(shuffle_block))
    sets = {split: ShardSet(store, index.splits[split], index.channels, options) for split in SPLITS}
    if len(sets["train"]) == 0:
        raise DataError(f"data.url={url}: the index lists no training samples; convert the data again.")
    sets["train"][0]  # one sample read and decoded now: a shard that is not a tar of images fails here
    return ImageSplits(train=sets["train"], val=sets["val"], test=sets["test"], classes=index.classes)

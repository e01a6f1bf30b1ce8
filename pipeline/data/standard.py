"""The standard benchmark sets, read by torchvision's own loaders from their official files.

With download=true torchvision fetches the official archives into `root` (once; later runs find them).
Offline, `root` must already hold the official files:
- MNIST:         <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte        (gunzipped IDX)
- Fashion-MNIST: <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
- CIFAR-10:      <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (pickled batches)
- CIFAR-100:     <root>/cifar-100-python/{train,test,meta}
torchvision checks the CIFAR files against the official MD5 sums, so a damaged copy is refused; when it refuses,
the files there are checked one by one, so the message says which are damaged (MD5 sum; for MNIST's IDX files,
the length their header promises) rather than asking for files that are present.

The official test split stays the test split; the validation split is held out of the official training
split, stratified by class and fixed by `split_seed`. The sets are small (at most 60,000 images of 28 or
32 px), so they are held in memory.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST, VisionDataset
from torchvision.datasets.utils import check_integrity

from pipeline.data.decode import CHANNEL_COUNTS, match_channels
from pipeline.data.errors import DataError
from pipeline.data.images import ImageSet, ImageSplits
from pipeline.data.splits import stratified_holdout

OFFICIAL_FILES = {
    MNIST: "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    FashionMNIST: "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    CIFAR10: "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    CIFAR100: "cifar-100-python/{train,test,meta}",
}


IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # IDX type code → bytes per item


def _idx_problem(path: Path) -> str | None:
    """Why an IDX file (MNIST's format: magic, big-endian sizes, data) is not whole, or None."""
    size = path.stat().st_size
    with path.open("rb") as file:
        magic = file.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_ITEM_BYTES:
            return f"{size:,} bytes that do not start like an IDX file"
        shape = file.read(4 * magic[3])
    if len(shape) < 4 * magic[3]:
        return f"{size:,} bytes, cut off inside its header"
    expected = 4 + len(shape) + math.prod(struct.unpack(f">{magic[3]}I", shape)) * IDX_ITEM_BYTES[magic[2]]
    if size != expected:
        return f"{size:,} bytes where its header promises {expected:,}"
    return None


def _check_files(dataset: type[VisionDataset], root: Path) -> tuple[list[str], list[Path]]:
    """The official files under `root` that are damaged (each with why) and those that are missing."""
    damaged, missing = [], []
    if issubclass(dataset, CIFAR10):  # CIFAR-100's class is CIFAR-10's with other files
        folder = root / dataset.base_folder
        for name, md5 in [*dataset.train_list, *dataset.test_list, [dataset.meta["filename"], dataset.meta["md5"]]]:
            path = folder / name
            if not path.is_file():
                missing.append(path)
            elif not check_integrity(str(path), md5):
                damaged.append(f"{path} ({path.stat().st_size:,} bytes, not the official MD5 sum)")
    else:  # MNIST and Fashion-MNIST: torchvision reads the gunzipped archives
        folder = root / dataset.__name__ / "raw"
        for archive, _ in dataset.resources:
            path = folder / archive.removesuffix(".gz")
            if not path.is_file():
                missing.append(path)
            elif problem := _idx_problem(path):
                damaged.append(f"{path} ({problem})")
    return damaged, missing


def _open(dataset: type[VisionDataset], root: Path, train: bool, download: bool) -> VisionDataset:
    try:
        return dataset(root=root, train=train, download=download)
    except (RuntimeError, OSError, ValueError, AssertionError) as error:  # torchvision's "not found", failed fetches
        expected = root / OFFICIAL_FILES[dataset]
        damaged, missing = _check_files(dataset, root)
        if damaged:
            also = f"; missing: {', '.join(map(str, missing))}" if missing else ""
            fetched = f" Fetching them again failed ({type(error).__name__}: {error})." if download else ""
            raise DataError(
                f"{dataset.__name__} in {root}: {len(damaged)} file(s) damaged or truncated: {'; '.join(damaged)}"
                f"{also}.{fetched} Delete them and copy the official files again to {expected}, or fetch them again "
                "with data.download=true (needs internet)."
            ) from error
        if download:
            raise DataError(
                f"Could not download {dataset.__name__} into {root} ({type(error).__name__}: {error}). Without "
                f"internet, copy the official files to {expected}: files already there are read without downloading."
            ) from error
        raise DataError(
            f"{dataset.__name__} not found in {root} ({error}): expected the official files at {expected}. "
            "Set data.download=true to fetch them (needs internet), or point data.root at the folder that holds them."
        ) from error


def _arrays(dataset: VisionDataset, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, channels) images and int64 labels: MNIST stores (N, H, W) tensors, CIFAR (N, H, W, 3)."""
    images = np.asarray(dataset.data, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return match_channels(images, channels), np.asarray(dataset.targets, dtype=np.int64)


def load_standard(
    dataset: type[VisionDataset], root: str | Path, download: bool, channels: int, val_fraction: float, split_seed: int
) -> ImageSplits:
    """The official train split less a stratified validation share, and the official test split."""
    if channels not in CHANNEL_COUNTS:
        raise DataError(f"data.channels={channels!r}: must be 1 or 3 (e.g. data.channels=3)")
    root = Path(root)
    train = _open(dataset, root, train=True, download=download)
    test = _open(dataset, root, train=False, download=download)
    images, labels = _arrays(train, channels)
    kept, held = stratified_holdout(
        np.arange(len(labels)), labels, val_fraction, split_seed, f"data.source.val_fraction={val_fraction}"
    )
    kept, held = np.sort(kept), np.sort(held)
    return ImageSplits(
        train=ImageSet(images[kept], labels[kept]),
        val=ImageSet(images[held], labels[held]),
        test=ImageSet(*_arrays(test, channels)),
        classes=list(train.classes),
    )


def load_mnist(root: str | Path, download: bool, channels: int, val_fraction: float, split_seed: int) -> ImageSplits:
    """MNIST: 70,000 28×28 grayscale handwritten digits, 60,000 train and 10,000 test."""
    return load_standard(MNIST, root, download, channels, val_fraction, split_seed)


def load_fashion_mnist(
    root: str | Path, download: bool, channels: int, val_fraction: float, split_seed: int
) -> ImageSplits:
    """Fashion-MNIST: 70,000 28×28 grayscale photos of clothing in 10 classes, 60,000 train and 10,000 test."""
    return load_standard(FashionMNIST, root, download, channels, val_fraction, split_seed)


def load_cifar10(root: str | Path, download: bool, channels: int, val_fraction: float, split_seed: int) -> ImageSplits:
    """CIFAR-10: 60,000 32×32 colour photos in 10 classes, 50,000 train and 10,000 test."""
    return load_standard(CIFAR10, root, download, channels, val_fraction, split_seed)


def load_cifar100(root: str | Path, download: bool, channels: int, val_fraction: float, split_seed: int) -> ImageSplits:
    """CIFAR-100: 60,000 32×32 colour photos in 100 fine classes, 50,000 train and 10,000 test."""
    return load_standard(CIFAR100, root, download, channels, val_fraction, split_seed)

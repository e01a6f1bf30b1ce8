"""Throughput of the `heavy` augmentation: Albumentations (ours) against an equivalent torchvision v2 pipeline.

    .venv/bin/python benchmarks/augment_throughput.py [--images 400] [--workers 2]

1. Per core: both pipelines in this process with one thread each (torch and OpenCV), the same uint8 HWC
   source images (what every data source yields), at 32×32 and 224×224 output, timed side by side.
2. The training loader: pipeline.data's DataModule with `aug=heavy` at 224×224, with 0 workers and with
   `--workers` worker processes, images/s over whole epochs (batches collated, tensors ready to train).

torchvision has no grid/optical distortion, RGB shift or PCA colour noise: its pipeline uses the nearest
equivalents (elastic only; ColorJitter for the colour family), so it does slightly *less* work.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch
from torchvision.transforms import v2

from pipeline.config import compose
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.images import ImageSet, ImageSplits
from pipeline.data.transforms import InputSpec, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_heavy(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(0.75, 1.3333), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.RandomAffine(degrees=15, shear=10)], p=0.5),
            v2.RandomApply([v2.ElasticTransform(alpha=30.0, sigma=5.0)], p=0.3),
            v2.RandomApply([v2.ColorJitter(hue=0.03, saturation=0.2)], p=0.3),
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.3),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def source_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Photo-sized RGB images of varied shape (smooth noise, so resizing does real work)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = rng.integers(200, 400, size=2)
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        images.append(cv2.resize(small, (int(width), int(height)), interpolation=cv2.INTER_CUBIC))
    return images


def per_core(images: list[np.ndarray], size: int, rounds: int = 3) -> tuple[float, float]:
    heavy = compose(["aug=heavy"]).aug.train
    ours = train_transform(heavy, InputSpec((size, size), 3, MEAN, STD), seed=0)
    theirs = torchvision_heavy(size)
    best = {"albumentations": 0.0, "torchvision": 0.0}
    for _ in range(rounds):  # interleaved, best of rounds: both see the same machine state
        for name, apply in (
            ("albumentations", lambda img: ours(image=img)["image"]),
            ("torchvision", lambda img: theirs(torch.from_numpy(img).permute(2, 0, 1))),
        ):
            start = time.perf_counter()
            for image in images:
                apply(image)
            best[name] = max(best[name], len(images) / (time.perf_counter() - start))
    return best["albumentations"], best["torchvision"]


def loader_rate(images: list[np.ndarray], workers: int, epochs: int = 2) -> float:
    square = np.stack([cv2.resize(img, (256, 256)) for img in images])  # ImageSet holds one array
    labels = np.arange(len(square)) % 10
    part = ImageSet(square, labels)
    splits = ImageSplits(part, part, part, [str(i) for i in range(10)])
    spec = InputSpec((224, 224), 3, MEAN, STD)
    module = ImageDataModule(
        splits,
        train_transform(compose(["aug=heavy"]).aug.train, spec, seed=0),
        train_transform({}, spec, seed=0),
        batch_size=64,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    loader = module.train_dataloader()
    for _ in loader:  # warm-up epoch: worker start-up is not throughput
        pass
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for batch, _labels in loader:
            seen += len(batch)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = source_images(args.images)

    print("| output | Albumentations (img/s, 1 core) | torchvision v2 (img/s, 1 core) | speed-up |")
    print("|---|---:|---:|---:|")
    for size in (32, 224):
        ours, theirs = per_core(images, size)
        print(f"| {size}×{size} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.1f}× |", flush=True)

    print("\n| loader at 224×224, aug=heavy, batch 64 | images/s |\n|---|---:|")
    for workers in sorted({0, 1, args.workers}):  # in the main process; one worker; every core
        print(f"| num_workers={workers} | {loader_rate(images, workers):.0f} |", flush=True)


if __name__ == "__main__":
    main()

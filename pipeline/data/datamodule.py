"""The LightningDataModule: image splits + transforms → DataLoaders.

The loaders yield uint8 batches (pipeline.data.transforms); the LightningModule normalises them on the training device
(pipeline.data.normalize). Each loader worker runs torch and OpenCV on one thread: the workers are the parallelism,
and a thread pool per worker on shared cores only adds contention. With no workers (num_workers=0) the main process
augments, and OpenCV runs on one thread there too (torch keeps its threads: they train).

Images held in memory (digits, MNIST, CIFAR) are resized once, when their loader is built, if the pipeline starts with
a Resize (pipeline.data.transforms.resized_in_advance): every pipeline's tail resizes to the model's input, and the
`affine` preset resizes first, so each epoch would otherwise resize every image again, to the same pixels.

Training images that are JPEGs are decoded at a reduced scale where the augmentation allows it (data.draft: see
pipeline.data.transforms.draft_scale); validation and test images are decoded in full, as pipeline.predict and the
served model decode them, so every evaluation computes the same numbers.

Every data-parallel rank draws its own augmentations. The seed is the same on every rank (so the networks start
alike), and the ranks' loaders and Albumentations pipelines would all replay one stream: the rank is mixed into the
train transform's seed and each loader worker's seed (pipeline.data.workers.rank_seed). Rank 0 keeps the streams of
a single process.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.decode import MinScale
from pipeline.data.errors import DataError
from pipeline.data.images import ImageSet, ImageSplits, LabelledImages, read
from pipeline.data.transforms import draft_scale, resized_in_advance
from pipeline.data.workers import rank_seed


class TransformedImages(Dataset):
    """`images` through `transform`; image files decoded smaller where `min_scale` allows (None: in full)."""

    def __init__(
        self, images: LabelledImages, transform: Callable[..., dict[str, Any]], min_scale: MinScale | None = None
    ) -> None:
        self.images = images
        self.transform = transform
        self.min_scale = min_scale

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = read(self.images, index, self.min_scale)
        return self.transform(image=np.ascontiguousarray(image))["image"], label


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """Run each loader worker on one thread (torch and OpenCV), and give it its own augmentation stream, distinct on
    every data-parallel `rank`.

    Albumentations keeps a random state inside each Compose, untouched by global seeding; every worker
    would otherwise replay the main process's copy, so all workers (and every epoch, when workers are
    re-created) would draw the same augmentations. PyTorch's per-worker seed differs by worker and by
    epoch and derives from the main process's seeded generator, so runs stay reproducible; that generator
    is seeded alike on every rank, so the rank is mixed in (on rank 0 the seed is PyTorch's own).
    """
    torch.set_num_threads(1)  # OpenCV's one thread comes from the main process (see ImageDataModule._loader)
    info = torch.utils.data.get_worker_info()
    seed = rank_seed(info.seed % 2**32, rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def random_generators(transform: Any) -> list[tuple[np.random.Generator, random.Random]]:
    """The (NumPy, Python) generators of an Albumentations pipeline and of every transform in it, in order."""
    found = []
    if hasattr(transform, "random_generator") and hasattr(transform, "py_random"):
        found.append((transform.random_generator, transform.py_random))
    for child in getattr(transform, "transforms", []):
        found.extend(random_generators(child))
    return found


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        splits: ImageSplits,
        train_transform: Callable[..., dict[str, Any]],
        eval_transform: Callable[..., dict[str, Any]],
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: int | None,
        drop_last: bool = False,
        draft: bool = False,
    ) -> None:
        """`drop_last`: leave out the last, smaller training batch of each epoch (Mixup needs even batches). `draft`:
        decode training JPEGs at a reduced scale where the train transform allows it (see the module's docstring)."""
        super().__init__()
        if len(splits.train) < batch_size:
            # Not one full batch per epoch: batch statistics are noise and BatchNorm fails on a batch of one.
            raise DataError(
                f"The training split has {len(splits.train)} images, fewer than one batch of "
                f"data.batch_size={batch_size}: lower data.batch_size (e.g. data.batch_size="
                f"{1 << max(0, len(splits.train).bit_length() - 1)}) or add training images."
            )
        self.splits = splits
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.draft = draft
        self.seeded_rank: int | None = None  # the rank whose stream the train transform draws, once set up
        self.loader_options: dict[str, Any] = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            # Both options are only valid with worker processes.
            "persistent_workers": persistent_workers and num_workers > 0,
            "prefetch_factor": prefetch_factor if num_workers > 0 else None,
        }

    @property
    def rank(self) -> int:
        """This process's data-parallel rank (0 outside a Trainer)."""
        return self.trainer.global_rank if self.trainer is not None else 0

    def setup(self, stage: str) -> None:
        # Lightning calls this once the Trainer knows the rank, before it restores a checkpoint's state.
        if stage == "fit":
            self.draw_as_rank(self.rank)

    def draw_as_rank(self, rank: int) -> None:
        """Make the train transform's stream (drawn in this process, without loader workers) rank `rank`'s own: its
        seed mixed with the rank (see the module's docstring). Once; an unseeded transform is left as it is."""
        if self.seeded_rank is not None:
            return
        self.seeded_rank = rank
        seed = getattr(self.train_transform, "seed", None)
        if rank and seed is not None:
            self.train_transform.set_random_seed(rank_seed(seed, rank))

    def _loader(self, images: LabelledImages, transform: Callable[..., dict[str, Any]], train: bool) -> DataLoader:
        workers = self.loader_options["num_workers"] > 0
        # One OpenCV thread, set here in the main process: forked workers inherit it, and the main process runs
        # OpenCV only to augment when there are no workers. Not in the workers themselves: OpenCV changing its thread
        # count in a forked child waits forever on its pool's locks, copied from the parent mid-use.
        cv2.setNumThreads(1)
        min_scale = draft_scale(transform) if train and self.draft and hasattr(transform, "transforms") else None
        if isinstance(images, ImageSet):
            resized = resized_in_advance(images.images, transform)
            images = ImageSet(resized, images.labels) if resized is not None else images
        return DataLoader(
            TransformedImages(images, transform, min_scale),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            worker_init_fn=functools.partial(seed_worker, rank=self.rank) if workers else None,
            **self.loader_options,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the augmentation streams stand. Without loader workers they run in this process, each transform
        with generators of its own: kept in checkpoints, so a resumed run augments as an uninterrupted one would."""
        states = [[g.bit_generator.state, r.getstate()] for g, r in random_generators(self.train_transform)]
        return {"augmentation_rng": states} if states else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the streams where the checkpoint left them. A checkpoint holds the first process's streams only:
        every other rank continues from a seed drawn from them and mixed with its rank, the same on every resume."""
        saved = state_dict.get("augmentation_rng", [])
        generators = random_generators(self.train_transform)
        if len(saved) != len(generators):
            return  # another augmentation pipeline than the checkpoint's: it starts from its seed
        for (generator, py_random), (generator_state, py_random_state) in zip(generators, saved, strict=True):
            generator.bit_generator.state = generator_state  # in place: the transforms hold these very objects
            py_random.setstate(py_random_state)
        rank = self.seeded_rank or 0
        if rank and generators and hasattr(self.train_transform, "set_random_seed"):
            restored = int(generators[0][0].integers(2**32))
            self.train_transform.set_random_seed(rank_seed(restored, rank))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, self.train_transform, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, self.eval_transform, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.test, self.eval_transform, train=False)

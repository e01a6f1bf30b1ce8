"""Streaming shards into training: which samples each data-parallel rank and each loader worker reads in an epoch,
shuffled, in exactly equal batch counts on every rank, and resumable where a checkpoint left off.

The plan of an epoch is a pure function of (seed, epoch, rank, world size, workers, batch size):
1. the split's shards are put in an order drawn from (seed, epoch) — shard-level shuffling — and read as one stream;
2. training: every rank takes its own contiguous run of `total // world` samples of that stream (the last
   `total % world` samples, different ones each epoch, wait for the next): the same number on every rank, so every rank
   runs the same number of batches and no rank waits at a gradient all-reduce for one that has stopped. Evaluation:
   the stream is cut in `world` runs differing by at most one sample, so every image is evaluated exactly once;
3. a rank's run is cut between its loader workers in whole batches (the last worker takes the rest), so the loader
   yields exactly ceil(run / batch) batches (floor with drop_last) — its `len`, which Lightning schedules by;
4. each worker reads its part in blocks of `shuffle_block` samples and yields each block in an order drawn from
   (seed, epoch, rank, worker, block) — sample-level shuffling on top of the converter's shuffled write order.

Because a block's order depends only on those numbers, a position is resumable exactly: after k batches of an epoch,
each worker's share of them is known (PyTorch's loader takes batches from its workers in turn), so a resumed run skips
the blocks before it without reading them (the index gives every sample's byte offset) and the used part of the
current block, and goes on with the very batches the interrupted run would have drawn next (the workers' parts are
rotated so that the one whose batch came next goes first: a new loader starts its turns at worker 0). The loader
reads the epoch and the batches already done from the Trainer when its first batch is asked for (after Lightning has
restored a checkpoint and started the epoch), which is also why its workers start afresh each epoch (no persistent
workers).
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.datamodule import ImageDataModule, seed_worker
from pipeline.data.images import LabelledImages
from pipeline.data.shards import ShardSet

# Lightning warns that an IterableDataset's length may be wrong with several workers: this one cuts its share between
# the workers itself (ShardStream.plan), so the length is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard number `shard`."""

    shard: int
    start: int
    stop: int


def shard_order(shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(shards)
    return np.random.default_rng([seed, epoch]).permutation(shards)


def rank_share(total: int, rank: int, world: int, equal: bool) -> tuple[int, int]:
    """The positions [start, stop) of the epoch's stream that `rank` reads."""
    if equal:
        size = total // world
        return rank * size, (rank + 1) * size
    return total * rank // world, total * (rank + 1) // world


def worker_shares(start: int, stop: int, batch: int, workers: int) -> list[tuple[int, int]]:
    """A rank's positions cut between `workers` in whole batches (the last batch, maybe short, to the last worker)."""
    batches = -(-(stop - start) // batch)
    edges = [start + min(batches * w // workers * batch, stop - start) for w in range(workers + 1)]
    return list(itertools.pairwise(edges))


def batches_done(counts: list[int], consumed: int) -> tuple[list[int], int]:
    """How many of its batches each worker has delivered once the loader has yielded `consumed`, and the worker whose
    batch comes next: PyTorch's loader takes one batch from each worker in turn, skipping workers that have run out."""
    done, worker = [0] * len(counts), 0
    while consumed > 0 and sum(done) < sum(counts):
        if done[worker] < counts[worker]:
            done[worker] += 1
            consumed -= 1
        worker = (worker + 1) % len(counts)
    while sum(done) < sum(counts) and done[worker] >= counts[worker]:
        worker = (worker + 1) % len(counts)
    return done, worker


def pieces(order: np.ndarray, sizes: np.ndarray, start: int, stop: int) -> list[Piece]:
    """Positions [start, stop) of the stream that reads shards in `order` (`sizes` in shard-number order)."""
    found, position = [], 0
    for shard in order:
        size = int(sizes[shard])
        low, high = max(start, position), min(stop, position + size)
        if low < high:
            found.append(Piece(int(shard), low - position, high - position))
        position += size
        if position >= stop:
            break
    return found


@dataclass(frozen=True)
class EpochPlan:
    """What one loader worker of one rank reads in one epoch, and what it skips when resumed."""

    pieces: list[Piece]  # its positions, as shard pieces, in stream order
    length: int  # samples in it
    skip: int  # samples already delivered before a resume


class ShardStream(IterableDataset):
    """The samples of a ShardSet that this rank reads in an epoch, decoded and transformed in the loader's workers."""

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable[..., dict[str, Any]],
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world: int,
        drop_last: bool,
    ) -> None:
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.train, self.seed, self.rank, self.world, self.drop_last = train, seed, rank, world, drop_last
        self.epoch, self.skip_batches, self.workers = 0, 0, 1
        self.rotation = 0  # loader worker i plays the part of worker (i + rotation) % workers (see resume())
        self.sizes = np.array([shard.samples for shard in shards.shards], dtype=np.int64)

    def share(self) -> tuple[int, int]:
        start, stop = rank_share(len(self.shards), self.rank, self.world, equal=self.train)
        if self.drop_last:
            stop = start + (stop - start) // self.batch_size * self.batch_size
        return start, stop

    def __len__(self) -> int:
        start, stop = self.share()
        return stop - start

    def counts(self) -> list[int]:
        """The batches each worker delivers in an epoch."""
        return [-(-(stop - start) // self.batch_size) for start, stop in self.shares()]

    def shares(self) -> list[tuple[int, int]]:
        return worker_shares(*self.share(), self.batch_size, self.workers)

    def resume(self, epoch: int, done: int) -> None:
        """Start `epoch` after its first `done` batches. A resumed loader asks its workers for batches in turn from
        worker 0 again; the one whose batch came next must go first, so the workers' parts are rotated."""
        self.epoch, self.skip_batches = epoch, done
        self.rotation = batches_done(self.counts(), done)[1] if done else 0

    def plan(self, worker: int) -> EpochPlan:
        """What loader worker `worker` reads (the part of worker `worker + rotation`)."""
        worker = (worker + self.rotation) % self.workers
        shuffle = self.train and self.shards.options.shard_shuffle
        order = shard_order(len(self.sizes), self.seed, self.epoch, shuffle)
        done = batches_done(self.counts(), self.skip_batches)[0][worker]
        start, stop = self.shares()[worker]
        return EpochPlan(
            pieces(order, self.sizes, start, stop), stop - start, min(done * self.batch_size, stop - start)
        )

    def _blocks(self, plan: EpochPlan) -> Iterator[list[tuple[bytes, int]]]:
        """The worker's samples in blocks of shuffle_block, from the block holding its resume position on."""
        block = self.shards.options.shuffle_block
        first = plan.skip // block * block  # blocks wholly before the resume position are not read
        position, current = 0, []
        for piece in plan.pieces:
            low = piece.start + max(0, first - position)
            if low < piece.stop:
                for sample in self.shards.encoded(piece.shard, low, piece.stop):
                    current.append(sample)
                    if len(current) == block:
                        yield current
                        current = []
            position += piece.stop - piece.start
        if current:
            yield current

    def _encoded(self, worker: int) -> Iterator[tuple[bytes, int]]:
        """(image bytes, label) in the order this worker delivers them: shuffled by blocks when training; evaluation
        reads its pieces in order."""
        plan = self.plan(worker)
        worker = (worker + self.rotation) % self.workers
        if not self.train:
            for piece in plan.pieces:
                yield from self.shards.encoded(piece.shard, piece.start, piece.stop)
            return
        block = self.shards.options.shuffle_block
        skip, number = plan.skip % block, plan.skip // block
        for samples in self._blocks(plan):
            order = np.random.default_rng([self.seed, self.epoch, self.rank, worker, number]).permutation(len(samples))
            for position in order[skip:]:
                yield samples[position]
            skip, number = 0, number + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        for data, label in self._encoded(info.id if info is not None else 0):
            image = self.shards.decode(data, self.shards.store.url)
            yield self.transform(image=image)["image"], label


class ShardLoader(DataLoader):
    """A DataLoader over a ShardStream that learns its epoch and resume position from the Trainer when the first batch
    is asked for, and whose workers start afresh each epoch (they must see the new epoch's plan)."""

    def __init__(self, stream: ShardStream, position: Callable[[], tuple[int, int]], **options: Any) -> None:
        options["persistent_workers"] = False
        super().__init__(stream, batch_size=stream.batch_size, **options)
        stream.workers = max(1, self.num_workers)
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        return _Deferred(self)

    def start(self) -> Iterator[Any]:
        epoch, done = self.position()
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        stream.resume(epoch, done if 0 < done < len(self) else 0)
        return super().__iter__()

    # Lightning keeps these in its checkpoints (a loader without them gets a warning on a mid-epoch resume); the
    # position itself is read back from the Trainer's own restored batch count, see start().
    def state_dict(self) -> dict[str, int]:
        epoch, done = self.position()
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass  # the position is the Trainer's (start()): what was saved needs no reading back


class _Deferred:
    """The loader's iterator, made on the first `next` (Lightning calls `iter` before it restores the epoch)."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self) -> _Deferred:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader.start()
        return next(self.iterator)

    def __len__(self) -> int:
        return len(self.loader)


class ShardDataModule(ImageDataModule):
    """ImageDataModule for `data=shards`: every split streams from its shards (see the module docstring)."""

    def _position(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _loader(self, images: LabelledImages, transform: Callable[..., dict[str, Any]], train: bool) -> DataLoader:
        assert isinstance(images, ShardSet)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = getattr(self.train_transform, "seed", None)
        stream = ShardStream(
            images,
            transform,
            self.batch_size,
            train=train,
            seed=0 if seed is None else int(seed),
            rank=rank,
            world=world,
            drop_last=train and self.drop_last,
        )
        workers = self.loader_options["num_workers"] > 0
        cv2.setNumThreads(1)  # as ImageDataModule's loaders: set before the workers fork, inherited by them
        options = {key: value for key, value in self.loader_options.items() if key != "persistent_workers"}
        return ShardLoader(
            stream,
            self._position if train else (lambda: (0, 0)),
            worker_init_fn=functools.partial(seed_worker, rank=rank) if workers else None,
            **options,
        )

"""Every data-parallel rank draws its own augmentations, reproducibly from `seed`: in its own process (no loader
workers) and in each of its loader workers; two DDP ranks fed the same pixels transform them differently."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data.datamodule import ImageDataModule, TransformedImages, seed_worker
from pipeline.data.images import ImageSet, ImageSplits
from pipeline.data.transforms import InputSpec, train_transform
from pipeline.data.workers import rank_seed
from tests.conftest import QUIET
from tests.helpers.isolation import run_isolated

SPEC = InputSpec(size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
ROTATE = {"Affine": {"rotate": [-45, 45], "p": 1.0}}  # every image drawn a different way
COPIES = 8


def one_image_repeated() -> ImageSet:
    """`COPIES` copies of one random image: whatever tells two batches apart is the augmentation."""
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    return ImageSet(np.repeat(image, COPIES, axis=0), np.zeros(COPIES, dtype=np.int64))


def datamodule(seed: int) -> ImageDataModule:
    images = one_image_repeated()
    splits = ImageSplits(train=images, val=images, test=images, classes=["a", "b"])
    return ImageDataModule(
        splits, train_transform(ROTATE, SPEC, seed=seed), train_transform(None, SPEC, seed=seed), COPIES, 0, False,
        False, None,
    )  # fmt: skip


def in_process_batch(seed: int, rank: int) -> torch.Tensor:
    data = datamodule(seed)
    data.draw_as_rank(rank)
    (images, _), *_ = data.train_dataloader()
    return images


def worker_batches(seed: int, rank: int) -> torch.Tensor:
    torch.manual_seed(seed)  # what seed_everything does before the loader draws its workers' base seed
    dataset = TransformedImages(one_image_repeated(), train_transform(ROTATE, SPEC, seed=seed))
    loader = DataLoader(
        dataset, batch_size=COPIES // 2, num_workers=2, worker_init_fn=functools.partial(seed_worker, rank=rank)
    )
    return torch.cat([images for images, _ in loader])


def test_rank_seed_is_the_seed_on_rank_zero_and_fixed_and_distinct_on_the_others() -> None:
    assert rank_seed(7, 0) == 7, "a single process draws what it always drew"
    assert rank_seed(7, 1) == rank_seed(7, 1)
    seeds = {rank_seed(seed, rank) for seed in (0, 1, 7) for rank in range(8)}
    assert len(seeds) == 3 * 8
    assert all(0 <= seed < 2**32 for seed in seeds)


def test_the_same_seed_and_rank_draw_the_same_augmentations_in_process() -> None:
    first = in_process_batch(seed=0, rank=1)
    assert torch.equal(first, in_process_batch(seed=0, rank=1)), "reproducible from seed and rank"
    assert not torch.equal(first, in_process_batch(seed=0, rank=0)), "rank 1 draws apart from rank 0"
    assert not torch.equal(first, in_process_batch(seed=0, rank=2))
    assert not torch.equal(first, in_process_batch(seed=1, rank=1)), "and the seed still matters"


def resumed_batch(state: dict[str, object], rank: int) -> torch.Tensor:
    data = datamodule(seed=0)
    data.draw_as_rank(rank)  # Lightning sets up the data before it restores the checkpoint's state
    data.load_state_dict(state)
    (images, _), *_ = data.train_dataloader()
    return images


def test_a_resumed_run_draws_the_checkpoint_stream_on_rank_zero_and_a_fixed_distinct_one_elsewhere() -> None:
    first = datamodule(seed=0)
    first.draw_as_rank(0)
    next(iter(first.train_dataloader()))  # an epoch drawn, then checkpointed (by the first process only)
    state = first.state_dict()
    (uninterrupted, _), *_ = first.train_dataloader()
    assert torch.equal(resumed_batch(state, rank=0), uninterrupted), "rank 0 continues as if never stopped"
    assert not torch.equal(resumed_batch(state, rank=1), uninterrupted), "rank 1 does not replay rank 0's stream"
    assert torch.equal(resumed_batch(state, rank=1), resumed_batch(state, rank=1)), "the same on every resume"


def test_the_same_seed_and_rank_draw_the_same_augmentations_in_loader_workers() -> None:
    first = worker_batches(seed=0, rank=1)
    assert torch.equal(first, worker_batches(seed=0, rank=1)), "reproducible from seed and rank"
    assert not torch.equal(first, worker_batches(seed=0, rank=0)), "rank 1's workers draw apart from rank 0's"


def write_identical_images(root: Path, per_class: int = 24) -> Path:
    """Two class folders of one and the same picture: each rank's first batch is the same pixels before augmentation,
    whichever files its sampler gives it."""
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    return root


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (gloo's isolation) need root")
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "loader-workers"])
def test_two_ddp_ranks_transform_the_same_images_differently(root: Path, workers: int) -> None:
    images, digests = write_identical_images(root / "images"), root / "digests"
    run_isolated(
        [
            sys.executable, "-m", "pipeline.train", f"paths.root={root}", *QUIET,
            "trainer=ddp_cpu", "trainer.devices=2",
            "data=imagefolder", f"data.root={images}", "data.channels=1", f"data.num_workers={workers}",
            "data.batch_size=8", "aug=affine", "trainer.max_epochs=1", "logger.log_checkpoint=false",
            "class_activation.images=0", "+callbacks.digest._target_=tests.helpers.batch_digest.FirstBatchDigest",
            f"+callbacks.digest.folder={digests}",
        ],
        root / "ddp.log",
        timeout=300,
    )  # fmt: skip
    first, second = ((digests / f"rank{rank}.txt").read_text().split()[0] for rank in (0, 1))
    assert first != second, "the two ranks augmented the same pixels the same way"


def mixup_draws(seed: int, rank: int | None) -> list[tuple[float, bool]]:
    """The λ and the CutMix switch of five batches, from NumPy's generator seeded with `seed` (as seed_everything does
    on every rank), made rank `rank`'s own (None: left as it is)."""
    from timm.data import Mixup

    from pipeline.module import mix_as_rank

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, num_classes=10)
    np.random.seed(seed)
    if rank is not None:
        mix_as_rank(rank)
    return [mixup._params_per_batch() for _ in range(5)]


def test_mixup_draws_its_own_stream_on_every_rank_reproducibly() -> None:
    assert mixup_draws(7, 0) == mixup_draws(7, None), "rank 0 draws what a single process always drew"
    assert mixup_draws(7, 1) == mixup_draws(7, 1) and mixup_draws(7, 2) == mixup_draws(7, 2)
    firsts = {draws[0] for draws in (mixup_draws(7, 0), mixup_draws(7, 1), mixup_draws(7, 2))}
    assert len(firsts) == 3, "three ranks mix their batches with three different λ"
    assert mixup_draws(8, 1) != mixup_draws(7, 1), "and the seed still decides"

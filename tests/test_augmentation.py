"""Augmentation from YAML: every option on grayscale and RGB, clear errors, previews, independent workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import CONF_DIR
from pipeline.data.datamodule import TransformedImages, seed_worker
from pipeline.data.images import ImageSet
from pipeline.data.transforms import AugmentationError, InputSpec, build_transforms, train_transform
from tests.conftest import REPO, clean_env, compose_in, run_cli

AUGS = sorted(p.stem for p in (CONF_DIR / "aug").glob("*.yaml"))


def spec(channels: int, size: tuple[int, int] = (32, 32)) -> InputSpec:
    return InputSpec(size=size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)


def images(count: int, channels: int, size: tuple[int, int]) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(
        rng.integers(0, 256, (count, *size, channels), dtype=np.uint8), np.arange(count, dtype=np.int64) % 7
    )


@pytest.mark.parametrize("aug", AUGS)
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
@pytest.mark.parametrize(("source", "target"), [((8, 8), (32, 32)), ((60, 45), (40, 48))], ids=["up", "down"])
def test_every_option_runs_and_keeps_labels_aligned(
    root: Path, aug: str, channels: int, source: tuple[int, int], target: tuple[int, int]
) -> None:
    entries = compose_in(root, [f"aug={aug}"]).aug.train
    data = images(12, channels, source)
    data.images.setflags(write=False)  # as decoded files are (NumPy's view of Pillow's bytes): no step may write
    dataset = TransformedImages(data, train_transform(entries, spec(channels, target), seed=0))
    for index in range(len(data)):
        tensor, label = dataset[index]
        # uint8 out of the loader: normalised on the training device
        assert tensor.shape == (channels, *target) and tensor.dtype == torch.uint8
        assert label == data.labels[index]


def test_unknown_transform_is_named_with_suggestions() -> None:
    with pytest.raises(AugmentationError, match=r"aug\.train\.HorizontalFlipp: unknown .* Did you mean HorizontalFlip"):
        build_transforms({"HorizontalFlipp": {"p": 0.5}}, spec(3))


def test_nested_unknown_transform_names_its_place() -> None:
    with pytest.raises(AugmentationError, match=r"aug\.train\.warp\.transforms\.Elastic: unknown"):
        build_transforms({"warp": {"transform": "OneOf", "transforms": {"Elastic": {}}}}, spec(3))


def test_bad_parameter_value_is_named() -> None:
    with pytest.raises(AugmentationError, match=r"aug\.train\.RandomResizedCrop: bad arguments .*scale"):
        build_transforms({"RandomResizedCrop": {"size": None, "scale": [2.0, 1.0]}}, spec(3))


def test_unknown_argument_is_an_error_not_a_warning() -> None:
    with pytest.raises(AugmentationError, match=r"HorizontalFlip has no argument\(s\) \['prob'\]"):
        build_transforms({"HorizontalFlip": {"prob": 0.5}}, spec(3))


def test_null_switches_an_entry_off_and_null_size_means_the_input_size() -> None:
    built = build_transforms({"HorizontalFlip": None, "RandomResizedCrop": {"size": None}}, spec(1, (24, 40)))
    assert [type(t).__name__ for t in built] == ["RandomResizedCrop"]
    assert tuple(built[0].size) == (24, 40)


def first_batch(dataset: TransformedImages, workers: int) -> torch.Tensor:
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, worker_init_fn=seed_worker)
    return torch.cat([batch for batch, _ in loader])


def test_loader_workers_draw_different_augmentations_reproducibly() -> None:
    one_image = ImageSet(np.repeat(images(1, 3, (32, 32)).images, 8, axis=0), np.zeros(8, dtype=np.int64))
    entries = {"Affine": {"rotate": [-45, 45], "p": 1.0}}
    dataset = TransformedImages(one_image, train_transform(entries, spec(3), seed=0))
    views = first_batch(dataset, workers=2)
    first_worker, second_worker = views[:4], views[4:]  # batches alternate between the two workers
    assert not torch.equal(first_worker, second_worker), "each worker has its own augmentation stream"
    assert torch.equal(views, first_batch(dataset, workers=2)), "and the same seed gives the same stream"


@pytest.mark.e2e
def test_preview_cli_writes_a_real_png(root: Path) -> None:
    path = root / "preview.png"
    done = run_cli(
        "pipeline.augment", "aug=heavy", "preview.samples=3", "preview.views=4", f"preview.path={path}", root=root
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.width >= 5 * 96 and picture.height >= 3 * 96  # 1 + 4 tiles per row, 3 rows


@pytest.mark.parametrize("alpha", [0.1, 3.0], ids=["heavy's", "large"])
def test_our_fancy_pca_draws_and_outputs_what_albumentations_does(alpha: float) -> None:
    import albumentations as A

    from pipeline.data.augmentations import FancyPCA

    assert isinstance(build_transforms({"FancyPCA": {"alpha": alpha}}, spec(3))[0], FancyPCA)
    rng = np.random.default_rng(1)
    for channels in (3, 1):
        smooth = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
        ours, theirs = (A.Compose([kind(alpha=alpha, p=1.0)], seed=3) for kind in (FancyPCA, A.FancyPCA))
        for _ in range(4):  # the same draws from the same seed, and the same image to within one level of 255
            difference = ours(image=smooth)["image"].astype(int) - theirs(image=smooth)["image"].astype(int)
            assert np.abs(difference).max() <= 1


def test_our_resize_passes_an_image_at_its_size_through_and_resizes_others_as_albumentations_does() -> None:
    import albumentations as A

    from pipeline.data.augmentations import Resize

    assert isinstance(build_transforms({"Resize": {"height": None, "width": None}}, spec(1))[0], Resize)
    rng = np.random.default_rng(2)
    for shape in [(32, 32, 1), (32, 32, 3), (8, 8, 1), (40, 24, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        ours, theirs = Resize(32, 32)(image=image)["image"], A.Resize(32, 32)(image=image)["image"]
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
        if shape[:2] == (32, 32):
            assert ours is image, "no copy of an image already at the size"


def _albumentations_own(transform: object) -> object:
    """The same pipeline and seed with Albumentations' Resize, which resizes every image every time."""
    import albumentations as A

    from pipeline.data.augmentations import Resize

    steps = [
        A.Resize(t.height, t.width, interpolation=t.interpolation) if isinstance(t, Resize) else t for t in transform
    ]
    return A.Compose(steps, seed=transform.seed)


@pytest.mark.parametrize("aug", ["affine", "none"])
def test_a_set_held_in_memory_is_resized_once_and_trains_on_the_same_batches(root: Path, aug: str) -> None:
    from pipeline.data.datamodule import ImageDataModule
    from pipeline.data.images import ImageSplits
    from pipeline.data.transforms import eval_transform

    part = images(40, 1, (8, 8))
    splits = ImageSplits(part, part, part, [str(n) for n in range(7)])
    entries, input_spec = compose_in(root, [f"aug={aug}"]).aug.train, spec(1)

    def batches(train: object, evaluate: object, held_size: tuple[int, int]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        data = ImageDataModule(splits, train, evaluate, 8, 0, False, False, None)
        loaders = [data.train_dataloader(), data.train_dataloader(), data.val_dataloader()]  # two epochs, validation
        assert all(loader.dataset.images.images.shape[1:3] == held_size for loader in loaders)
        return [images for loader in loaders for images, _ in loader]

    ours = batches(train_transform(entries, input_spec, seed=0), eval_transform(input_spec), (32, 32))
    own = [
        _albumentations_own(train_transform(entries, input_spec, seed=0)),
        _albumentations_own(eval_transform(input_spec)),
    ]
    theirs = batches(*own, (8, 8))
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_only_a_pipeline_starting_with_a_resize_and_a_set_within_the_limit_are_resized_in_advance(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.data import transforms

    data = images(10, 1, (8, 8)).images
    affine = train_transform(compose_in(root, ["aug=affine"]).aug.train, spec(1), seed=0)
    assert transforms.resized_in_advance(data, affine).shape == (10, 32, 32, 1)
    heavy = train_transform(compose_in(root, ["aug=heavy"]).aug.train, spec(1), seed=0)
    assert transforms.resized_in_advance(data, heavy) is None, "RandomResizedCrop takes the image as it is"
    monkeypatch.setattr(transforms, "RESIZE_IN_ADVANCE_BYTES", 10 * 32 * 32 - 1)
    assert transforms.resized_in_advance(data, affine) is None, "over the limit: resized when drawn"


# Every name a process would look up while it imports the augmentations, printed by an audit hook, which then
# refuses the lookup: the test itself reaches no server.
LOOKUPS = """
import sys

def refuse_lookups(event, args):
    if event == "socket.getaddrinfo":
        print("looked up", args[0], flush=True)
        raise OSError("no lookups in this test")

sys.addaudithook(refuse_lookups)
import pipeline.data.transforms  # Albumentations, imported as a training imports it
"""


def test_a_training_process_asks_no_server_for_albumentations_updates() -> None:
    """Albumentations asks PyPI for its newest version when it is imported, unless NO_ALBUMENTATIONS_UPDATE is set:
    the pipeline sets it, so no command, Ray trial or worker reaches out; a user's own value is kept."""
    env = {name: value for name, value in clean_env().items() if name != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", LOOKUPS], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "looked up" not in done.stdout, done.stdout

    asked = {**env, "NO_ALBUMENTATIONS_UPDATE": "0"}  # the user wants the check: it runs
    done = subprocess.run([sys.executable, "-c", LOOKUPS], cwd=REPO, env=asked, capture_output=True, text=True)
    assert "looked up pypi.org" in done.stdout, done.stdout + done.stderr[-3000:]

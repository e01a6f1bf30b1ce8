"""Training JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) only where the augmentation's first
step resamples to fewer pixels anyway, and the model then sees what full decoding gives but for resampling noise."""

from __future__ import annotations

import io
import math
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.config import CONF_DIR, compose
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.decode import decode_image
from pipeline.data.folder import load_image_folder
from pipeline.data.transforms import InputSpec, draft_scale, eval_transform, train_transform

SPEC = InputSpec((224, 224), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG like a photo: smooth colour fields, a sharp-edged block and fine grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 10, (height, width, 3))
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 30, 40)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_drafted_jpeg_gives_the_model_the_same_image_but_for_resampling_noise(seed: int) -> None:
    transform = eval_transform(SPEC)  # resize the whole image to 224×224
    data = photo(1024, 768, seed)
    full = decode_image(io.BytesIO(data), 3)
    drafted = decode_image(io.BytesIO(data), 3, draft_scale(transform))
    assert drafted.shape == (384, 512, 3), "decoded at half size: still more pixels than 224×224 on each side"
    seen_full = transform(image=full)["image"].numpy().astype(np.int16)
    seen_drafted = transform(image=drafted)["image"].numpy().astype(np.int16)
    # Resampling noise: how far two standard ways of resizing the same fully decoded image land apart.
    linear, area = (cv2.resize(full, (224, 224), interpolation=i).astype(np.int16) for i in (1, cv2.INTER_AREA))
    noise = np.abs(linear - area)
    difference = np.abs(seen_full - seen_drafted)
    assert difference.mean() <= noise.mean() and np.percentile(difference, 99) <= np.percentile(noise, 99)
    assert difference.mean() < 4, "a few levels of 255 on average"


@pytest.mark.parametrize("aug", ["light", "heavy", "strong"])
def test_random_resized_crops_keep_at_least_their_output_pixels(aug: str) -> None:
    transform = train_transform(compose([f"aug={aug}"]).aug.train, SPEC, seed=0)
    crop = transform.transforms[0]
    assert isinstance(crop, A.RandomResizedCrop)
    data = photo(2400, 1800, 0)
    drafted = decode_image(io.BytesIO(data), 3, draft_scale(transform))
    height, width = drafted.shape[:2]
    assert width < 2400, "a large photo is decoded smaller"
    # The smallest crop the step can take (least area, extreme aspect ratios) still has 224 pixels on each side.
    area = crop.scale[0] * width * height
    assert math.sqrt(area * crop.ratio[0]) >= 224 and math.sqrt(area / crop.ratio[1]) >= 224
    # ...and a photo too small to halve is decoded in full.
    assert decode_image(io.BytesIO(photo(500, 400, 0)), 3, draft_scale(transform)).shape == (400, 500, 3)


def test_an_exif_rotated_jpeg_is_drafted_on_its_upright_size() -> None:
    # Stored 1200 wide and 400 tall, shown rotated (orientation 6): upright it is 400 wide and 1200 tall.
    image = Image.open(io.BytesIO(photo(1200, 400, 0)))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=90)
    # Resize to 100 wide × 600 tall: the upright width allows 1/4 (400 → 100), the height only 1/2 (1200 → 600).
    resize = A.Compose([A.Resize(600, 100)])
    assert decode_image(io.BytesIO(buffer.getvalue()), 3, draft_scale(resize)).shape == (600, 200, 3)


@pytest.mark.parametrize(
    "first",
    [A.RandomCrop(64, 64), A.CenterCrop(64, 64), A.GaussianBlur(), A.RandomResizedCrop((224, 224), p=0.5)],
    ids=["random-crop", "centre-crop", "blur", "skippable-resize"],
)
def test_a_first_step_that_needs_the_full_image_turns_drafting_off(first: A.BasicTransform) -> None:
    assert draft_scale(A.Compose([first, A.Resize(224, 224)])) is None


def test_only_the_training_loader_drafts_and_the_config_can_turn_it_off(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(4):
            (root / name / f"{index}.jpg").write_bytes(photo(64, 48, index))
    splits = load_image_folder(root, verify="off", val_fraction=0.25, test_fraction=0.25)
    assert "draft:" in (CONF_DIR / "data" / "imagefolder.yaml").read_text()
    for draft in (True, False):
        module = ImageDataModule(
            splits, train_transform({}, SPEC, seed=0), eval_transform(SPEC), 2, 0, False, False, None, draft=draft
        )
        assert (module.train_dataloader().dataset.min_scale is not None) is draft
        assert module.val_dataloader().dataset.min_scale is None and module.test_dataloader().dataset.min_scale is None


def test_the_draft_scale_travels_to_spawned_workers() -> None:
    import pickle

    for aug in ("none", "light", "heavy"):
        scale = draft_scale(train_transform(compose([f"aug={aug}"]).aug.train, SPEC, seed=0))
        assert pickle.loads(pickle.dumps(scale))(1600, 1200) == scale(1600, 1200)

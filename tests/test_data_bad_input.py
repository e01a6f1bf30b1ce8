"""Bad data stops the run at load time with a message naming the file and the fix — or, with skip, is left out.

Covered: corrupt, truncated and non-image files, images below data.min_size, decompression bombs (and
data.max_image_pixels), empty class folders, a folder with one class, a folder without images, a wrong layout, a
split that cannot be stratified, a training split smaller than a batch; and file names that are not UTF-8, which
are not bad input: they train, and are recorded escaped.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline.data.datamodule import ImageDataModule
from pipeline.data.errors import DataError
from pipeline.data.folder import load_image_folder
from pipeline.data.images import ImageSet, ImageSplits, printable, stored_path
from pipeline.errors import UserInputError
from tests.conftest import run_cli, store_uri

CLASSES = ("cat", "dog")


def good_tree(root: Path, per_class: int = 10, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


def truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return good_tree(tmp_path / "images")


def bad_files(tree: Path) -> dict[Path, str]:
    """One file of each kind the scan must refuse, and the words its reason must contain."""
    jpeg = tree / "cat" / "photo.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(jpeg, quality=90)
    Image.fromarray(np.zeros((5, 30), np.uint8)).save(tree / "dog" / "sliver.png")
    (tree / "dog" / "notes.txt").write_text("not a picture")
    (tree / "dog" / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        truncated_copy(tree / "cat" / "0.png", tree / "cat" / "cut.png"): "truncated",
        truncated_copy(jpeg, tree / "cat" / "cut.jpg"): "truncated",  # passes Image.verify(); a decode catches it
        tree / "dog" / "sliver.png": "smaller than data.min_size=8",
        tree / "dog" / "notes.txt": "not an image",
        tree / "dog" / "fake.png": "corrupt or truncated",  # a PNG signature, then garbage
    }


def test_every_bad_file_is_named_with_its_reason_and_the_fix(tree: Path) -> None:
    expected = bad_files(tree)
    with pytest.raises(DataError) as error:
        load_image_folder(tree, min_size=8)
    message = str(error.value)
    assert isinstance(error.value, UserInputError), "the CLI prints it without a traceback"
    assert f"{len(expected)} image file(s) cannot be used" in message and "data.on_bad_file=skip" in message
    lines = message.splitlines()
    for path, reason in expected.items():
        assert any(str(path) in line and reason in line for line in lines), (path, reason)


def test_skip_leaves_bad_files_out_and_records_them(tree: Path) -> None:
    expected = bad_files(tree)
    splits = load_image_folder(tree, min_size=8, on_bad_file="skip", val_fraction=0.2, test_fraction=0.2)
    assert {Path(path) for path, _ in splits.skipped} == set(expected)
    assert all(reason for _, reason in splits.skipped)
    used = {Path(p) for part in (splits.train, splits.val, splits.test) for p in part.paths}
    assert used.isdisjoint(expected) and len(used) == 2 * 10 + 1  # the good files plus the good JPEG
    assert sum(sum(split.values()) for split in splits.class_counts().values()) == len(used)


def test_min_size_is_configurable(tree: Path) -> None:
    with pytest.raises(DataError, match=r"16x16 px is smaller than data.min_size=20"):
        load_image_folder(tree, min_size=20)


def test_a_class_left_without_images_by_skip_is_an_error(tree: Path) -> None:
    for path in (tree / "dog").iterdir():
        path.write_text("broken")
    with pytest.raises(DataError, match=r"no usable images left for class\(es\) \['dog'\]"):
        load_image_folder(tree, on_bad_file="skip")


def test_empty_class_folder_is_named(tree: Path) -> None:
    (tree / "bird").mkdir()
    (tree / "bird" / ".DS_Store").write_bytes(b"hidden files do not count")
    with pytest.raises(DataError, match=rf"{tree / 'bird'}: empty class folder; add images of 'bird' or remove it"):
        load_image_folder(tree)


def test_folder_without_images_says_what_layout_is_expected(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match=r"no images found — expected one folder per class.*loose\.png"):
        load_image_folder(tmp_path)


def test_a_folder_with_one_class_is_an_error_naming_it(tree: Path) -> None:
    for path in (tree / "dog").iterdir():
        path.unlink()
    (tree / "dog").rmdir()
    with pytest.raises(DataError, match=rf"{tree}: one class folder \('cat'\), but a classifier needs at least 2"):
        load_image_folder(tree)
    good_tree(tree / "train", per_class=4)  # the split layout: train/ decides the classes
    for path in (tree / "train" / "cat").iterdir():
        path.unlink()
    (tree / "train" / "cat").rmdir()
    with pytest.raises(DataError, match=rf"{tree / 'train'}: one class folder \('dog'\)"):
        load_image_folder(tree)


@pytest.mark.e2e
@pytest.mark.fresh_store
def test_training_on_one_class_stops_at_load_time_without_a_run(tree: Path, root: Path) -> None:
    for path in (tree / "dog").iterdir():
        path.unlink()
    (tree / "dog").rmdir()
    done = run_cli("pipeline.train", "data=imagefolder", f"data.root={tree}", root=root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {tree}: one class folder ('cat'), but a classifier needs at least 2 classes" in done.stderr
    assert "Traceback" not in done.stderr and "torchmetrics" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"


def write_at(path: bytes, data: bytes) -> None:
    """A file at a bytes path: how a name that is not UTF-8 (a Latin-1 é) gets onto a Linux disk."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def png_bytes(side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def names_that_are_not_utf8(tree: Path) -> tuple[str, str]:
    """A good image and a broken file, each named with a byte that is not UTF-8; their printable paths."""
    write_at(os.fsencode(tree / "cat") + b"/caf\xe9.png", png_bytes())
    write_at(os.fsencode(tree / "dog") + b"/\xff-broken.png", b"not an image")
    return f"{tree}/cat/caf\\xe9.png", f"{tree}/dog/\\xff-broken.png"


def test_a_file_name_that_is_not_utf8_is_read_and_recorded_escaped(tree: Path) -> None:
    good, broken = names_that_are_not_utf8(tree)
    splits = load_image_folder(tree, on_bad_file="skip", val_fraction=0.2, test_fraction=0.2)
    assert [path for path, _ in splits.skipped] == [broken]
    parts = (splits.train, splits.val, splits.test)
    assert sum(len(part) for part in parts) == 2 * 10 + 1, "the image named in Latin-1 is used"
    stored = [stored_path(str(path)) for part in parts for path in part.paths]
    assert os.fsdecode(os.fsencode(tree / "cat") + b"/caf\xe9.png") in stored
    assert all(part[index][0].shape == (16, 16, 3) for part in parts for index in range(len(part)))
    assert printable(os.fsencode(tree / "cat") + b"/caf\xe9.png") == good


@pytest.mark.e2e
@pytest.mark.slow
def test_a_folder_with_names_that_are_not_utf8_trains_and_logs_them_escaped(tree: Path, root: Path) -> None:
    _, broken = names_that_are_not_utf8(tree)
    overrides = ("data.on_bad_file=skip", "data.num_workers=0", "data.batch_size=4", "scheduler.warmup_epochs=0")
    done = run_cli(
        "pipeline.train", "data=imagefolder", f"data.root={tree}", "trainer.max_epochs=2", *overrides, root=root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("imagefolder").experiment_id])
    assert run.info.status == "FINISHED"
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=store_uri(root)))
    assert f"{broken}\tnot an image" in (folder / "data" / "skipped_files.tsv").read_text()
    counts = json.loads((folder / "data" / "class_counts.json").read_text())
    assert sum(sum(split.values()) for split in counts.values()) == 2 * 10 + 1


def decompression_bomb(path: Path, width: int = 14_000, height: int = 13_000) -> Path:
    """A whole, valid grayscale PNG of width × height black pixels: 182 million pixels in a few hundred KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), bytes(width + 1)  # each row: filter type 0, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_named_as_such_with_the_limit_to_raise(tree: Path) -> None:
    bomb = decompression_bomb(tree / "cat" / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(DataError) as error:
        load_image_folder(tree)
    reason = next(line for line in str(error.value).splitlines() if str(bomb) in line)
    assert "182000000 pixels is more than data.max_image_pixels=178956970" in reason
    assert "decompression bomb" in reason and "data.max_image_pixels=182000000 (null = no limit)" in reason
    assert "corrupt or truncated" not in reason


def test_max_image_pixels_is_the_limit(tree: Path) -> None:
    with pytest.raises(DataError, match=r"16x16 = 256 pixels is more than data.max_image_pixels=255"):
        load_image_folder(tree, max_image_pixels=255)
    assert len(load_image_folder(tree, max_image_pixels=256).classes) == 2
    with pytest.raises(DataError, match=r"data.max_image_pixels=0: must be an integer >= 1 or null"):
        load_image_folder(tree, max_image_pixels=0)


@pytest.mark.e2e
@pytest.mark.fresh_store
def test_training_on_a_folder_with_a_bomb_stops_at_load_without_a_run(tree: Path, root: Path) -> None:
    bomb = decompression_bomb(tree / "dog" / "bomb.png")
    done = run_cli("pipeline.train", "data=imagefolder", f"data.root={tree}", root=root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{bomb}: 182000000 pixels is more than data.max_image_pixels=178956970" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"


def test_missing_root_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root=.*nowhere: no such folder"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"data.root=.*one.png: a file, not a folder"):
        load_image_folder(tmp_path / "one.png")


def test_wrong_options_are_named_together(tree: Path) -> None:
    with pytest.raises(DataError) as error:
        load_image_folder(tree, channels=4, on_bad_file="ignore")
    assert "data.channels=4" in str(error.value) and "data.on_bad_file='ignore'" in str(error.value)


def test_val_tree_without_train_tree_is_an_error(tmp_path: Path) -> None:
    good_tree(tmp_path / "val")
    with pytest.raises(DataError, match=r"has val/ but no train/"):
        load_image_folder(tmp_path)


def test_class_only_in_val_tree_is_named(tmp_path: Path) -> None:
    good_tree(tmp_path / "train")
    good_tree(tmp_path / "val")
    good_tree(tmp_path / "test")
    (tmp_path / "val" / "cow").mkdir()
    with pytest.raises(DataError, match=r"class 'cow' has no folder in the training tree"):
        load_image_folder(tmp_path)


def test_split_that_cannot_be_stratified_names_the_fraction(tmp_path: Path) -> None:
    good_tree(tmp_path, per_class=2)
    with pytest.raises(DataError, match=r"Cannot hold out data.source.test_fraction=0.15 of 4 images .* \(2 classes"):
        load_image_folder(tmp_path, val_fraction=0.15, test_fraction=0.15)


def test_file_that_breaks_after_loading_is_named(tree: Path) -> None:
    splits = load_image_folder(tree, val_fraction=0.2, test_fraction=0.2)
    path = Path(splits.train.paths[0])
    path.write_bytes(b"overwritten")
    with pytest.raises(DataError, match=rf"{path}: could not be decoded"):
        splits.train[0]


def test_training_split_smaller_than_a_batch_stops_before_training() -> None:
    part = ImageSet(np.zeros((6, 8, 8, 1), np.uint8), np.arange(6) % 2)
    splits = ImageSplits(part, part, part, ["a", "b"])
    options = {"num_workers": 0, "pin_memory": False, "persistent_workers": False, "prefetch_factor": None}
    with pytest.raises(DataError, match=r"training split has 6 images, fewer than one batch of data.batch_size=8"):
        ImageDataModule(splits, lambda **kw: kw, lambda **kw: kw, batch_size=8, **options)
    assert ImageDataModule(splits, lambda **kw: kw, lambda **kw: kw, batch_size=6, **options).batch_size == 6

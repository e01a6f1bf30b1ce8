"""Every data source loads from its real on-disk format, splits stratified and seeded, and trains through run().

The standard sets are written here in their official formats — MNIST's raw IDX files, CIFAR's pickled
batches — with a few dozen tiny images, so torchvision's own readers load them and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST

from pipeline.config import validate
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.errors import DataError
from pipeline.data.folder import load_image_folder
from pipeline.data.images import ImageFileSet, ImageSet, ImageSplits
from pipeline.data.sources import load_splits
from pipeline.data.standard import load_cifar10, load_cifar100, load_fashion_mnist, load_mnist
from pipeline.data.transforms import InputSpec, eval_transform
from pipeline.data.workers import loader_workers
from tests.conftest import compose_in, run_cli

MNIST_TRAIN_PER_CLASS, MNIST_TEST_PER_CLASS, MNIST_SIDE = 10, 2, 28
CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS, CIFAR_SIDE = 6, 2, 32
CIFAR100_CLASSES = ["apple", "bee", "castle", "dolphin", "forest"]  # a real meta file, with fewer classes


# --- fixtures in the official formats ----------------------------------------------------------------------


def pixel_for(label: int, index: int) -> int:
    """Each image is filled with a value that names its class and position, so tests can tell images apart."""
    return (label * 25 + index) % 256


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, type 0x08 = uint8, number of dimensions), big-endian sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def labelled_pixels(per_class: int, classes: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(classes), per_class)
    images = np.stack([np.full(shape, pixel_for(label, i), np.uint8) for i, label in enumerate(labels)])
    return images, labels


def write_mnist(root: Path, folder: str) -> None:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed, as torchvision reads."""
    for prefix, per_class in (("train", MNIST_TRAIN_PER_CLASS), ("t10k", MNIST_TEST_PER_CLASS)):
        images, labels = labelled_pixels(per_class, 10, (MNIST_SIDE, MNIST_SIDE))
        if prefix == "t10k":
            images = 255 - images  # the official test images differ from every training image
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)


def cifar_batch(per_class: int, classes: int, label_key: str, test: bool) -> dict[str, object]:
    """A batch as the CIFAR authors pickled it: rows of 3072 bytes, channel-major (all R, all G, all B)."""
    hwc, labels = labelled_pixels(per_class, classes, (CIFAR_SIDE, CIFAR_SIDE, 3))
    hwc[..., 1] = 200  # green differs from red and blue: a wrong channel order would show
    if test:
        hwc[..., 2] = 100
    rows = hwc.transpose(0, 3, 1, 2).reshape(len(hwc), -1)
    return {"data": rows, label_key: labels.tolist(), "batch_label": "fixture"}


def pickle_to(path: Path, content: object) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content))
    return [path.name, hashlib.md5(path.read_bytes()).hexdigest()]


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}.

    torchvision checks every file against the official MD5 sums (and must keep doing so in production);
    these fixtures are not the official files, so the test points the class's checksum table at them.
    """
    folder = root / CIFAR10.base_folder
    train = [
        pickle_to(folder / f"data_batch_{n}", cifar_batch(CIFAR_TRAIN_PER_CLASS, 10, "labels", False))
        for n in (1, 2, 3, 4, 5)
    ]
    test = [pickle_to(folder / "test_batch", cifar_batch(CIFAR_TEST_PER_CLASS, 10, "labels", True))]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _, meta_md5 = pickle_to(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 60})
    monkeypatch.setattr(CIFAR10, "train_list", train)
    monkeypatch.setattr(CIFAR10, "test_list", test)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cifar-100-python/{train, test, meta}; checksums patched as for CIFAR-10."""
    folder = root / CIFAR100.base_folder
    classes = len(CIFAR100_CLASSES)
    train = [pickle_to(folder / "train", cifar_batch(CIFAR_TRAIN_PER_CLASS * 5, classes, "fine_labels", False))]
    test = [pickle_to(folder / "test", cifar_batch(CIFAR_TEST_PER_CLASS, classes, "fine_labels", True))]
    _, meta_md5 = pickle_to(folder / "meta", {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": ["all"]})
    monkeypatch.setattr(CIFAR100, "train_list", train)
    monkeypatch.setattr(CIFAR100, "test_list", test)
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": meta_md5})


def write_image_tree(root: Path, per_class: int, classes: tuple[str, ...] = ("cat", "dog", "fox")) -> Path:
    """root/<class>/<image>: PNG and JPEG, gray, RGB and RGBA, of mixed sizes (all of which must load)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            side = 16 + 4 * (index % 3)
            rgb = rng.integers(0, 256, (side, side + 2, 3), dtype=np.uint8)
            rgb[..., label] = 255  # a learnable colour cue per class
            image = Image.fromarray(rgb)
            kind = index % 4
            if kind == 0:
                image.save(root / name / f"{index:03d}.png")
            elif kind == 1:
                image.convert("L").save(root / name / f"{index:03d}.png")
            elif kind == 2:
                image.save(root / name / f"{index:03d}.jpg", quality=90)
            else:
                image.convert("RGBA").save(root / name / f"{index:03d}.png")
    return root


# --- the standard sets -------------------------------------------------------------------------------------

STANDARD = [
    (load_mnist, MNIST, 10, 1, MNIST_SIDE),
    (load_fashion_mnist, FashionMNIST, 10, 1, MNIST_SIDE),
    (load_cifar10, CIFAR10, 10, 3, CIFAR_SIDE),
    (load_cifar100, CIFAR100, len(CIFAR100_CLASSES), 3, CIFAR_SIDE),
]


def write_standard(dataset: type, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if dataset in (MNIST, FashionMNIST):
        write_mnist(root, dataset.__name__)
    elif dataset is CIFAR10:
        write_cifar10(root, monkeypatch)
    else:
        write_cifar100(root, monkeypatch)


@pytest.mark.parametrize(
    ("load", "dataset", "classes", "channels", "side"), STANDARD, ids=lambda v: getattr(v, "__name__", None)
)
def test_standard_set_loads_from_official_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    load: Callable[..., ImageSplits],
    dataset: type,
    classes: int,
    channels: int,
    side: int,
) -> None:
    write_standard(dataset, tmp_path, monkeypatch)
    splits = load(tmp_path, download=False, channels=channels, val_fraction=0.5, split_seed=0)
    official_train = dataset(tmp_path, train=True)
    official_test = dataset(tmp_path, train=False)
    assert splits.classes == list(official_train.classes) and splits.num_classes == classes
    assert len(splits.train) + len(splits.val) == len(official_train)
    assert len(splits.test) == len(official_test)
    image, label = splits.test[0]
    assert image.shape == (side, side, channels) and image.dtype == np.uint8 and isinstance(label, int)
    np.testing.assert_array_equal(splits.test.labels, np.asarray(official_test.targets))
    np.testing.assert_array_equal(image, np.asarray(official_test[0][0]).reshape(side, side, channels))
    for part in (splits.train, splits.val):
        np.testing.assert_array_equal(np.bincount(part.labels) / len(part), np.full(classes, 1 / classes))
    counts = splits.class_counts()
    assert sum(counts["val"].values()) == len(splits.val) and splits.skipped == []


def test_standard_set_channels_are_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path, "MNIST")
    write_cifar10(tmp_path, monkeypatch)
    gray, rgb = (load_mnist(tmp_path, False, channels, 0.2, 0) for channels in (1, 3))
    assert rgb.channels == 3 and np.array_equal(rgb.train.images, np.repeat(gray.train.images, 3, axis=-1))
    colour, luma = (load_cifar10(tmp_path, False, channels, 0.2, 0) for channels in (3, 1))
    expected = np.asarray(Image.fromarray(colour.test.images[0]).convert("L"))
    assert luma.channels == 1 and np.array_equal(luma.test.images[0, ..., 0], expected)


def test_validation_is_carved_from_official_train_reproducibly(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST")
    first, again, other = (load_mnist(tmp_path, False, 1, 0.2, seed) for seed in (0, 0, 1))
    assert np.array_equal(first.val.images, again.val.images)
    assert not np.array_equal(first.val.images, other.val.images)
    assert np.array_equal(first.test.images, other.test.images), "the official test split never moves"
    train_values = {int(v) for v in first.train.images[:, 0, 0, 0]}
    assert train_values.isdisjoint(int(v) for v in first.val.images[:, 0, 0, 0])


@pytest.mark.parametrize(
    ("option", "dataset"),
    [("mnist", MNIST), ("fashion_mnist", FashionMNIST), ("cifar10", CIFAR10), ("cifar100", CIFAR100)],
)
def test_standard_config_builds_its_source_offline(
    root: Path, monkeypatch: pytest.MonkeyPatch, option: str, dataset: type
) -> None:
    data_dir = root / "data"
    write_standard(dataset, data_dir, monkeypatch)
    cfg = compose_in(root, [f"data={option}"])
    assert cfg.data.download, "the default fetches when files are missing; files already there need no network"
    validate(cfg)
    assert cfg.data.source.root == str(data_dir), "data.root defaults to paths.data_dir"
    splits = load_splits(cfg.data.source)
    assert isinstance(splits, ImageSplits) and isinstance(splits.train, ImageSet)
    assert splits.channels == cfg.data.channels and len(cfg.data.mean) == cfg.data.channels


def test_missing_standard_set_names_the_files_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, download=False, channels=3, val_fraction=0.1, split_seed=0)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data.download=true" in message


def test_cifar_checksums_are_still_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path, monkeypatch)
    monkeypatch.undo()  # the official checksums again: the fixture files are not the official ones
    with pytest.raises(DataError, match=r"CIFAR10 in .*: 7 file\(s\) damaged or truncated: .*not the official MD5"):
        load_cifar10(tmp_path, download=False, channels=3, val_fraction=0.2, split_seed=0)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_truncated_standard_files_are_named_as_damaged_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar10(tmp_path, monkeypatch)
    batch = truncate(tmp_path / CIFAR10.base_folder / "data_batch_3")
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, download=False, channels=3, val_fraction=0.2, split_seed=0)
    message = str(error.value)
    assert f"CIFAR10 in {tmp_path}: 1 file(s) damaged or truncated: {batch} (" in message
    assert "not the official MD5 sum" in message and "copy the official files again" in message
    assert "not found" not in message and "\n" not in message

    write_mnist(tmp_path, "MNIST")
    images = truncate(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte")
    whole = 16 + 10 * MNIST_TRAIN_PER_CLASS * MNIST_SIDE**2
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download=False, channels=1, val_fraction=0.2, split_seed=0)
    assert f"MNIST in {tmp_path}: 1 file(s) damaged or truncated: {images} ({whole // 2:,} bytes where its header " in (
        str(error.value)
    )
    assert f"promises {whole:,})" in str(error.value)


@pytest.mark.e2e
@pytest.mark.fresh_store
def test_training_on_truncated_cifar_files_stops_at_load_without_a_run(root: Path) -> None:
    folder = root / "data" / CIFAR10.base_folder
    for name, _ in [*CIFAR10.train_list, *CIFAR10.test_list]:  # the official names, each file cut short
        pickle_to(folder / name, cifar_batch(CIFAR_TRAIN_PER_CLASS, 10, "labels", False))
        truncate(folder / name)
    pickle_to(folder / "batches.meta", {"label_names": [str(n) for n in range(10)]})
    done = run_cli("pipeline.train", "data=cifar10", "data.download=false", root=root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: CIFAR10 in {root / 'data'}: 7 file(s) damaged or truncated: {folder / 'data_batch_1'} (" in (
        done.stderr
    )
    assert "Delete them and copy the official files again" in done.stderr and "Traceback" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"


# --- image folders -----------------------------------------------------------------------------------------


def test_one_tree_is_split_stratified_and_reproducibly(tmp_path: Path) -> None:
    tree = write_image_tree(tmp_path / "images", per_class=20)
    splits = load_image_folder(tree, val_fraction=0.2, test_fraction=0.2, split_seed=0)
    assert splits.classes == ["cat", "dog", "fox"] and splits.channels == 3
    assert [len(splits.train), len(splits.val), len(splits.test)] == [36, 12, 12]
    for part in (splits.train, splits.val, splits.test):
        assert isinstance(part, ImageFileSet)
        np.testing.assert_array_equal(np.bincount(part.labels), np.full(3, len(part) // 3))
    all_paths = [set(part.paths) for part in (splits.train, splits.val, splits.test)]
    assert set.union(*all_paths) == {str(p) for p in tree.rglob("*.*")} and sum(map(len, all_paths)) == 60
    again = load_image_folder(tree, val_fraction=0.2, test_fraction=0.2, split_seed=0)
    other = load_image_folder(tree, val_fraction=0.2, test_fraction=0.2, split_seed=1)
    assert np.array_equal(splits.test.paths, again.test.paths)
    assert not np.array_equal(splits.test.paths, other.test.paths)


def test_train_val_test_trees_are_used_as_given(tmp_path: Path) -> None:
    for split, count in (("train", 8), ("val", 3), ("test", 2)):
        write_image_tree(tmp_path / split, per_class=count)
    splits = load_image_folder(tmp_path, split_seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [24, 9, 6]
    for split in ("train", "val", "test"):
        assert all(Path(p).parts[-3] == split for p in getattr(splits, split).paths)
    assert splits.class_counts()["test"] == {"cat": 2, "dog": 2, "fox": 2}


def test_a_missing_val_tree_is_held_out_of_train(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "train", per_class=10)
    write_image_tree(tmp_path / "test", per_class=2)
    splits = load_image_folder(tmp_path, val_fraction=0.2, split_seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [24, 6, 6]
    assert all("/train/" in p for p in splits.val.paths)


def test_files_are_decoded_when_asked_for_not_at_load(tmp_path: Path) -> None:
    tree = write_image_tree(tmp_path, per_class=4)
    splits = load_image_folder(tree, channels=1, val_fraction=0.25, test_fraction=0.25)
    path = Path(splits.train.paths[0])
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(path, format="PNG")  # replaced after loading
    image, _ = splits.train[0]
    assert image.shape == (20, 30, 1) and (image == 7).all()


def test_file_backed_sets_load_in_worker_processes(tmp_path: Path) -> None:
    splits = load_image_folder(write_image_tree(tmp_path, per_class=4), val_fraction=0.25, test_fraction=0.25)
    spec = InputSpec(size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    options = {"num_workers": 2, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 2}
    data = ImageDataModule(splits, eval_transform(spec), eval_transform(spec), batch_size=3, **options)
    batches = list(data.train_dataloader())
    assert sum(len(labels) for _, labels in batches) == len(splits.train)
    assert batches[0][0].shape == (3, 3, 16, 16), "mixed sizes come out resized"


def test_imagefolder_config_uses_the_loader_workers_resolver(root: Path) -> None:
    cfg = compose_in(root, ["data=imagefolder"])
    validate(cfg)
    assert cfg.data.num_workers == loader_workers() >= 0 and cfg.data.mean is None and cfg.data.channels == 3
    assert cfg.data.source.root == f"{root}/data/images"


def test_a_source_error_reaches_the_caller_as_itself_not_wrapped_by_hydra(root: Path) -> None:
    with pytest.raises(DataError, match=r"data.root=.*images: no such folder"):
        load_splits(compose_in(root, ["data=imagefolder"]).data.source)


@pytest.mark.slow
def test_a_short_training_run_on_an_image_folder(root: Path) -> None:
    from pipeline.run import run

    tree = write_image_tree(root / "images", per_class=12)
    cfg = compose_in(
        root,
        [
            "data=imagefolder",
            f"data.source.root={tree}",
            "trainer.max_epochs=1",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.image_size=[32,32]",
        ],
    )
    result = run(cfg)
    assert {"test/acc", "test/loss"} <= set(result.metrics)
    assert all(np.isfinite(value) for value in result.metrics.values())

"""Images in class folders — `root/<class>/<image>` — read lazily from disk.

Two layouts:
- one tree, `root/<class>/<image>`: split into train, val and test by ratio, stratified by class and seeded;
- `root/train/<class>/<image>` with `root/val/...` and `root/test/...` beside it: used as given. A missing
  `val/` or `test/` is held out of `train/` (stratified, seeded) with val_fraction or test_fraction.

Class names are the folder names (of `train/` in the second layout), in sorted order; the label is the
position in that order. Every file below a class folder, at any depth, counts as an image of that class,
except hidden ones (a leading dot: .DS_Store, .ipynb_checkpoints). Images may have any size and mode:
they are converted to `channels` channels when read (see pipeline.data.decode) and resized by the
transforms to the model's input, so a folder of mixed sizes trains as is (the aspect ratio is not kept).

Every file is checked at load time as `verify` says — decoded (full), its header verified (header), or not at all
(off) — and what each check found is remembered in `cache_dir`, so an unchanged file is checked once (see
pipeline.data.scan and pipeline.data.verified). A file that cannot be read, is smaller than `min_size` pixels on a
side or has more than `max_image_pixels` pixels (a decompression bomb, or a genuine huge image: raise the limit),
stops the load with a list of all such files — or, with on_bad_file=skip, is left out and recorded in
ImageSplits.skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.decode import CHANNEL_COUNTS, PILLOW_MAX_PIXELS, allow_pixels
from pipeline.data.errors import DataError
from pipeline.data.images import ImageFileSet, ImageSplits, printable, storable
from pipeline.data.scan import VERIFY, scan_images
from pipeline.data.splits import stratified_holdout

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
ON_BAD_FILE = ("error", "skip")
MAX_LISTED = 20  # bad files named in one error message; the rest are counted


@dataclass(frozen=True)
class Tree:
    """The files of one tree (the whole set, or one of train/val/test) and their labels."""

    folder: Path
    paths: list[Path]
    labels: list[int]


def _check_arguments(
    root: Path, channels: int, min_size: int, on_bad_file: str, max_pixels: int | None, verify: str
) -> None:
    problems = []
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        problems.append(f"data.root={root}: {what} (e.g. data.root=/path/to/images, holding <class>/<image>)")
    if channels not in CHANNEL_COUNTS:
        problems.append(f"data.channels={channels!r}: must be 1 or 3 (e.g. data.channels=3)")
    if not (isinstance(min_size, int) and min_size >= 1):
        problems.append(f"data.min_size={min_size!r}: must be an integer >= 1 (e.g. data.min_size=8)")
    if on_bad_file not in ON_BAD_FILE:
        problems.append(f"data.on_bad_file={on_bad_file!r}: must be error or skip (e.g. data.on_bad_file=skip)")
    if not (max_pixels is None or (isinstance(max_pixels, int) and max_pixels >= 1)):
        problems.append(
            f"data.max_image_pixels={max_pixels!r}: must be an integer >= 1 or null "
            f"(e.g. data.max_image_pixels={PILLOW_MAX_PIXELS})"
        )
    if verify not in VERIFY:
        problems.append(f"data.verify={verify!r}: must be full, header or off (e.g. data.verify=full)")
    if problems:
        raise DataError("Cannot load the image folder:\n  " + "\n  ".join(problems))


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and _visible(path.name))


def _class_name(folder: Path) -> str:
    """The folder's name as a class name, which is logged and plotted: a name that is not UTF-8 is escaped."""
    return printable(folder.name)


def _files_below(folder: Path) -> list[Path]:
    """Every visible file under `folder`, in a fixed order (the split must not depend on the file system)."""
    found = []
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(name for name in subdirectories if _visible(name))
        found += [Path(directory) / name for name in sorted(names) if _visible(name)]
    return found


def _split_folders(root: Path) -> dict[str, Path]:
    """{"train": root/train, ...} for the split layout; {} when root is one tree of class folders."""
    given = {split: root / split for split in SPLITS if (root / split).is_dir()}
    if given and "train" not in given:
        raise DataError(
            f"{root} has {', '.join(f'{split}/' for split in given)} but no train/: put the training images in "
            f"{root}/train/<class>/, or arrange the whole set as {root}/<class>/<image> to split it by ratio."
        )
    return given


def _list_tree(folder: Path, classes: list[str]) -> Tree:
    """The files of `folder`/<class>/...; a class folder with no files, or of an unknown class, is an error."""
    problems, paths, labels = [], [], []
    for class_folder in _class_folders(folder):
        name, shown = _class_name(class_folder), printable(class_folder)
        if name not in classes:
            problems.append(
                f"{shown}: class {name!r} has no folder in the training tree; add it there or remove this folder"
            )
            continue
        files = _files_below(class_folder)
        if not files:
            problems.append(f"{shown}: empty class folder; add images of {name!r} or remove it")
        paths += files
        labels += [classes.index(name)] * len(files)
    if not paths and not problems:
        loose = sorted(printable(path.name) for path in folder.iterdir() if path.is_file() and _visible(path.name))
        found = f"; it holds {len(loose)} loose files (e.g. {loose[0]})" if loose else ""
        problems.append(
            f"{folder}: no images found — expected one folder per class, {folder}/<class>/<image>{found}. "
            "Point data.root at the folder that holds the class folders."
        )
    if problems:
        raise DataError("The image folder cannot be used:\n  " + "\n  ".join(problems))
    return Tree(folder, paths, labels)


def _refuse_bad_files(bad: Sequence[tuple[Path, str]]) -> None:
    lines = [f"{printable(path)}: {reason}" for path, reason in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"... and {len(bad) - MAX_LISTED} more")
    raise DataError(
        f"{len(bad)} image file(s) cannot be used:\n  "
        + "\n  ".join(lines)
        + "\nReplace or remove them, or set data.on_bad_file=skip to train without them "
        "(the run records which files were left out)."
    )


def _without(tree: Tree, bad: set[Path], classes: list[str], must_cover: bool) -> Tree:
    """`tree` less the bad files; with `must_cover`, every class must keep at least one image."""
    kept = [(path, label) for path, label in zip(tree.paths, tree.labels, strict=True) if path not in bad]
    left, had = {label for _, label in kept}, set(tree.labels)
    lost = [name for index, name in enumerate(classes) if index not in left and (must_cover or index in had)]
    if lost:
        raise DataError(
            f"{tree.folder}: no usable images left for class(es) {lost} after leaving out bad files; "
            "replace the files listed in the log, or remove these class folders."
        )
    return Tree(tree.folder, [path for path, _ in kept], [label for _, label in kept])


def _arrays(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """Paths (see ImageFileSet on why StringDType) and labels as arrays, for fancy indexing by split."""
    paths = np.array([storable(str(path)) for path in tree.paths], dtype=np.dtypes.StringDType())
    return paths, np.array(tree.labels, dtype=np.int64)


def _split_sets(
    trees: dict[str, Tree], channels: int, val_fraction: float, test_fraction: float, split_seed: int
) -> dict[str, ImageFileSet]:
    """The trees given, as sets; a missing test or val is held out of train (in that order, like stratified_split).

    Both fractions are shares of the whole training tree.
    """
    sets = {split: ImageFileSet(*_arrays(tree), channels) for split, tree in trees.items()}
    paths, labels = _arrays(trees["train"])
    pool = np.arange(len(labels))
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if split not in trees:
            share = fraction * len(labels) / len(pool)
            pool, held = stratified_holdout(pool, labels, share, split_seed, f"data.source.{split}_fraction={fraction}")
            held = np.sort(held)
            sets[split] = ImageFileSet(paths[held], labels[held], channels)
    pool = np.sort(pool)
    sets["train"] = ImageFileSet(paths[pool], labels[pool], channels)
    return sets


def load_image_folder(
    root: str | Path,
    channels: int = 3,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    min_size: int = 8,
    on_bad_file: str = "error",
    max_image_pixels: int | None = PILLOW_MAX_PIXELS,
    verify: str = "full",
    cache_dir: str | Path | None = None,
) -> ImageSplits:
    """Class folders under `root` as train/val/test sets of files, checked up front (see the module docstring);
    `cache_dir` None remembers nothing."""
    root = Path(root)
    _check_arguments(root, channels, min_size, on_bad_file, max_image_pixels, verify)
    allow_pixels(max_image_pixels)
    given = _split_folders(root)
    classes = [_class_name(folder) for folder in _class_folders(given.get("train", root))]
    trees = {split: _list_tree(folder, classes) for split, folder in (given or {"train": root}).items()}
    if len(classes) == 1:  # checked before decoding every file; the metrics would refuse it after the data load
        folder = given.get("train", root)
        raise DataError(
            f"{folder}: one class folder ({classes[0]!r}), but a classifier needs at least 2 classes. Add a folder of "
            f"images for each class ({folder}/<class>/<image>), or point data.root at the folder that holds them."
        )

    listed = [path for tree in trees.values() for path in tree.paths]
    scan = scan_images(listed, min_size, max_image_pixels, verify, cache_dir)
    if scan.bad and on_bad_file == "error":
        _refuse_bad_files(scan.bad)
    skipped = [(printable(path), reason) for path, reason in scan.bad]
    if skipped:
        log.warning("Left out %d bad image files (data.on_bad_file=skip), e.g. %s: %s", len(skipped), *skipped[0])
    bad = {path for path, _ in scan.bad}
    trees = {split: _without(tree, bad, classes, must_cover=split == "train") for split, tree in trees.items()}

    sets = _split_sets(trees, channels, val_fraction, test_fraction, split_seed)
    return ImageSplits(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        classes=classes,
        skipped=skipped,
    )

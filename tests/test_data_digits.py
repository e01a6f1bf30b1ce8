"""The bundled digits: split three ways, stratified, disjoint, fixed by the split seed."""

from __future__ import annotations

import numpy as np

from pipeline.data.digits import load_digits


def test_digits_split_is_stratified_disjoint_and_complete() -> None:
    splits = load_digits(val_fraction=0.15, test_fraction=0.15, split_seed=0)
    assert splits.classes == [str(d) for d in range(10)] and splits.channels == 1
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797
    assert abs(len(splits.test) - 0.15 * 1797) <= 1 and abs(len(splits.val) - 0.15 * 1797) <= 1
    assert splits.train.images.shape[1:] == (8, 8, 1) and splits.train.images.dtype == np.uint8
    assert splits.train.images.max() == 255
    for part in (splits.train, splits.val, splits.test):
        shares = np.bincount(part.labels, minlength=10) / len(part)
        assert np.all(np.abs(shares - 0.1) < 0.02), "every split keeps the classes balanced"
    counts = splits.class_counts()
    assert sum(counts["test"].values()) == len(splits.test)


def test_split_is_fixed_by_its_seed() -> None:
    first, again = (load_digits(0.15, 0.15, split_seed=0) for _ in range(2))
    other = load_digits(0.15, 0.15, split_seed=1)
    assert np.array_equal(first.test.images, again.test.images)
    assert not np.array_equal(first.test.images, other.test.images)

"""The handwritten digits that scikit-learn ships: 1,797 8×8 grayscale images of 0–9, no network needed."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits as _sklearn_digits

from pipeline.data.images import ImageSet, ImageSplits
from pipeline.data.splits import stratified_split

DIGITS_MAX_VALUE = 16  # scikit-learn stores 4-bit intensities, 0..16


def load_digits(val_fraction: float, test_fraction: float, split_seed: int) -> ImageSplits:
    bunch = _sklearn_digits()
    images = np.rint(bunch.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)[..., np.newaxis]
    labels = bunch.target.astype(np.int64)
    train, val, test = stratified_split(labels, val_fraction, test_fraction, split_seed)
    return ImageSplits(
        train=ImageSet(images[train], labels[train]),
        val=ImageSet(images[val], labels[val]),
        test=ImageSet(images[test], labels[test]),
        classes=[str(name) for name in bunch.target_names],
    )

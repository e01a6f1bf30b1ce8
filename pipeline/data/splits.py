"""Stratified, seeded splitting shared by every source: three ways from a single pool, or a held-out share."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.data.errors import DataError


def stratified_holdout(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int, setting: str
) -> tuple[np.ndarray, np.ndarray]:
    """`indices` divided into (kept, held out), the held-out share `fraction` of each class.

    `labels` is indexed by `indices`. `setting` is the config value behind the fraction (e.g.
    "data.source.val_fraction=0.15"), so a split that cannot be made names what to change.
    """
    try:
        kept, held = train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=seed)
    except ValueError as error:
        # scikit-learn refuses a class with a single image, or a held-out share smaller than the class count.
        counts = np.bincount(labels[indices])
        reason = str(error).rstrip(".")
        raise DataError(
            f"Cannot hold out {setting} of {len(indices)} images stratified by class "
            f"({np.count_nonzero(counts)} classes, the smallest with {counts[counts > 0].min()} images): {reason}. "
            f"Add images, or change {setting.split('=')[0]} so every class has images on both sides."
        ) from error
    return kept, held


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, val and test; each split keeps the class proportions of the whole."""
    everything = np.arange(len(labels))
    rest, test = stratified_holdout(
        everything, labels, test_fraction, seed, f"data.source.test_fraction={test_fraction}"
    )
    share_of_rest = val_fraction / (1.0 - test_fraction)
    train, val = stratified_holdout(rest, labels, share_of_rest, seed, f"data.source.val_fraction={val_fraction}")
    return np.sort(train), np.sort(val), np.sort(test)

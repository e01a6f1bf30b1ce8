"""Figures a run leaves behind, drawn off-screen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def confusion_matrix_png(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            color = "white" if count > threshold else "black"
            ax.text(col, row, int(count), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parallel_coordinates_png(
    rows: Sequence[Mapping[str, object]], params: Sequence[str], metric: str, path: Path, title: str
) -> Path:
    """One line per trial across one axis per searched parameter, coloured by the metric (the last axis).

    Numeric axes are scaled to [0, 1] (log-scaled when they span more than a decade); categorical ones
    place their values evenly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if isinstance(row.get(metric), int | float)]
    axes = [*params, metric]
    columns, labels = [], []
    for name in axes:
        values = [row.get(name) for row in scored]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and values:
            array = np.asarray(values, dtype=float)
            if array.min() > 0 and array.max() / array.min() > 10:
                array = np.log10(array)
                labels.append(f"{name} (log10)")
            else:
                labels.append(name)
            span = array.max() - array.min()
            columns.append((array - array.min()) / span if span else np.full_like(array, 0.5))
        else:
            categories = sorted({str(v) for v in values})
            position = {c: i / max(1, len(categories) - 1) for i, c in enumerate(categories)}
            columns.append(np.asarray([position[str(v)] for v in values]))
            labels.append(f"{name} ({' < '.join(categories)})")
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(axes)), 4.5))
    if scored:
        metric_values = np.asarray([row[metric] for row in scored], dtype=float)
        colours = plt.cm.viridis((metric_values - metric_values.min()) / (np.ptp(metric_values) or 1))
        for index in range(len(scored)):
            ax.plot(range(len(axes)), [column[index] for column in columns], color=colours[index], alpha=0.8)
    ax.set_xticks(range(len(axes)), labels, rotation=10, fontsize=8)
    ax.set_yticks([])
    for x in range(len(axes)):
        ax.axvline(x, color="grey", linewidth=0.5)
    ax.set_title(f"{title} ({len(scored)} trials; colour = {metric})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

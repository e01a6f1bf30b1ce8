"""Figures a run leaves behind, drawn off-screen."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

SHOWN_CLASSES = 30  # per_class.shown's default: classes drawn or printed one by one
LABEL_CHARACTERS = 24  # a longer class name is cut short on an axis (the CSVs keep it whole)


def most_confused(matrix: np.ndarray, count: int) -> list[int]:
    """The `count` classes to draw of a confusion matrix (rows true, columns predicted), in class order: those of its
    largest off-diagonal cells, taken cell by cell (so the pairs mistaken for each other most appear together), then
    the classes with the most errors, then the first others. Every class when there are no more than `count`."""
    classes = len(matrix)
    if classes <= count:
        return list(range(classes))
    errors = matrix.astype(np.int64, copy=True)
    np.fill_diagonal(errors, 0)
    chosen: dict[int, None] = {}  # insertion-ordered set
    cells = np.flatnonzero(errors)
    # Largest first; ties broken by position, so the choice is the same on every machine.
    for cell in cells[np.argsort(-errors.ravel()[cells], kind="stable")]:
        for index in divmod(int(cell), classes):
            chosen.setdefault(index)
        if len(chosen) >= count:
            break
    missed = errors.sum(axis=1) + errors.sum(axis=0)  # a class's errors as the true and as the predicted class
    for index in np.argsort(-missed, kind="stable"):
        if len(chosen) >= count:
            break
        chosen.setdefault(int(index))
    return sorted(list(chosen)[:count])


def _label(name: str) -> str:
    return name if len(name) <= LABEL_CHARACTERS else name[: LABEL_CHARACTERS - 1] + "…"


def confusion_matrix_png(
    matrix: np.ndarray, classes: Sequence[str], path: Path, title: str, shown: int = SHOWN_CLASSES
) -> Path:
    """The confusion matrix as a figure: every class up to `shown` of them, else the `shown` most-confused (see
    most_confused), so the figure stays readable and its size, memory and drawing time are bounded however many
    classes there are (ImageNet's 1,000 would otherwise be a 45,000-pixel square). The whole matrix is
    confusion_matrix_csv's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = most_confused(matrix, shown)
    part = matrix[np.ix_(picked, picked)]
    names = [_label(str(classes[index])) for index in picked]
    if len(picked) < len(classes):
        title = (
            f"{title}\nthe {len(picked)} most-confused of {len(classes)} classes "
            "(every class: reports/confusion_matrix.csv)"
        )
    size = max(4.0, 0.45 * len(picked) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(part, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(
        xticks=range(len(picked)),
        yticks=range(len(picked)),
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    ax.set_xticklabels(names, rotation=90 if len(picked) > 10 else 0)
    ax.set_yticklabels(names)
    if len(picked) <= SHOWN_CLASSES:  # counts are legible in cells of this size, not in smaller ones
        threshold = part.max() / 2 if part.size else 0
        for (row, col), count in np.ndenumerate(part):
            color = "white" if count > threshold else "black"
            ax.text(col, row, int(count), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix_csv(matrix: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Every cell of the confusion matrix: a header of the predicted classes, then one row per true class (its name,
    then its counts). pandas reads it back with `read_csv(path, index_col=0)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix.astype(np.int64).tolist(), strict=True):
            writer.writerow([name, *row])
    return path


def parallel_coordinates_png(
    rows: Sequence[Mapping[str, object]], params: Sequence[str], metric: str, path: Path, title: str
) -> Path:
    """One line per trial across one axis per searched parameter, coloured by the metric (the last axis, and the
    colour bar). Every axis is labelled with values: numeric axes span their trials' range (log-scaled when it
    spans more than a decade), categorical ones place their values evenly. MLflow's own parallel coordinates chart
    (the experiment's chart view, "Add chart") draws the same from the trials' params and metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    scored = [row for row in rows if isinstance(row.get(metric), int | float)]
    axes = [*params, metric]
    columns, ticks, labels = [], [], []
    for name in axes:
        values = [row.get(name) for row in scored]
        if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            column, axis_ticks, log = _numeric_axis(np.asarray(values, dtype=float))
            labels.append(f"{name}\n(log scale)" if log else name)
        else:
            categories = sorted({str(v) for v in values})
            position = {c: i / max(1, len(categories) - 1) for i, c in enumerate(categories)}
            column = np.asarray([position[str(v)] for v in values])
            axis_ticks = [(position[c], c if len(c) <= 14 else c[:13] + "…") for c in categories]
            labels.append(name)
        columns.append(column)
        ticks.append(axis_ticks)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 * len(axes)) + 1.2, 4.8))
    colour = plt.cm.viridis
    norm = Normalize()
    if scored:
        metric_values = np.asarray([row[metric] for row in scored], dtype=float)
        norm = Normalize(metric_values.min(), metric_values.max() if np.ptp(metric_values) else metric_values.min() + 1)
        for index in np.argsort(metric_values):  # the best drawn last, on top
            ax.plot(range(len(axes)), [column[index] for column in columns], color=colour(norm(metric_values[index])))
    for x, axis_ticks in enumerate(ticks):
        ax.axvline(x, color="grey", linewidth=0.8, zorder=0)
        for y, label in axis_ticks:
            ax.plot([x - 0.03, x], [y, y], color="grey", linewidth=0.8)
            ax.text(
                x - 0.05,
                y,
                label,
                ha="right",
                va="center",
                fontsize=7,
                color="dimgrey",
                zorder=5,  # over the trials' lines, on a white ground
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            )
    ax.set_xticks(range(len(axes)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(axes) - 0.8)
    ax.set_ylim(-0.06, 1.06)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=colour), ax=ax, label=metric, fraction=0.04, pad=0.02)
    ax.set_title(f"{title} ({len(scored)} trials; colour = {metric})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _numeric_axis(values: np.ndarray) -> tuple[np.ndarray, list[tuple[float, str]], bool]:
    """Values scaled to [0, 1], the axis's ticks (position, label) and whether it is logarithmic (when the values
    span more than a decade): powers of ten on a log axis, else about five evenly spaced values."""
    from matplotlib.ticker import MaxNLocator

    low, high = float(values.min()), float(values.max())
    if low > 0 and high / low > 10:
        logs, lo, hi = np.log10(values), np.log10(low), np.log10(high)
        scaled = (logs - lo) / (hi - lo)
        powers = range(int(np.ceil(lo)), int(np.floor(hi)) + 1)
        return scaled, [((p - lo) / (hi - lo), f"1e{p}") for p in powers], True
    span = high - low
    if not span:
        return np.full_like(values, 0.5), [(0.5, f"{low:.3g}")], False
    marks = [m for m in MaxNLocator(nbins=4).tick_values(low, high) if low - 1e-12 <= m <= high + 1e-12]
    return (values - low) / span, [((m - low) / span, f"{m:.3g}") for m in marks], False

"""Per-class figures and tables stay readable and bounded with ImageNet's 1,000 classes: the confusion-matrix figure
draws the most-confused classes, its CSV holds every cell, and evaluate's printed table lists the weakest classes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate import Evaluation, per_class_report, report
from pipeline.plots import SHOWN_CLASSES, confusion_matrix_csv, confusion_matrix_png, most_confused

CLASSES = 1000
# Drawn at 100 dpi, the figure of `SHOWN_CLASSES` classes is (0.45 in × 30 + 2 in) = 15.5 in a side.
MAX_SIDE_PIXELS = 1600
CONFUSED_PAIR = (17, 923)  # a planted pair mistaken for each other far more than any other


def thousand_class_matrix() -> tuple[np.ndarray, list[str]]:
    """A test of 50 images per class, mostly right, with scattered mistakes and one badly confused pair."""
    rng = np.random.default_rng(0)
    matrix = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.fill_diagonal(matrix, 45)
    rows = np.repeat(np.arange(CLASSES), 5)
    np.add.at(matrix, (rows, rng.integers(0, CLASSES, rows.size)), 1)
    first, second = CONFUSED_PAIR
    matrix[first, second] += 30
    matrix[second, first] += 25
    return matrix, [f"n{index:08d}" for index in range(CLASSES)]


def test_a_thousand_class_confusion_matrix_is_a_bounded_figure_and_a_complete_csv(tmp_path: Path) -> None:
    matrix, classes = thousand_class_matrix()
    figure = confusion_matrix_png(matrix, classes, tmp_path / "confusion_matrix.png", title="1,000 classes")
    with Image.open(figure) as image:
        assert max(image.size) <= MAX_SIDE_PIXELS, image.size  # a full-size figure would be ~45,000 pixels a side

    picked = most_confused(matrix, SHOWN_CLASSES)
    assert len(picked) == SHOWN_CLASSES and picked == sorted(picked)
    assert set(CONFUSED_PAIR) <= set(picked), "the pair confused most is drawn"

    cells = confusion_matrix_csv(matrix, classes, tmp_path / "reports" / "confusion_matrix.csv")
    with cells.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header[1:] == classes
    assert [row[0] for row in rows] == classes
    assert np.array_equal(np.array([row[1:] for row in rows], dtype=np.int64), matrix), "every cell, unchanged"


def test_few_classes_are_all_drawn_in_their_order() -> None:
    matrix = np.eye(10, dtype=np.int64) * 7
    assert most_confused(matrix, SHOWN_CLASSES) == list(range(10))


def test_with_few_mistakes_the_classes_with_errors_come_first() -> None:
    matrix = np.eye(100, dtype=np.int64) * 5
    matrix[40, 41] = 3  # the one confused pair
    matrix[90, 2] = 1
    assert most_confused(matrix, 4) == [2, 40, 41, 90]
    assert most_confused(np.eye(100, dtype=np.int64), 3) == [0, 1, 2], "no mistakes: the first classes"


def test_evaluate_prints_the_lowest_f1_classes_of_a_thousand(capsys: pytest.CaptureFixture[str]) -> None:
    matrix, classes = thousand_class_matrix()
    rows = per_class_report(matrix, classes)
    worst = min(rows, key=lambda row: row["f1"])["class"]
    result = Evaluation({"test/acc": 0.9}, rows, "run", None, "sqlite:///unused.db", {}, shown=SHOWN_CLASSES)
    report(result)
    printed = capsys.readouterr().out
    listed = [name for name in classes if f" {name} " in printed]
    assert len(listed) == SHOWN_CLASSES and worst in listed
    assert f"The {SHOWN_CLASSES} of {CLASSES} classes with the lowest F1" in printed

"""python -m pipeline.predict source=<run | checkpoint | models:/name/version> input=<file | folder | glob> [top_k=5]:
the top-k classes of each image, as a table and a CSV.

The model and its class names come from the source (pipeline.source); each image is decoded to the channel count the
model was trained on and prepared with the run's evaluation transform, by pipeline.inference, which the run's served
MLflow model runs too: the same files give the same probabilities. A file that cannot be read becomes a row with its
error and does not stop the others.

Exit status: 0 at least one image predicted; 2 an error the message explains (source, input, no image readable).
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.cli import command, exit_after, hydra_command
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError

GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most likely first
    error: str = ""


def input_files(pattern: str) -> list[Path]:
    """The files `input=` names: one file, every visible file below a folder, or what a glob matches."""
    if not pattern or pattern == "None":
        raise UserInputError("input= is required: an image file, a folder of images, or a glob ('images/*.png').")
    expanded = str(Path(pattern).expanduser())
    if any(character in pattern for character in GLOB_CHARACTERS):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise UserInputError(f"input={pattern}: the pattern matches no files. Check the folder and the pattern.")
        return files
    path = Path(expanded)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserInputError(f"input={pattern}: no such file or folder.")
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)  # noqa: E731
    files = sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p))
    if not files:
        raise UserInputError(f"input={pattern}: the folder holds no files. Give a folder with images.")
    return files


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserInputError(f"device={name}: {error} (e.g. device=auto or device=cpu).") from error
    # torch fails on a device it lacks only when the model is moved there, with a traceback
    present = {"cuda": torch.cuda.device_count, "mps": lambda: int(torch.backends.mps.is_available())}
    if device.type in present and (device.index or 0) >= (count := present[device.type]()):
        raise UserInputError(
            f"device={name}: this machine has {count or 'no'} {device.type} device(s) that torch can use "
            "(e.g. device=auto, a GPU when there is one, or device=cpu)."
        )
    return device


def predict(cfg: DictConfig) -> tuple[list[Prediction], Path]:
    """Predict every input file; the rows and the CSV written. Raises UserInputError when no image was readable."""
    if not isinstance(cfg.top_k, int) or cfg.top_k < 1:
        raise UserInputError(f"top_k={cfg.top_k}: must be an integer >= 1 (e.g. top_k=5).")
    files = input_files(str(cfg.input))  # before the heavy imports: a mistyped input answers at once

    from pipeline.inference import Classifier
    from pipeline.source import build_model, input_spec, load_source
    from pipeline.tracking.store import prepare

    device = _device(str(cfg.device))
    uri = str(cfg.logger.tracking_uri)
    prepare(uri, cfg.logger.http)
    source = load_source(str(cfg.source), uri, fallback=cfg)
    model = build_model(source)
    classifier = Classifier(model, input_spec(source, model), source.classes, source.channels, device)
    top_k = min(int(cfg.top_k), len(source.classes))
    outcomes = classifier.classify(files, batch_size=int(cfg.batch_size))
    rows = []
    for file, outcome in zip(files, outcomes, strict=True):
        top = [] if outcome.probabilities is None else classifier.top(outcome.probabilities, top_k)
        rows.append(Prediction(str(file), top, outcome.error))
    path = write_predictions(rows, top_k, Path(cfg.csv))
    if not any(row.top for row in rows):
        raise UserInputError(
            f"input={cfg.input}: none of the {len(rows)} files could be read as an image (first: {rows[0].path}: "
            f"{rows[0].error}). The errors are listed in {path}."
        )
    return rows, path


def write_predictions(rows: Sequence[Prediction], top_k: int, path: Path) -> Path:
    """One row per file: file, class_1, probability_1, …, class_k, probability_k, error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["file", *[f"{what}_{rank}" for rank in range(1, top_k + 1) for what in ("class", "probability")], "error"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            cells: list[Any] = []
            for rank in range(top_k):
                cells += [row.top[rank][0], f"{row.top[rank][1]:.6f}"] if rank < len(row.top) else ["", ""]
            writer.writerow([row.path, *cells, row.error])
    return path


def show(rows: Sequence[Prediction], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    top_k = max((len(row.top) for row in rows), default=0)
    table = Table(title=f"Top-{top_k} predictions")
    table.add_column("file")
    for rank in range(1, top_k + 1):
        table.add_column(f"#{rank}")
    table.add_column("error", style="red")
    for row in rows:
        cells = [f"{name} ({probability:.1%})" for name, probability in row.top]
        table.add_row(row.path, *cells, *[""] * (top_k - len(cells)), row.error)
    console.print(table)
    failed = sum(1 for row in rows if row.error)
    console.print(f"{len(rows) - failed} predicted, {failed} unreadable. Predictions: {path}")


@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with command(cfg):
        rows, path = predict(cfg)
    show(rows, path)


if __name__ == "__main__":
    exit_after(lambda: hydra_command(main))

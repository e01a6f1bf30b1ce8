"""What every command does around its work: it writes into the folder Hydra made for it, a mistake the user
can fix ends with its message and exit status 2, not a traceback, and progress and metrics look the same in each."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from omegaconf import DictConfig, open_dict

from pipeline.errors import UserInputError

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from rich.table import Table


def adopt_output_folder(cfg: DictConfig) -> None:
    """paths.output_dir becomes the folder Hydra made for this command (its log and config are there)."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir


@contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """Print `error: <message>` and exit 2 for a UserInputError (and the `also` types)."""
    try:
        yield
    except (UserInputError, *also) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def command(cfg: DictConfig) -> Iterator[None]:
    """Around a command that reads a tracked source: output into Hydra's folder, user errors as exit status 2."""
    # MLflow would draw a progress bar over the command's output for every artifact it downloads or uploads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    adopt_output_folder(cfg)
    with user_errors():
        yield


def progress_bar(kind: str) -> Callback | None:
    """The Trainer's progress display for `progress=<kind>`: rich, tqdm, or none (None)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bar = {"rich": RichProgressBar, "tqdm": TQDMProgressBar}.get(kind)
    return bar() if bar is not None else None


def metrics_table(title: str, metrics: Mapping[str, float]) -> Table:
    """`metrics` as a table of metric and value (4 decimals), sorted by name."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    return table


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """SIGTERM raises inside the work (like Ctrl-C does), so a run is recorded as KILLED, not left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. not inside a Ray trial thread)
        return
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def raise_terminated(signum: int, frame: object) -> None:
        raise SIGTERMException(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

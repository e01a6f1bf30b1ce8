"""What every command does around its work: it writes into the folder Hydra made for it, a mistake the user
can fix ends with its message and exit status 2, not a traceback, and progress and metrics look the same in each."""

from __future__ import annotations

import atexit
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import HydraException
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserInputError

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from rich.table import Table


HYDRA_FULL_ERROR = "HYDRA_FULL_ERROR"  # set to 1, Hydra raises errors instead of printing them itself
_composing = False  # hydra_command set HYDRA_FULL_ERROR until the job starts (CommandChecks.on_job_start)
_users_full_error: str | None = None  # the user's own HYDRA_FULL_ERROR (not "1"), given back when the job starts


_exit_status: int | None = None  # set by exit_after: the status this process is exiting with


def exit_after(main: Callable[[], Any]) -> None:
    """Run a command's `main` as the process's main program, then end the process as soon as the exit handlers have
    run, skipping the interpreter's teardown of its modules: 1.5–2.5 s here once torch, Lightning and timm are
    imported (`python -c "import pipeline.run"` takes 1.7 s longer to exit than to finish), and nothing a finished
    command needs. Only for `if __name__ == "__main__"`: a process that imports a command (a test) exits as usual."""
    global _exit_status
    try:
        main()
    except SystemExit as stop:  # Python has printed a message given as the code by the time the handlers run
        _exit_status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    _exit_status = 0


@atexit.register  # registered when the commands start, so it runs after every handler registered later (LIFO)
def _end_without_teardown() -> None:
    if _exit_status is None:  # not ended through exit_after (an uncaught exception, an importing process)
        return
    logging.shutdown()  # its own exit handler was registered before this one, so it would not run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def hydra_command(main: Callable[[], Any]) -> None:
    """Run a @hydra.main function. A config Hydra cannot compose — an unknown key, group option or syntax — ends
    with `error: <what, and the close matches of a mistyped key>` and exit status 2, not Hydra's exit 1."""
    global _composing, _users_full_error
    if os.environ.get(HYDRA_FULL_ERROR) == "1":  # the user asked for Hydra's raw errors
        main()
        return
    # Hydra prints a composition error and exits before anything of ours runs; raised, it can be explained here.
    # Errors of the job itself keep Hydra's own report: CommandChecks.on_job_start gives the variable back.
    _users_full_error = os.environ.get(HYDRA_FULL_ERROR)
    os.environ[HYDRA_FULL_ERROR], _composing = "1", True
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:
        from pipeline.config import composition_error

        print(f"error: {composition_error(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        _give_back_full_error()


def _give_back_full_error() -> None:
    """HYDRA_FULL_ERROR as the user had it (unset, or their own value), once composing is over."""
    global _composing
    if not _composing:
        return
    if _users_full_error is None:
        os.environ.pop(HYDRA_FULL_ERROR, None)
    else:
        os.environ[HYDRA_FULL_ERROR] = _users_full_error
    _composing = False


class CommandChecks(HydraCallback):
    """Hydra callback (hydra.callbacks.checks in every command's config, which tests/test_command_mistakes.py checks):
    the output folder, a multirun's too, is checked before Hydra makes it (`output_folder: false` for a command that
    writes none), and the job's own errors get Hydra's usual report, as hydra_command's explaining of composition
    errors ends here."""

    def __init__(self, output_folder: bool = True) -> None:
        self.output_folder = output_folder

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")  # before Hydra's sweeper makes it: its error would be a traceback

    def _check(self, config: DictConfig, key: str) -> None:
        if not self.output_folder:
            return
        with user_errors():
            check_output_folder(Path(str(OmegaConf.select(config, key))))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _give_back_full_error()


def unwritable(folder: Path, make: bool = True) -> str | None:
    """Make `folder` and write in it; None when that works, else why not (the OS's reason and the path it names).
    make=False: write in the folder, or in the nearest one above it that exists, and leave nothing behind."""
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        where = folder if make else next(path for path in (folder, *folder.parents) if path.exists())
        if not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where))
        # Permission bits do not tell: root "may" write to /proc or a read-only mount, and cannot.
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as error:
        path = Path(str(error.filename)) if error.filename else folder
        if path.parent != folder and path.name.startswith(tempfile.gettempprefix()):  # the probe's file: its folder
            path = path.parent
        return error.strerror + ("" if path == folder else f": {path}")
    return None


def check_output_folder(folder: Path) -> None:
    """Make `folder` (Hydra would, next) and write in it, or raise UserInputError naming paths.output_dir."""
    if reason := unwritable(folder):
        raise UserInputError(
            f"paths.output_dir={folder}: cannot write there ({reason}). Choose a writable folder: "
            "paths.output_dir=<folder> for this run, or paths.root=<folder> for every output (runs, MLflow store)."
        )


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
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(2)


def user_message(error: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker reaches the main process re-made by torch with the
    worker's traceback in its text ("Caught X in DataLoader worker process N. Original Traceback …"): the user's
    mistake is its last line, after the type's name."""
    text = str(error)
    if text.startswith(f"Caught {type(error).__name__} in DataLoader worker process"):
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


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

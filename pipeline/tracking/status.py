"""How a run ends: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any error), never left RUNNING; for training,
evaluation, comparison and sweep runs alike. Imports nothing heavier than the standard library, so a command that only
opens and ends runs (the sweep's driver) does not import Lightning for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


@contextmanager
def recorded_status(
    end: Callable[[str], None],
    note: Callable[[str], None] | None = None,
    interrupted: Callable[[BaseException], None] | None = None,
) -> Iterator[None]:
    """End the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any error): never left RUNNING. `note` is given the
    reason of a failure (the error's type and first line) before the run is ended; `interrupted`, what stopped a
    killed run, once it is ended."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as stop:
        end("KILLED")
        if interrupted is not None:
            with suppress(Exception):  # saying how to continue must not hide what stopped the run
                interrupted(stop)
        raise
    except BaseException as error:
        if note is not None:
            with suppress(Exception):  # the store may be what failed: the error to report is the run's own
                note(failure_reason(error))
        end("FAILED")
        raise
    end("FINISHED")


def failure_reason(error: BaseException) -> str:
    """`<type>: <first line of the message>`, short enough for an MLflow tag."""
    lines = str(error).strip().splitlines()
    return (f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)[:500]

"""python -m pipeline.train [overrides]: compose the config, run(cfg), print the result.

Exit status: 0 trained and tracked; 2 an error the message explains (config, data, tracking server, resume=, a
diverged loss, a full disk); 3 trained, but the tracking server lacks part of the run: the message names the
pipeline.sync command that uploads it; 130 (Ctrl-C) and 143 (SIGTERM) interrupted, the run ended KILLED: the message
names the command that continues it.

With -m (Hydra's multirun) every job is such a run; a job that fails is reported and the others still run. Exit
status: 0 every job trained and tracked; 1 some failed (the table at the end names them and why); 3 every job
trained, but the tracking server lacks part of some.
"""

from __future__ import annotations

import math
import signal
import sys
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig
from rich.console import Console

from pipeline.cli import (
    adopt_output_folder,
    exit_after,
    hydra_command,
    metrics_table,
    sigterm_as_exception,
    user_errors,
)
from pipeline.config import CONF_DIR, validate
from pipeline.errors import RESUME_HINT, TrainingDiverged
from pipeline.multirun import in_multirun, job

if TYPE_CHECKING:
    from pipeline.run import RunResult


def report(result: RunResult) -> None:
    from pipeline.tracking.store import ui_command

    console = Console(soft_wrap=True)
    console.print(metrics_table("Test set, best checkpoint", result.metrics))
    console.print(f"MLflow run: {result.run_id}")
    console.print(f"Checkpoint: {result.best_checkpoint}")
    if result.model_id:
        console.print(f"MLflow model: models:/{result.model_id} (also runs:/{result.run_id}/model)")
    console.print(f"See the runs: {ui_command(result.tracking_uri)}")


def train(cfg: DictConfig) -> RunResult:
    validate(cfg)  # before torch and Lightning load (seconds): a value that cannot work answers at once
    from pipeline.run import run  # imported here so --help and config errors answer fast

    # DDP ranks are re-launched by Lightning with rank 0's hydra.run.dir, so they agree on the output folder
    # even when their clocks tick past a second.
    adopt_output_folder(cfg)
    with sigterm_as_exception():
        try:
            return run(cfg)
        except (KeyboardInterrupt, SystemExit) as stop:
            hint = getattr(stop, RESUME_HINT, None)
            if hint is not None:
                print(hint, file=sys.stderr, flush=True)
            # Lightning answers Ctrl-C with exit status 1; a shell reports it as 130 (128 + SIGINT), as it does SIGTERM
            if isinstance(stop, KeyboardInterrupt) or isinstance(stop.__context__, KeyboardInterrupt):
                raise SystemExit(128 + signal.SIGINT) from None
            raise


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train as configured; returns the best value of monitor.metric (NaN when there is none), so that a Hydra
    sweeper (hydra/sweeper=optuna, nevergrad, …) can optimise it."""
    if in_multirun():
        return job(cfg, train, report)
    with user_errors(TrainingDiverged):
        result = train(cfg)
    if not result.run_id:
        return math.nan  # a data-parallel rank other than the first: the first one reports
    report(result)
    if result.unsynced:  # trained and tested, but the tracking server has not got all of it
        print(f"error: {result.unsynced}", file=sys.stderr)
        sys.exit(3)
    return result.metrics.get(f"best_{cfg.monitor.metric}", math.nan)


if __name__ == "__main__":
    exit_after(lambda: hydra_command(main))

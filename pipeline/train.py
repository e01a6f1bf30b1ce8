"""python -m pipeline.train [overrides]: compose the config, run(cfg), print the result.

Exit status: 0 trained and tracked; 2 an error the message explains (config, data, tracking server, resume=, a
diverged loss, a full disk); 3 trained, but the tracking server lacks part of the run: the message names the
pipeline.sync command that uploads it.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig
from rich.console import Console

from pipeline.cli import adopt_output_folder, metrics_table, sigterm_as_exception, user_errors
from pipeline.config import CONF_DIR, validate
from pipeline.errors import TrainingDiverged


def report(result: object) -> None:
    from pipeline.tracking.store import ui_command

    console = Console(soft_wrap=True)
    console.print(metrics_table("Test set, best checkpoint", result.metrics))
    console.print(f"MLflow run: {result.run_id}")
    console.print(f"Checkpoint: {result.best_checkpoint}")
    console.print(f"See the runs: {ui_command(result.tracking_uri)}")


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        validate(cfg)  # before torch and Lightning load (seconds): a value that cannot work answers at once
    from pipeline.run import run  # imported here so --help and config errors answer fast

    # DDP ranks are re-launched by Lightning with rank 0's hydra.run.dir, so they agree on the output folder
    # even when their clocks tick past a second.
    adopt_output_folder(cfg)
    with user_errors(TrainingDiverged), sigterm_as_exception():
        result = run(cfg)
    if not result.run_id:
        return  # a data-parallel rank other than the first: the first one reports
    report(result)
    if result.unsynced:  # trained and tested, but the tracking server has not got all of it
        print(f"error: {result.unsynced}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()

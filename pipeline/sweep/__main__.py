"""python -m pipeline.sweep [sweep=<preset>] [overrides]: Ray Tune over the same run(cfg) that pipeline.train calls.

The driver composes the config, checks the search space against it (before Ray starts), creates the MLflow
experiment and the sweep's parent run, and lets Ray Tune run trials. Each trial composes the train config
with its sampled overrides and calls run(cfg), reporting every epoch to Tune (for ASHA) with a checkpoint
(for retries). At the end the driver records every trial on the parent run and writes the best trial's
config as a YAML that pipeline.train accepts as it is; with sweep.register_best=<name>, the best trial that ran to its
test has its MLflow model registered under that name.

Exit status: 0 done; 2 an error the message explains (config, search space, tracking store), or every trial failed
because of its config (e.g. a diverged loss); 1 every trial failed otherwise. With no successful trial there is no
best config, and the parent run is FAILED.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.cli import hydra_command
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError
from pipeline.sweep.driver import SweepFailed, run_sweep


@hydra.main(config_path=str(CONF_DIR), config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        outcome = run_sweep(cfg, list(HydraConfig.get().overrides.task))
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SweepFailed as error:  # the parent run is marked FAILED
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    state = outcome["state"]
    print(f"\nBest trial: {' '.join(outcome['best_overrides'])}")
    print(f"Trials table: {state.folder}/trials.csv")
    print(f"Best config: {outcome['best_config']}")
    print(f"Retrain it: python -m pipeline.train --config-dir {state.folder} --config-name best_config")
    registered = outcome["registered"]
    if registered is not None:
        print(f"Best trial's model: models:/{registered.name}/{registered.version} (run {registered.run_id})")


if __name__ == "__main__":
    hydra_command(main)

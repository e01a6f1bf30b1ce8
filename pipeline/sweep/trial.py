"""One Ray Tune trial: the train config with the trial's sampled values, trained by the same run(cfg) as
pipeline.train, reporting every epoch to Tune (for ASHA) with a checkpoint (for retries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import open_dict

from pipeline.config import compose
from pipeline.sweep.state import TRIAL_CHECKPOINT, SweepState, tune_name

TRAIN_SOURCE = Path(__file__).resolve().parents[1] / "train.py"  # the command a trial's run stands for


def trial_number(trial_id: str) -> int:
    """Tune's trial ids end with the trial's number in the sweep: `a1b2c3d4_00003` → 3."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def train_trial(config: dict[str, Any], state: dict[str, Any]) -> None:
    """One Ray Tune trial: the train config + this trial's values → run(cfg), reporting every epoch."""
    import ray
    import torch
    from ray import tune

    from pipeline.sweep.space import override_text
    from pipeline.sweep.tracking import find_child_run
    from pipeline.tracking.naming import train_command, trial_name

    sweep = SweepState(**state)
    torch.set_num_threads(max(1, int(sweep.settings["resources"]["cpu"])))  # not every core: trials share them
    trial_id = tune.get_context().get_trial_id()
    gpus = sweep.settings["resources"]["gpu"]
    trial_settings = [
        "progress=none",
        "trainer.enable_model_summary=false",
        # A trial given no GPU must not take one it was not given (Ray leaves every GPU visible then).
        f"trainer.accelerator={'gpu' if gpus else 'cpu'}",
        "trainer.devices=1",
    ]
    # Overrides, not edits of the composed config: they are the trial's `command`, which trains it again.
    overrides = [*sweep.base_overrides, *(override_text(k, v) for k, v in config.items()), *trial_settings]
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(sweep.folder) / "trials" / trial_id)
        cfg.logger.run_name = trial_name(sweep.name, trial_number(trial_id), config)
        cfg.logger.parent_run_id = sweep.parent_run_id
        cfg.logger.tags = {
            **cfg.logger.tags,
            # What trains this trial again, and its source: this process is Ray's worker, whose command is Ray's.
            "command": train_command(overrides),
            "mlflow.source.name": str(TRAIN_SOURCE),
            "mlflow.source.type": "LOCAL",
            "sweep.name": sweep.name,
            "sweep.trial_id": trial_id,
            "sweep.node_id": ray.get_runtime_context().get_node_id(),
        }
        # A retried or resumed trial continues its own MLflow run, from its last reported checkpoint.
        cfg.logger.run_id = find_child_run(sweep.tracking_uri, sweep.parent_run_id, trial_id)
    metric = sweep.settings["metric"]
    reported = {tune_name(m): m for m in dict.fromkeys([metric, "val/loss", "val/acc", "train/loss"])}
    if sweep.settings["resources"]["workers_per_trial"] > 1:
        from pipeline.sweep.workers import train_on_workers

        train_on_workers(cfg, sweep.settings, sweep.folder, reported)
        return
    # Only a trial that trains in its own process imports the training (Lightning, timm: seconds of CPU); one spread
    # over workers only drives them, and they import it.
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    from pipeline.run import run

    report = TuneReportCheckpointCallback(metrics=reported, filename=TRIAL_CHECKPOINT, on="train_epoch_end")
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run(cfg, callbacks=[report])
        return
    with checkpoint.as_directory() as folder:
        with open_dict(cfg):
            cfg.resume = str(Path(folder) / TRIAL_CHECKPOINT)
        run(cfg, callbacks=[report])

"""A sweep trial spread over several Ray Train workers: one DDP run per trial, over any nodes of the cluster.

The Tune trial only drives a TorchTrainer (and so imports no Lightning); each worker calls the same run(cfg) as one
rank of Lightning's Ray DDP strategy, reports every epoch to Ray Train (pipeline.sweep.worker_callbacks), and Ray Train
passes the reports on to the Tune trial, so ASHA, the trial table and MLflow see the trial as they see a one-process
trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.train
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from ray import tune
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.sweep.state import TRIAL_CHECKPOINT


def train_on_workers(cfg: DictConfig, settings: dict[str, Any], folder: str, reported: dict[str, str]) -> None:
    """One trial data-parallel over sweep.resources.workers_per_trial Ray Train workers (Lightning's Ray DDP
    strategy), each running run(cfg); their reports reach this Tune trial as a one-process trial's do."""
    resources = settings["resources"]
    with open_dict(cfg):
        cfg.trainer.strategy = {"_target_": "ray.train.lightning.RayDDPStrategy"}
        cfg.trainer.plugins = [{"_target_": "ray.train.lightning.RayLightningEnvironment"}]
        cfg.trainer.devices = "auto"  # Ray gives each worker its device
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "reported": reported,
            "threads": max(1, int(resources["cpu"])),
        },
        scaling_config=ScalingConfig(
            num_workers=resources["workers_per_trial"],
            use_gpu=bool(resources["gpu"]),
            resources_per_worker={"CPU": resources["cpu"], "GPU": resources["gpu"]},
        ),
        torch_config=TorchConfig(backend="nccl" if resources["gpu"] else "gloo"),
        run_config=RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=str(Path(folder) / "workers"),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=settings["max_failures"]),
        ),
    )
    trainer.fit()


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: run(cfg) as one rank of a DDP run, resumed from the trial's last report."""
    # Imported here, in the worker: the trial's own process only drives the workers and need not load the training.
    from pipeline.run import run
    from pipeline.sweep.worker_callbacks import EpochReport, WorkerHosts

    torch.set_num_threads(config["threads"])
    cfg = OmegaConf.create(config["cfg"])
    callbacks = [EpochReport(config["reported"]), WorkerHosts()]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run(cfg, callbacks=callbacks)
        return
    with checkpoint.as_directory() as folder:
        cfg.resume = str(Path(folder) / TRIAL_CHECKPOINT)
        run(cfg, callbacks=callbacks)

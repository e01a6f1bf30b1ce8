"""What each Ray Train worker of a trial spread over several reports (pipeline.sweep.workers): its epochs, with the
checkpoint to resume from, and the host it trains on."""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import ray.train
import torch
from lightning.pytorch.callbacks import Callback

from pipeline.sweep.state import TRIAL_CHECKPOINT
from pipeline.tracking.logger import RecordedMLFlowLogger


class EpochReport(Callback):
    """Every rank reports each epoch's metrics to Ray Train; the first also gives the checkpoint to resume from."""

    def __init__(self, reported: dict[str, str]) -> None:
        self.reported = reported

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = trainer.callback_metrics
        metrics = {key: float(logged[name]) for key, name in self.reported.items() if name in logged}
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(Path(folder) / TRIAL_CHECKPOINT)  # written by the first rank only
            checkpoint = ray.train.Checkpoint.from_directory(folder) if trainer.is_global_zero else None
            ray.train.report(metrics, checkpoint=checkpoint)


class WorkerHosts(Callback):
    """The trial's run is tagged with the address of every worker's host, in rank order (`sweep.worker_hosts`): where
    the trial trained."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hosts: list[str | None] = [None] * trainer.world_size
        torch.distributed.all_gather_object(hosts, ray.util.get_node_ip_address())
        if trainer.is_global_zero and isinstance(trainer.logger, RecordedMLFlowLogger):
            trainer.logger.set_tag("sweep.worker_hosts", ",".join(str(host) for host in hosts))

"""Data-parallel runs: which process leads, how many images a step sees, and what happens when a rank dies.

Lightning's DDP launcher re-runs the command for ranks 1…N-1 with LOCAL_RANK set (and launchers such as
torchrun or SLURM set RANK / NODE_RANK / GROUP_RANK on other nodes). Only the first process tracks the run in
MLflow and tests the model, so one run and one set of test metrics come out, however many processes train.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from pipeline.errors import UserInputError
from pipeline.internals import DeadRanks, WatchedDDPStrategy

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def check_accelerator(trainer: DictConfig) -> None:
    """trainer.accelerator: one Lightning knows, with a device of its kind on this machine. Checked before anything
    is written; Lightning's own refusal comes when the Trainer is built, once the run is open, as a traceback."""
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    name = trainer.get("accelerator", "auto")
    if not isinstance(name, str) or name == "auto":  # auto takes what there is; an Accelerator object is the user's
        return
    kinds = {n: (AcceleratorRegistry[n]["accelerator"],) for n in AcceleratorRegistry.available_accelerators()}
    kinds["gpu"] = (CUDAAccelerator, MPSAccelerator)  # Lightning's "gpu": CUDA, else Apple's MPS
    if name not in kinds:
        raise UserInputError(
            f"trainer.accelerator={name!r}: not an accelerator Lightning knows. Give one of auto, "
            f"{', '.join(sorted(kinds))} (e.g. trainer.accelerator=auto)."
        )
    if not any(kind.is_available() for kind in kinds[name]):
        device = {"gpu": "GPU (CUDA or MPS)", "cuda": "CUDA GPU", "mps": "MPS GPU", "tpu": "TPU (torch_xla)"}
        raise UserInputError(
            f"trainer.accelerator={name}: this machine has no {device.get(name, name)} that torch can use. Train on "
            "what it has (trainer.accelerator=auto, or leave out trainer=gpu), or run where there is one."
        )


def is_first_process() -> bool:
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in RANK_VARIABLES)


def effective_batch_size(batch_size: int, devices: int, num_nodes: int, accumulate_grad_batches: int) -> int:
    """Images per optimizer step across all processes."""
    return batch_size * devices * num_nodes * accumulate_grad_batches


def describe_batch(batch_size: int, devices: int, num_nodes: int, accumulate_grad_batches: int) -> str:
    total = effective_batch_size(batch_size, devices, num_nodes, accumulate_grad_batches)
    processes = "process" if devices == 1 else "processes"
    nodes = "node" if num_nodes == 1 else "nodes"
    return (
        f"effective batch size {total} ({devices} {processes} × {batch_size} × {num_nodes} {nodes} × "
        f"{accumulate_grad_batches} accumulated)"
    )


RankDeath = Callable[[str], None]  # told what happened, before every process is stopped


class ReportingDDPStrategy(WatchedDDPStrategy):
    """Lightning's DDPStrategy (every argument the same) that tells `on_rank_death` when a launched rank dies.

    Lightning then SIGKILLs every process, the first one included: reporting first means the run is marked FAILED
    rather than left RUNNING by a process that never gets to say why it stopped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_rank_death: RankDeath = lambda message: None

    def before_ranks_killed(self, dead: DeadRanks) -> None:
        what = ", ".join(f"rank {rank} (PID {proc.pid}) exited with code {proc.returncode}" for rank, proc in dead)
        message = f"a data-parallel process died: {what}. Every process of the run is stopped."
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.on_rank_death(message)


def end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def single_process_tester(
    trainer: L.Trainer, trainer_arguments: dict[str, Any], progress: Callback | None, logger: Logger
) -> L.Trainer:
    """The Trainer that tests: the training one, or after data-parallel training a one-device Trainer in the first
    process, so every test image is counted exactly once (a distributed sampler pads the split with repeats).
    `trainer_arguments`: those the training Trainer was made with (conf/trainer)."""
    if trainer.world_size == 1:
        return trainer
    end_process_group()
    arguments = {**trainer_arguments, "devices": 1, "num_nodes": 1, "strategy": "auto", "plugins": None}
    bars = [progress] if progress is not None else []
    return L.Trainer(**arguments, logger=logger, callbacks=bars, enable_progress_bar=progress is not None)

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

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


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


class _ReportingObserver(_ChildProcessObserver):
    """Lightning's watch over the launched ranks, which SIGKILLs every process (the first one included) as soon
    as one rank exits with an error. It runs in the first process: report first, so the run is marked FAILED
    rather than left RUNNING by a process that never gets to say why it stopped."""

    def __init__(self, main_pid: int, child_processes: list[Any], on_rank_death: RankDeath) -> None:
        super().__init__(main_pid, child_processes)
        self.on_rank_death = on_rank_death

    def _terminate_all(self) -> None:
        dead = [(rank, proc) for rank, proc in enumerate(self._child_processes, start=1) if proc.returncode]
        what = ", ".join(f"rank {rank} (PID {proc.pid}) exited with code {proc.returncode}" for rank, proc in dead)
        message = f"a data-parallel process died: {what}. Every process of the run is stopped."
        print(f"error: {message}", file=sys.stderr, flush=True)
        try:
            self.on_rank_death(message)
        finally:
            super()._terminate_all()


class _ReportingLauncher(_SubprocessScriptLauncher):
    def __init__(self, *args: Any, on_rank_death: RankDeath, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_rank_death = on_rank_death

    def launch(self, function: Callable[..., Any], *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        # Lightning's launch, with the reporting observer in place of its own.
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _ReportingObserver(os.getpid(), self.procs, self.on_rank_death).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class ReportingDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy (every argument the same) that tells `on_rank_death` when a launched rank dies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_rank_death: RankDeath = lambda message: None

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _ReportingLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, on_rank_death=self._report
            )

    def _report(self, message: str) -> None:
        self.on_rank_death(message)

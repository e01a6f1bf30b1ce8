"""Which process of a data-parallel run this is, decided before Lightning starts the others.

Lightning's DDP launcher re-runs the command for ranks 1…N-1 with LOCAL_RANK set (and launchers such as
torchrun or SLURM set RANK / NODE_RANK / GROUP_RANK on other nodes). Only the first process tracks the run in
MLflow and tests the model, so one run and one set of test metrics come out, however many processes train.
"""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in RANK_VARIABLES)


def effective_batch_size(batch_size: int, devices: int, num_nodes: int, accumulate_grad_batches: int) -> int:
    """Images per optimizer step across all processes."""
    return batch_size * devices * num_nodes * accumulate_grad_batches

"""How many DataLoader workers this machine can feed, as the `${loader_workers:}` config resolver.

Registered on import; pipeline.config imports this module so every composed config can use it.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

MAX_LOADER_WORKERS = 8  # beyond this, decoding rarely limits a single-GPU run and each worker costs memory


def available_cpus() -> int:
    """CPUs this process may run on: respects taskset and Slurm/cgroup CPU sets, unlike os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers() -> int:
    """One CPU is left to the training loop in the main process; at most MAX_LOADER_WORKERS."""
    return max(0, min(MAX_LOADER_WORKERS, available_cpus() - 1))


OmegaConf.register_new_resolver("loader_workers", loader_workers, replace=True)

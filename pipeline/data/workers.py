"""How many DataLoader workers this machine can feed, as the `${loader_workers:}` config resolver, and the seed each
data-parallel rank draws its data randomness from.

Registered on import; pipeline.config imports this module so every composed config can use it.
"""

from __future__ import annotations

import os

import numpy as np
from omegaconf import OmegaConf


def available_cpus() -> int:
    """CPUs this process may run on: respects taskset and Slurm/cgroup CPU sets, unlike os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers() -> int:
    """Every CPU but one, which is left to the training loop in the main process. No cap: decoding and augmenting
    224-px photos takes one core per 350–650 images/s (benchmarks/RESULTS.md), so a GPU that trains at thousands of
    images a second needs every core the machine has."""
    return max(0, available_cpus() - 1)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of data-parallel rank `rank` for a stream seeded with `seed`: the seed itself on rank 0, so a single
    process draws what it always drew, and on every other rank a seed hashed from both (NumPy's SeedSequence, the
    mixing Lightning's own worker seeding uses), so ranks draw distinct streams that `seed` still reproduces."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


OmegaConf.register_new_resolver("loader_workers", loader_workers, replace=True)

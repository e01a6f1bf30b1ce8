"""Learning-rate schedules, stepped every optimizer step, each with an optional linear warm-up.

Each function is a Hydra target (`conf/scheduler/*.yaml`, `_partial_: true`); the LightningModule calls
it with the optimizer and the run's length once the Trainer knows how many steps an epoch has.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def fit_warmup(warmup_epochs: float, max_epochs: int) -> float:
    """The warm-up a run of `max_epochs` gets: as configured when it ends before the run does; otherwise half the
    run. A run shorter than its preset's warm-up (a one-epoch smoke test of a recipe) then still rises to its
    learning rate and follows the rest of its schedule, instead of ending mid-warm-up at a fraction of the rate it
    was meant to test. Half, not all but a step: the schedule's shape after the warm-up (the decay, the anneal of
    1cycle) is part of what such a run checks."""
    return warmup_epochs if warmup_epochs < max_epochs else max_epochs / 2


def _with_warmup(optimizer: Optimizer, factor: callable, warmup_steps: int, warmup_start_factor: float) -> LRScheduler:
    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
        return factor(step - warmup_steps)

    return LambdaLR(optimizer, lr_lambda)


def constant(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.1,
) -> LRScheduler:
    return _with_warmup(optimizer, lambda _: 1.0, round(warmup_epochs * steps_per_epoch), warmup_start_factor)


def cosine(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.1,
    min_lr_factor: float = 0.0,
) -> LRScheduler:
    """Half-cosine decay from the base LR to base LR × min_lr_factor over the steps after warm-up."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    decay_steps = max(1, max_epochs * steps_per_epoch - warmup_steps)

    def factor(step: int) -> float:
        progress = min(1.0, step / decay_steps)
        return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _with_warmup(optimizer, factor, warmup_steps, warmup_start_factor)


def step(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    max_epochs: int,
    step_epochs: int,
    gamma: float,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.1,
) -> LRScheduler:
    """Multiply the LR by gamma every step_epochs epochs (counted after warm-up)."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    return _with_warmup(
        optimizer,
        lambda s: gamma ** (s // (step_epochs * steps_per_epoch)),
        warmup_steps,
        warmup_start_factor,
    )


def one_cycle(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_epochs: float,
    div_factor: float,
    final_div_factor: float,
    anneal_strategy: str = "cos",
) -> LRScheduler:
    """Smith's 1cycle with the optimizer's LR as the peak; the rise lasts warmup_epochs."""
    total_steps = max_epochs * steps_per_epoch
    return OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=total_steps,
        # OneCycleLR peaks at step pct_start × total_steps - 1: +1 puts the peak where the warm-up of the others ends
        pct_start=min(0.99, (max(1, round(warmup_epochs * steps_per_epoch)) + 1) / total_steps),
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
        cycle_momentum=False,
    )

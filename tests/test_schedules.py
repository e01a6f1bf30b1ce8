"""Every schedule warms up linearly and then follows its shape; the LR is stepped per optimizer step."""

from __future__ import annotations

import pytest
import torch

from pipeline import schedules

STEPS_PER_EPOCH, EPOCHS, LR = 10, 10, 0.1


def lrs(build, **kwargs: float) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build(optimizer, steps_per_epoch=STEPS_PER_EPOCH, max_epochs=EPOCHS, **kwargs)
    values = []
    for _ in range(STEPS_PER_EPOCH * EPOCHS):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_warms_up_then_decays_to_the_floor() -> None:
    values = lrs(schedules.cosine, warmup_epochs=1, warmup_start_factor=0.1, min_lr_factor=0.01)
    assert values[0] == pytest.approx(0.1 * LR)
    assert values[:STEPS_PER_EPOCH] == sorted(values[:STEPS_PER_EPOCH]), "warm-up rises"
    assert values[STEPS_PER_EPOCH] == pytest.approx(LR)
    decay = values[STEPS_PER_EPOCH:]
    assert decay == sorted(decay, reverse=True), "then only decays"
    assert decay[-1] == pytest.approx(0.01 * LR, rel=0.05)


def test_step_decays_by_gamma_every_step_epochs() -> None:
    values = lrs(schedules.step, step_epochs=4, gamma=0.5)
    assert values[0] == pytest.approx(LR)
    assert values[4 * STEPS_PER_EPOCH] == pytest.approx(LR / 2)
    assert values[8 * STEPS_PER_EPOCH] == pytest.approx(LR / 4)


def test_one_cycle_peaks_at_the_configured_lr_after_warmup() -> None:
    values = lrs(schedules.one_cycle, warmup_epochs=3, div_factor=25, final_div_factor=1e4)
    assert values[0] == pytest.approx(LR / 25)
    assert max(values) == pytest.approx(LR, rel=1e-3)
    assert values.index(max(values)) == pytest.approx(3 * STEPS_PER_EPOCH, abs=1)
    assert values[-1] < LR / 1000


def test_constant_with_warmup() -> None:
    values = lrs(schedules.constant, warmup_epochs=2)
    assert values[0] == pytest.approx(0.1 * LR)
    assert values[2 * STEPS_PER_EPOCH :] == pytest.approx([LR] * (EPOCHS - 2) * STEPS_PER_EPOCH)


@pytest.mark.parametrize(
    ("asked", "epochs", "used"),
    [(1, 1, 0.5), (5, 2, 1.0), (3, 3, 1.5), (0.5, 1, 0.5), (2.9, 3, 2.9), (0, 1, 0)],
)
def test_a_warmup_that_does_not_fit_becomes_half_the_run(asked: float, epochs: int, used: float) -> None:
    assert schedules.fit_warmup(asked, epochs) == used


def test_a_one_epoch_run_with_the_fitted_warmup_rises_to_the_lr_then_decays() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    warmup = schedules.fit_warmup(1, max_epochs=1)
    scheduler = schedules.cosine(optimizer, steps_per_epoch=STEPS_PER_EPOCH, max_epochs=1, warmup_epochs=warmup)
    values = []
    for _ in range(STEPS_PER_EPOCH):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = values.index(max(values))
    assert peak == STEPS_PER_EPOCH // 2 and max(values) == pytest.approx(LR), "the configured lr is reached mid-run"
    assert values[: peak + 1] == sorted(values[: peak + 1]) and values[peak:] == sorted(values[peak:], reverse=True)
    assert values[-1] < LR / 5, "and the schedule's decay is run too"

"""Model EMA: an exponential moving average of the weights, validated, tested and checkpointed instead of them.

Lightning's `WeightAveraging` callback does the work: it keeps the average (`torch.optim.swa_utils.AveragedModel`,
parameters and BatchNorm statistics) after every optimizer step, swaps it in for validation, copies it into the
model when training ends, and writes it as the checkpoint's `state_dict` — so the best checkpoint, the test, and
anything that later loads a checkpoint see the EMA weights — with the live weights in `current_model_state`, from
which `resume=` restores both. Added here: timm's EMA warm-up, the checkpoint's `weights` flag, and a test that
keeps the EMA weights it loaded (Lightning's callback would reload the live ones).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

WEIGHTS_KEY = "weights"  # in every checkpoint of ours: "ema" or "live", which weights its state_dict holds


def ema_decay(decay: float, num_averaged: int, warmup: bool) -> float:
    """The decay for this update. With warm-up, timm's ModelEmaV3 rule (gamma 1, power 2/3): the average follows
    the fast-changing early weights closely (it spans about (1 + step)^(2/3) steps) and reaches `decay` after
    about (1 - decay)^-1.5 steps (1,000 for 0.99)."""
    if not warmup:
        return decay
    return min(decay, 1 - (1 + num_averaged) ** (-2 / 3))


@torch.no_grad()
def _ema_update(
    averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor, decay: float, warmup: bool
) -> None:
    """AveragedModel's multi-tensor EMA update (torch's get_ema_multi_avg_fn) with the decay of this step."""
    get_ema_multi_avg_fn(ema_decay(decay, int(num_averaged), warmup))(averaged, current, num_averaged)


class ModelEma(WeightAveraging):
    def __init__(self, decay: float = 0.9998, warmup: bool = True) -> None:
        super().__init__(multi_avg_fn=partial(_ema_update, decay=decay, warmup=warmup))
        self.averaging = False  # WeightAveraging makes its average in fit's set-up; from then on it swaps it in
        self.swapped = False  # during validation the model holds the average and the average the live weights

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.averaging = self.averaging or stage == "fit"

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self.swapped = self.averaging

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self.swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.swapped and "current_model_state" in checkpoint:
            # Saved mid-validation (an interrupt, a crash): the roles are exchanged; put each where it belongs.
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"],
                checkpoint["state_dict"],
            )
        checkpoint[WEIGHTS_KEY] = "ema"

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # resuming: the average and the live weights both come back
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Testing or validating a checkpoint: its state_dict, the EMA weights, is what is evaluated.

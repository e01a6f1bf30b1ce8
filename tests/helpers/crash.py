"""A Lightning callback for tests: a crash (a bug, not a user's mistake) at the start of a chosen epoch."""

from __future__ import annotations

import lightning as L


class CrashAtEpoch(L.Callback):
    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError(f"a crash at the start of epoch {self.at_epoch}, as a bug would")

"""A Lightning callback that writes a digest of the first training batch each process draws, so a test can compare
what the data-parallel ranks were fed (`+callbacks.digest._target_=tests.helpers.batch_digest.FirstBatchDigest`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class FirstBatchDigest(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 0 and batch_idx == 0:
            images = batch[0].detach().cpu().contiguous().numpy()
            self.folder.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(images.tobytes()).hexdigest()
            (self.folder / f"rank{trainer.global_rank}.txt").write_text(f"{digest} {tuple(images.shape)}\n")

"""A Lightning callback that logs every training batch a process draws — epoch, batch index, size and a digest of
its images and labels — one line per batch in `<folder>/rank<N>.txt`; with `stop_at: [epoch, batch]` it raises there,
as a crash mid-epoch would (`+callbacks.log._target_=tests.helpers.batch_log.BatchLog +callbacks.log.folder=…`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class BatchLog(Callback):
    def __init__(self, folder: str, stop_at: list[int] | None = None) -> None:
        self.folder = Path(folder)
        self.stop_at = list(stop_at) if stop_at else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, labels = (part.detach().cpu().contiguous().numpy() for part in batch)
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"rank{trainer.global_rank}.txt").open("a") as log:
            log.write(f"{trainer.current_epoch} {batch_idx} {len(labels)} {digest}\n")
        if self.stop_at == [trainer.current_epoch, batch_idx]:
            raise RuntimeError(f"stopped by the test at epoch {trainer.current_epoch}, batch {batch_idx}")


def read(path: Path) -> dict[tuple[int, int], tuple[int, str]]:
    """(epoch, batch) → (size, digest) of the batches a log holds; a batch drawn twice keeps its last line."""
    entries = {}
    for line in path.read_text().splitlines():
        epoch, batch, size, digest = line.split()
        entries[(int(epoch), int(batch))] = (int(size), digest)
    return entries

"""A split's loss and classification metrics over an epoch, fed every batch and updated a chunk of batches at once.

A torchmetrics update is a dozen small tensor operations whatever the batch size: about 1 ms a batch on this CPU
(a tenth of a LeNet-5 step) and as many kernel launches on a GPU. The batches' logits, labels and losses are kept
(detached, on their device) until `chunk_images` images have arrived, then go through the metrics in one update;
computing the epoch's values takes in what is still kept. The values are exactly those of per-batch updates.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def classification_metrics(num_classes: int) -> MetricCollection:
    metrics: dict[str, MulticlassAccuracy | MulticlassF1Score] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class EpochMetrics(nn.Module):
    """`<prefix>loss` (the mean over images; NaN kept, so divergence shows) and the metrics of
    `classification_metrics`, prefixed. Memory: at most `chunk_images` × classes logits besides the model's."""

    def __init__(self, num_classes: int, prefix: str, chunk_images: int = 2048) -> None:
        super().__init__()
        self.prefix = prefix
        self.metrics = classification_metrics(num_classes).clone(prefix=prefix)
        self.loss = MeanMetric(nan_strategy="disable")
        self.chunk_images = chunk_images
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (logits, labels, loss per image)
        self._kept_images = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        # The loss once per image, so the mean over the kept images weighs each batch by its size.
        self._kept.append((logits.detach(), labels, loss.detach().float().reshape(1).expand(len(labels))))
        self._kept_images += len(labels)
        if self._kept_images >= self.chunk_images:
            self._update_kept()

    def _update_kept(self) -> None:
        if self._kept:
            logits, labels, losses = (torch.cat(parts) for parts in zip(*self._kept, strict=True))
            self.metrics.update(logits, labels)
            self.loss.update(losses)
        self._kept.clear()
        self._kept_images = 0

    def compute(self) -> dict[str, torch.Tensor]:
        """The epoch's values (reduced over processes, as torchmetrics does); then starts the next epoch."""
        self._update_kept()
        values = {f"{self.prefix}loss": self.loss.compute(), **self.metrics.compute()}
        self.reset()
        return values

    def reset(self) -> None:
        self._kept.clear()
        self._kept_images = 0
        self.loss.reset()
        self.metrics.reset()

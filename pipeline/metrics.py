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
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._kept = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        self._logits.append(logits.detach())
        self._labels.append(labels)
        self._losses.append(loss.detach().float().reshape(1).expand(len(labels)))  # weighted by the batch's size
        self._kept += len(labels)
        if self._kept >= self.chunk_images:
            self._update_kept()

    def _update_kept(self) -> None:
        if not self._kept:
            return
        self.metrics.update(torch.cat(self._logits), torch.cat(self._labels))
        self.loss.update(torch.cat(self._losses))
        self._logits.clear(), self._labels.clear(), self._losses.clear()
        self._kept = 0

    def compute(self) -> dict[str, torch.Tensor]:
        """The epoch's values (reduced over processes, as torchmetrics does); then starts the next epoch."""
        self._update_kept()
        values = {f"{self.prefix}loss": self.loss.compute(), **self.metrics.compute()}
        self.reset()
        return values

    def reset(self) -> None:
        self._logits.clear(), self._labels.clear(), self._losses.clear()
        self._kept = 0
        self.loss.reset()
        self.metrics.reset()

"""The LightningModule's metrics: top-5 accuracy only where there are at least five classes."""

from __future__ import annotations

import torch

from pipeline.module import classification_metrics


def test_top5_only_with_five_or_more_classes() -> None:
    assert set(classification_metrics(10).keys()) == {"acc", "f1", "acc_top5"}
    assert set(classification_metrics(3).keys()) == {"acc", "f1"}


def test_metrics_measure_what_they_say() -> None:
    metrics = classification_metrics(5)
    logits = torch.eye(5)[[0, 1, 2, 3]]  # predicts 0, 1, 2, 3
    metrics.update(logits, torch.tensor([0, 1, 2, 4]))
    values = metrics.compute()
    assert values["acc"] == 0.75
    assert values["acc_top5"] == 1.0

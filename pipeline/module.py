"""The LightningModule for image classification: loss, metrics, optimizer and schedule.

It knows nothing of data sources or tracking: it receives a model and factories built from config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from pipeline.errors import TrainingDiverged
from pipeline.models.factory import head_and_backbone

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def classification_metrics(num_classes: int) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory,
        label_smoothing: float = 0.0,
        aux_weight: float = 0.3,
        backbone_lr_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.aux_weight = aux_weight
        self.backbone_lr_factor = backbone_lr_factor
        metrics = classification_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: MetricCollection
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        output = self(images)
        if isinstance(output, tuple):
            # Auxiliary classifiers (GoogLeNet in training mode): their losses are added with a small weight
            # to push gradient into the lower layers (Szegedy et al. 2014 use 0.3); only the main logits count.
            logits, *aux = output
            loss = self.criterion(logits, labels) + self.aux_weight * sum(self.criterion(a, labels) for a in aux)
        else:
            logits = output
            loss = self.criterion(logits, labels)
        metrics.update(logits, labels)
        self.log(
            f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train", self.train_metrics)
        self._nonfinite_steps += (~torch.isfinite(loss.detach())).int()
        return loss

    def on_train_epoch_start(self) -> None:
        self._nonfinite_steps = torch.zeros((), dtype=torch.int32, device=self.device)

    def on_train_epoch_end(self) -> None:
        # Counted on the device and read once an epoch: a per-step check would synchronise the GPU.
        bad = int(self._nonfinite_steps.item())
        if bad:
            raise TrainingDiverged(
                f"train/loss was NaN or infinite in {bad} step(s) of epoch {self.current_epoch}: training "
                "diverged. "
                "Lower optim.lr, set trainer.gradient_clip_val, or check the input data for NaN/inf. "
                "Checkpoints of the earlier epochs are kept."
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        _, logits = self._step(batch, "test", self.test_metrics)
        self.test_confusion.update(logits, batch[1])

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group; or, with a backbone_lr_factor other than 1, the head and the backbone apart (discriminative
        learning rates). Frozen parameters stay in their group: without gradients the optimizer skips them."""
        if self.backbone_lr_factor == 1:
            return [{"params": list(self.parameters())}]
        head, backbone = head_and_backbone(self.model)
        return [{"params": head, "name": "head"}, {"params": backbone, "name": "backbone"}]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:
            if group.get("name") == "backbone":
                group["lr"] *= self.backbone_lr_factor  # before the scheduler takes each group's lr as its base
        max_epochs = self.trainer.max_epochs
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max_epochs)
        scheduler = self.scheduler_factory(optimizer, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

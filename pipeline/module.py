"""The LightningModule for image classification: loss, metrics, optimizer and schedule.

It knows nothing of data sources or tracking: it receives a model and factories built from config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassConfusionMatrix

from pipeline.data.workers import rank_seed
from pipeline.distributed import effective_batch_size
from pipeline.ema import WEIGHTS_KEY
from pipeline.errors import TrainingDiverged, UserInputError
from pipeline.metrics import EpochMetrics
from pipeline.models.factory import head_and_backbone
from pipeline.recipes import ParameterGroups, name_groups, scaled_lr

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def enable_grad_checkpointing(model: nn.Module) -> None:
    """timm's switch: the model recomputes its blocks' activations in the backward pass instead of keeping them."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as error:  # no method; timm's VGG etc. assert
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise UserInputError(
            f"perf.grad_checkpointing=true: {name} does not support gradient checkpointing "
            f"({error or type(error).__name__}). Set perf.grad_checkpointing=false, or pick a model that has it "
            "(ours, timm's ResNets, EfficientNets, ConvNeXts, ViTs, …)."
        ) from error


def mix_as_rank(rank: int) -> None:
    """Make the Mixup/CutMix draws of data-parallel rank `rank` its own. timm's Mixup draws from NumPy's global
    generator, seeded alike on every rank (and restored from the first process's checkpoint on resume), so every rank
    would mix its batch with the same λ and boxes. Rank 0 keeps the stream as it is (a single process draws what it
    always drew); every other rank reseeds it from one draw of it mixed with its rank: distinct, and reproducible
    from `seed`. Called at the start of training, after the random state of a checkpoint is restored."""
    if rank:
        np.random.seed(rank_seed(int(np.random.randint(2**32, dtype=np.int64)), rank))


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
        mixup: Mixup | None = None,
        mixup_off_epoch: int | None = None,
        lr_base: float | None = None,
        lr_scale: str = "linear",
        channels_last: bool = False,
        compile: bool = False,
        grouping: ParameterGroups | None = None,
        grad_checkpointing: bool = False,
        normalize: nn.Module | None = None,
    ) -> None:
        """`mixup` (timm's, or None) mixes every training batch until epoch `mixup_off_epoch` (None: to the end);
        with it the training loss is soft-target cross-entropy. `lr_base` (None: the optimizer's lr as is) is the
        learning rate per 256 images, scaled (`lr_scale`: linear | sqrt) to the effective batch size.
        `channels_last` and `compile` (torch.compile, in place) are applied to the model at set-up. `grouping`
        makes the optimizer's parameter groups (weight decay, layer decay; None: one group), and
        `backbone_lr_factor` scales the backbone's part of each. `grad_checkpointing` turns on the model's own
        (timm's set_grad_checkpointing) here, so a model without it fails before anything trains. `normalize` turns the
        loader's uint8 batches into the network's input once they are on the device (pipeline.data.normalize; None:
        batches are used as they come)."""
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.mixup = mixup
        self.mixup_off_epoch = mixup_off_epoch
        # Mixed targets are distributions; Mixup applies the label smoothing itself (mixup.label_smoothing).
        self.train_criterion = SoftTargetCrossEntropy() if mixup is not None else self.criterion
        self.lr_base, self.lr_scale = lr_base, lr_scale
        self.channels_last, self.compile_model = channels_last, compile
        if grad_checkpointing:
            enable_grad_checkpointing(model)
        self.compiled = False  # setup runs for fit and again for test: compile once
        self.aux_weight = aux_weight
        self.backbone_lr_factor = backbone_lr_factor
        self.grouping = grouping or ParameterGroups()
        self.train_metrics, self.val_metrics, self.test_metrics = (
            EpochMetrics(num_classes, prefix=f"{split}/") for split in ("train", "val", "test")
        )
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def setup(self, stage: str) -> None:
        # After the callbacks' set-up: the EMA callback has copied the model by now (a compiled one would not copy).
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_model and not self.compiled:
            self.model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
            self.compiled = True

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """A batch as the loader gives it, on the training device → the network's input: uint8 → normalised float
        (channels-last when set), before Mixup. Done in the steps rather than in Lightning's on_after_batch_transfer:
        Lightning warns at every run when a LightningModule overrides that hook and a DataModule is given."""
        if self.normalize is not None:
            # In the network's dtype, as Lightning's precision plugin gives float batches (bf16-true, 64-true): it
            # converts floating-point batches only, and this one was uint8 until now.
            return self.normalize(images).to(self.dtype)
        if images.dtype == torch.uint8:
            raise TypeError(
                "ImageClassifier got a uint8 batch and no normalize: the loaders hand over uint8 images; build it with "
                "normalize=pipeline.data.normalize.Normalize(spec.mean, spec.std)"
            )
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def _step(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        metrics: EpochMetrics,
        criterion: nn.Module | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss against `targets` (default: the labels) with `criterion` (default: cross-entropy); metrics against
        the labels, so mixed training batches are still scored on what their images originally were."""
        images, labels = batch
        images = self.prepare(images)  # a batch already prepared (training_step's, mixed) passes unchanged
        criterion = criterion or self.criterion
        targets = labels if targets is None else targets
        output = self(images)
        if isinstance(output, tuple):
            # Auxiliary classifiers (GoogLeNet in training mode): their losses are added with a small weight
            # to push gradient into the lower layers (Szegedy et al. 2014 use 0.3); only the main logits count.
            logits, *aux = output
            loss = criterion(logits, targets) + self.aux_weight * sum(criterion(a, targets) for a in aux)
        else:
            logits = output
            loss = criterion(logits, targets)
        metrics.update(logits, labels, loss)
        return loss, logits

    def _log_epoch(self, metrics: EpochMetrics, prog_bar: bool = True) -> None:
        """Log the epoch's loss and metrics once, at its end. Logging the metric objects at every step, as
        Lightning allows, costs ~7 ms a step (its result collection moves every logged metric to the device on
        each call): a third of a LeNet-5 step on this CPU. torchmetrics has already reduced across processes."""
        # on_epoch explicitly: logged from on_train_batch_end, the default would be a step value. Equal on every
        # rank, so the mean that sync_dist takes is the same value.
        self.log_dict(metrics.compute(), on_step=False, on_epoch=True, prog_bar=prog_bar, sync_dist=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        images = self.prepare(images)
        targets = None
        if self.mixup is not None:
            off = self.mixup_off_epoch is not None and self.current_epoch >= self.mixup_off_epoch
            self.mixup.mixup_enabled = not off  # then it only smooths the one-hot targets, as in timm's train.py
            images, targets = self.mixup(images, labels)  # mixes the batch in place; the labels stay as they were
        loss, _ = self._step((images, labels), self.train_metrics, self.train_criterion, targets)
        self._nonfinite_steps += (~torch.isfinite(loss.detach())).int()
        return loss

    def on_train_start(self) -> None:
        # Here, not at each epoch's start: a run resumed mid-epoch skips on_train_epoch_start.
        self._nonfinite_steps = torch.zeros((), dtype=torch.int32, device=self.device)
        if self.mixup is not None:
            mix_as_rank(self.global_rank)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The epoch's training values are logged with its last batch, not in on_train_epoch_end: Lightning calls
        # that hook of callbacks (Ray Tune's report, the sweep's per-epoch report) before the module's.
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._stop_if_diverged()
            self._log_epoch(self.train_metrics)

    def _stop_if_diverged(self) -> None:
        # At the epoch's last batch: before its validation and its checkpoints, which would hold the NaN weights.
        # Counted on the device and read once an epoch: a per-step check would synchronise the GPU.
        bad = int(self._nonfinite_steps.item())
        self._nonfinite_steps.zero_()
        if bad:
            raise TrainingDiverged(
                f"train/loss was NaN or infinite in {bad} step(s) of epoch {self.current_epoch}: training "
                "diverged. "
                "Lower optim.lr, set trainer.gradient_clip_val, or check the input data for NaN/inf."
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        _, logits = self._step(batch, self.test_metrics)
        self.test_confusion.update(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, prog_bar=False)

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(WEIGHTS_KEY, "live")  # the EMA callback, called first, sets "ema"

    def parameter_groups(self) -> list[dict[str, Any]]:
        """timm's parameter groups (see pipeline.recipes); with a backbone_lr_factor other than 1, each split into its
        head and backbone parts, the backbone's at lr_scale × the factor (discriminative learning rates). Frozen
        parameters stay in their groups: without gradients the optimizer skips them until they are unfrozen."""
        groups = self.grouping(self.model)
        if self.backbone_lr_factor != 1:
            head = {id(p) for p in head_and_backbone(self.model)[0]}
            groups = [
                {
                    **group,
                    "params": params,
                    "lr_scale": group.get("lr_scale", 1.0) * (self.backbone_lr_factor if part == "backbone" else 1.0),
                    "name_parts": [part, *group["name_parts"]],
                }
                for group in groups
                for part, params in (
                    ("head", [p for p in group["params"] if id(p) in head]),
                    ("backbone", [p for p in group["params"] if id(p) not in head]),
                )
                if params
            ]
        return name_groups(groups)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_base is not None:
            batch = effective_batch_size(
                self.trainer.datamodule.batch_size, self.trainer.world_size, 1, self.trainer.accumulate_grad_batches
            )
            lr = scaled_lr(self.lr_base, batch, self.lr_scale)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if self.logger is not None:
                self.logger.log_hyperparams({"optim.lr_scaled": lr, "optim.effective_batch_size": batch})
            if self.trainer.is_global_zero:
                print(
                    f"learning rate {lr:.4g}: optim.lr_base {self.lr_base:g} scaled ({self.lr_scale}) to {batch} images"
                    " a step"
                )
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)  # before the scheduler takes each group's lr as its base
        max_epochs = self.trainer.max_epochs
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max_epochs)
        scheduler = self.scheduler_factory(optimizer, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""Fine-tuning strategies: when the backbone trains. One Lightning callback, set by conf/finetune/*.yaml.

The head is the model's classifier (timm's get_classifier()); the backbone is every other parameter.

  full          unfreeze_epoch 0: everything trains from the first step
  linear_probe  unfreeze_epoch null: only the head trains; the backbone stays frozen for the whole run
  gradual       the head alone first, the backbone joins at unfreeze_epoch

A frozen backbone has no gradients and its BatchNorm layers are in eval mode: they normalise with the running
statistics the weights came with and never update them, so its features are a fixed function of the image.
ImageClassifier gives the backbone its own optimizer parameter group at optim.lr × backbone_lr_factor from the
start, so the LR schedule shapes it like the head's and unfreezing only has to switch gradients on.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from pipeline.models.factory import classifier_names

# Every trainable BatchNorm of torch (timm's BatchNormAct2d, SyncBatchNormAct and SplitBatchNorm2d subclass these;
# torch.ao's quantized ones only run inference), named publicly rather than by their private base class.
# tests/test_internals.py checks that no subclass of that base is missed.
BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)

# Frozen BatchNorm layers are in eval mode on purpose; Lightning warns about any module in eval mode at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The model's modules that hold parameters or statistics of their own, outside its classifier."""
    heads = {module for name in classifier_names(model) for module in model.get_submodule(name).modules()}
    return [module for module in BaseFinetuning.flatten_modules(model) if module not in heads]


class BackboneFreeze(BaseFinetuning):
    """Freeze the backbone before training; make it trainable from epoch `unfreeze_epoch` (None: never).

    Logs `model/trainable_params` every epoch, so the MLflow dashboard shows what each epoch trained.
    """

    def __init__(self, unfreeze_epoch: int | None) -> None:
        super().__init__()
        self.unfreeze_epoch = unfreeze_epoch

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.unfreeze_epoch != 0:
            backbone = backbone_modules(pl_module.model)
            self.freeze(backbone, train_bn=False)
            for module in backbone:
                if isinstance(module, BATCH_NORMS):
                    module.eval()  # use, never update, the running statistics (Lightning keeps the mode)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # `>=`, not `==`: a run resumed after the unfreeze epoch must find its backbone trainable again.
        if self.unfreeze_epoch is not None and epoch >= self.unfreeze_epoch:
            backbone = backbone_modules(pl_module.model)
            if any(not p.requires_grad for module in backbone for p in module.parameters(recurse=False)):
                self.make_trainable(backbone)
                for module in backbone:
                    if isinstance(module, BATCH_NORMS):
                        module.train()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        pl_module.log("model/trainable_params", float(trainable), on_step=False, on_epoch=True)

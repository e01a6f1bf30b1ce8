"""Training-recipe glue from config: timm's Mixup/CutMix, the learning rate scaled with the batch size, and timm's
optimizer parameter groups.

Mixup and CutMix (`mixup:` in conf/train.yaml) are timm's `Mixup`: it mixes a training batch with its own reverse
and returns soft targets, which `SoftTargetCrossEntropy` scores. The LR rules (`optim.lr_base`, `optim.lr_scale`)
are Goyal et al. 2017 (linear) and Krizhevsky 2014 / Hoffer et al. 2017 (square root), per 256 images.

Parameter groups (`optim.filter_bias_and_bn`, `optim.layer_decay`) are timm's own helpers, as its train.py uses
them: biases and normalisation weights (every 1-d parameter, and what a timm model's `no_weight_decay()` names)
get no weight decay, and layer-wise decay gives each depth of `model.group_matcher()` the learning rate
lr × layer_decay^(depth below the head) (Clark et al. 2020, ELECTRA; BEiT). Groups are named by what sets their
learning rate, so `LearningRates` logs one curve per learning rate, not one per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer

from pipeline.config import OPTIM_KEYS_OF_OURS
from pipeline.internals import auto_group_layers

LR_REFERENCE_BATCH = 256  # optim.lr_base is the learning rate for this many images per optimizer step
LR_SCALES = ("linear", "sqrt")
NO_DECAY = "no_decay"  # the name part of a group without weight decay


def scaled_lr(lr_base: float, batch_size: int, rule: str = "linear") -> float:
    """The learning rate for `batch_size` images per step, given `lr_base` for 256: linear or square-root scaling."""
    if rule not in LR_SCALES:
        raise ValueError(f"lr_scale={rule!r} is not one of {list(LR_SCALES)}")
    ratio = batch_size / LR_REFERENCE_BATCH
    return lr_base * (ratio if rule == "linear" else math.sqrt(ratio))


def optimizer_factory(optim: DictConfig) -> Callable[[Iterable[nn.Parameter]], Optimizer]:
    """`conf/optim/*.yaml` as a partial optimizer, without the keys the training module reads itself."""
    arguments = {k: v for k, v in OmegaConf.to_container(optim, resolve=True).items() if k not in OPTIM_KEYS_OF_OURS}
    return instantiate(arguments)


@contextmanager
def every_parameter_trainable(model: nn.Module) -> Iterator[None]:
    """timm's helpers leave frozen parameters out of the groups; a frozen backbone (finetune=gradual) must be in its
    groups from the start, since unfreezing only turns its gradients on."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


@dataclass(frozen=True)
class ParameterGroups:
    """The optimizer's parameter groups for a model, from `optim.weight_decay`, `optim.filter_bias_and_bn` and
    `optim.layer_decay`. Each group may carry `lr_scale` (its learning rate is lr × lr_scale) and `name_parts`."""

    weight_decay: float = 0.0
    filter_bias_and_bn: bool = False
    layer_decay: float | None = None

    @classmethod
    def from_config(cls, optim: DictConfig) -> ParameterGroups:
        return cls(
            weight_decay=float(optim.get("weight_decay") or 0.0),
            filter_bias_and_bn=bool(optim.get("filter_bias_and_bn", False)),
            layer_decay=optim.get("layer_decay"),
        )

    def __call__(self, model: nn.Module) -> list[dict[str, Any]]:
        if not self.filter_bias_and_bn and self.layer_decay is None:
            return [{"params": list(model.parameters()), "name_parts": []}]
        # timm's create_optimizer adds what the model itself says must not decay (position embeddings, tokens, …).
        no_decay = getattr(model, "no_weight_decay", set)()
        with every_parameter_trainable(model):
            if self.layer_decay is None:
                groups = param_groups_weight_decay(
                    model,
                    weight_decay=self.weight_decay,
                    weight_decay_exclude_1d=self.filter_bias_and_bn,
                    no_weight_decay_list=no_decay,
                )
                layers: dict[str, int] = {}
            else:
                groups = param_groups_layer_decay(
                    model,
                    weight_decay=self.weight_decay,
                    weight_decay_exclude_1d=self.filter_bias_and_bn,
                    no_weight_decay_list=no_decay,
                    layer_decay=self.layer_decay,
                )
                layers = layer_ids(model)
        names = {id(p): name for name, p in model.named_parameters()}
        last = max(layers.values(), default=0)
        for group in groups:
            parts = [f"layer_{layers.get(names[id(group['params'][0])], last)}"] if layers else []
            no_weight_decay = self.weight_decay > 0 and group.get("weight_decay") == 0
            group["name_parts"] = [*parts, *([NO_DECAY] if no_weight_decay else [])]
        return groups


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth for layer-wise decay, found as timm's param_groups_layer_decay finds it (0: the stem;
    parameters it leaves out belong to the last layer, the head)."""
    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return auto_group_layers(model)


def name_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn each group's `name_parts` into `lr_name` (what sets its learning rate: head/backbone, layer) and a `name`
    unique in the optimizer (with `no_decay` where it lacks weight decay), as Lightning's monitors want them."""
    for group in groups:
        parts = group.pop("name_parts", [])
        lr_parts = [part for part in parts if part != NO_DECAY]
        group["lr_name"] = "/".join(lr_parts)
        if parts:
            group["name"] = "/".join(parts)
    return groups


class LearningRates(L.Callback):
    """Logs the learning rate at each epoch's start, once per learning rate: `lr-<Optimizer>` when every group has
    the same one, else `lr-<Optimizer>/<lr_name>` (head, backbone, layer_3, …). Groups that differ only in weight
    decay share a curve, so the default run (biases and norms without decay) still logs a single `lr-SGD`."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            prefix = f"lr-{type(optimizer).__name__}"
            rates = {group.get("lr_name", ""): group["lr"] for group in optimizer.param_groups}
            for lr_name, lr in rates.items():
                key = f"{prefix}/{lr_name}" if lr_name and len(rates) > 1 else prefix
                pl_module.log(key, float(lr), on_step=False, on_epoch=True)


def mixup_enabled(mixup: Mapping[str, Any] | None) -> bool:
    return bool(mixup) and (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0)


def build_mixup(mixup: Mapping[str, Any] | None, num_classes: int) -> Mixup | None:
    """timm's Mixup for the `mixup:` config block; None when both alphas are 0 (off)."""
    if not mixup_enabled(mixup):
        return None
    return Mixup(
        mixup_alpha=mixup["mixup_alpha"],
        cutmix_alpha=mixup["cutmix_alpha"],
        prob=mixup["prob"],
        switch_prob=mixup["switch_prob"],
        label_smoothing=mixup["label_smoothing"],
        num_classes=num_classes,
    )

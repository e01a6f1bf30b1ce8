"""Training-recipe glue from config: timm's Mixup/CutMix, and the learning rate scaled with the batch size.

Mixup and CutMix (`mixup:` in conf/train.yaml) are timm's `Mixup`: it mixes a training batch with its own reverse
and returns soft targets, which `SoftTargetCrossEntropy` scores. The LR rules (`optim.lr_base`, `optim.lr_scale`)
are Goyal et al. 2017 (linear) and Krizhevsky 2014 / Hoffer et al. 2017 (square root), per 256 images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from torch import nn
from torch.optim import Optimizer

LR_REFERENCE_BATCH = 256  # optim.lr_base is the learning rate for this many images per optimizer step
LR_SCALES = ("linear", "sqrt")
SCALING_KEYS = ("lr_base", "lr_scale")  # in conf/optim/*.yaml, but not arguments of the optimizer


def scaled_lr(lr_base: float, batch_size: int, rule: str = "linear") -> float:
    """The learning rate for `batch_size` images per step, given `lr_base` for 256: linear or square-root scaling."""
    if rule not in LR_SCALES:
        raise ValueError(f"lr_scale={rule!r} is not one of {list(LR_SCALES)}")
    ratio = batch_size / LR_REFERENCE_BATCH
    return lr_base * (ratio if rule == "linear" else math.sqrt(ratio))


def optimizer_factory(optim: DictConfig) -> Callable[[Iterable[nn.Parameter]], Optimizer]:
    """`conf/optim/*.yaml` as a partial optimizer, without the LR-scaling keys the optimizer does not take."""
    arguments = {k: v for k, v in OmegaConf.to_container(optim, resolve=True).items() if k not in SCALING_KEYS}
    return instantiate(arguments)


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

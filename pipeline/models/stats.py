"""What a model costs: parameter counts and FLOPs for one image, measured with torch's own counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass on one image of shape (C, H, W); a multiply-add counts as 2 FLOPs."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class LayerCost:
    name: str  # the module's path in the model, e.g. "layer1.0.conv1"
    kind: str  # its class
    output_shape: tuple[int, ...]
    params: int  # parameters of this module and its children
    flops: int  # FLOPs of this module and its children, one image


def layer_costs(model: nn.Module, input_shape: tuple[int, int, int], depth: int) -> list[LayerCost]:
    """One row per module down to `depth` levels, in execution order, from one forward pass on one image."""
    modules = {name: module for name, module in model.named_modules() if name and name.count(".") < depth}
    shapes: dict[str, tuple[int, ...]] = {}

    def remember(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple | list) else output
            if isinstance(tensor, torch.Tensor):
                shapes.setdefault(name, tuple(tensor.shape))

        return hook

    handles = [module.register_forward_hook(remember(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad(), FlopCounterMode(display=False, depth=depth + 1) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    # The counter names modules "<ModelClass>.<path>"; strip the class to get the path.
    flops = {key.partition(".")[2]: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    order = list(modules)  # parents before children, as the model declares them
    return [
        LayerCost(name, type(modules[name]).__name__, shapes[name],
                  sum(p.numel() for p in modules[name].parameters()), int(flops.get(name, 0)))
        for name in sorted(shapes, key=order.index)
    ]  # fmt: skip


@dataclass(frozen=True)
class FeatureLevel:
    index: int  # in timm's feature_info: what out_indices and forward_intermediates(indices=…) count
    module: str  # the module whose output the level is
    channels: int
    stride: int  # timm's "reduction": input pixels per feature-map pixel
    output_shape: tuple[int, ...]  # for one image of the input shape


def feature_pyramid(model: nn.Module, input_shape: tuple[int, int, int]) -> list[FeatureLevel]:
    """The model's feature levels (timm's feature_info) with the shape each has for one image of shape (C, H, W),
    from one forward_intermediates pass."""
    info = model.feature_info
    info = getattr(info, "info", info)  # a FeatureInfo, or timm's plain list of dicts
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            maps = model.forward_intermediates(torch.zeros(1, *input_shape, device=device), intermediates_only=True)
    finally:
        model.train(was_training)
    return [
        FeatureLevel(index, level["module"], level["num_chs"], level["reduction"], tuple(output.shape))
        for index, (level, output) in enumerate(zip(info, maps, strict=True))
    ]

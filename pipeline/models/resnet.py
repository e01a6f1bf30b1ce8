"""ResNet (He, Zhang, Ren, Sun 2015, "Deep residual learning for image recognition"), shaped like torchvision's.

A residual block learns F(x) and outputs ReLU(F(x) + x): the branch is conv → BN → ReLU → … → BN, it is added
to the shortcut, and only then activated (figure 2). The shortcut is the identity wherever shapes match and a
1×1 convolution + BN ("option B", section 3.3) only where a stage changes stride or width. `BasicBlock` is
the two-3×3 block of ResNet-18/34, `Bottleneck` the 1×1 → 3×3 → 1×1 block of ResNet-50/101/152 (figure 5),
with the stride on the 3×3 as in torchvision ("v1.5"; the paper strides the first 1×1).

Stage sizes are table 1's: `layer1` … `layer4` are the paper's conv2_x … conv5_x. Module names are those of
torchvision's resnet.py on purpose: torchvision's ImageNet state dicts load into the `classic_resnet*`
models unchanged. Registered as `classic_resnet*` so timm's own (different) `resnet*` stay reachable.

`stem="cifar"` replaces the 7×7/2 conv and 3×3/2 max-pool by one 3×3/1 conv, so 32×32 inputs reach the
stages at full resolution (section 4.2 of the paper does the same for its CIFAR-10 networks).

`drop_path_rate` adds stochastic depth (Huang et al. 2016, "Deep networks with stochastic depth"), not in the
paper: in training each block's residual branch is dropped for a whole image with a probability that grows
linearly from 0 at the first block to `drop_path_rate` at the last (timm's DropPath and schedule).

The rest of timm's model contract is timm's ResNet's: `feature_info` names the stem's activation (`relu`, timm's
`act1`) and `layer1` … `layer4` as the five feature levels, so `features_only=True`, `forward_intermediates` and
`prune_intermediate_layers` behave as for timm's `resnet50`; `group_matcher` gives the stem, the stages (coarse) or
blocks (fine) and the head; `set_grad_checkpointing` recomputes each block's activations in the backward pass.

No `from __future__ import annotations` in the model modules: torch.fx copies `forward`'s annotations into the
code of the graph it traces, and TorchScript cannot read them back as strings.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from pipeline.models.features import feature_take_indices

STEMS = ("imagenet", "cifar")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1; no bias, since a BN follows and has its own."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (figure 5, left); the output width is `planes`."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (strided) → 1×1 expand (figure 5, right); the output width is `planes * 4`."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(
    block: Block,
    in_planes: int,
    planes: int,
    blocks: int,
    stride: int = 1,
    drop_paths: Sequence[float] = (),
) -> nn.Sequential:
    """One conv*_x stage: the first block may change stride and width, the others keep both.

    A projection shortcut (1×1 conv + BN) is made only where the first block's output shape differs from its
    input's; every other shortcut is the identity, which adds no parameters (the paper's option B).
    `drop_paths` gives each block's stochastic-depth rate (none: 0).
    """
    out_planes = planes * block.expansion
    drop_paths = list(drop_paths) or [0.0] * blocks
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    layers = [block(in_planes, planes, stride, downsample, drop_path=drop_paths[0])]
    layers += [block(out_planes, planes, drop_path=drop_paths[i]) for i in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        global_pool: str = "avg",
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"resnet: stem={stem!r} is not one of {list(STEMS)}")
        if len(layers) != 4:
            raise ValueError(f"resnet: layers={list(layers)} must give the number of blocks of 4 stages")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        # conv1 (table 1): 7×7/2 + 3×3/2 max-pool quarter the resolution before conv2_x; the CIFAR stem keeps it.
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # Registered after the activation: timm's feature wrappers run a model's children in registration order.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        # Stochastic depth: the rate rises linearly over the blocks of the whole network (timm's schedule).
        total = sum(layers)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        starts = [sum(layers[:i]) for i in range(4)]
        per_stage = [rates[start : start + count] for start, count in zip(starts, layers, strict=True)]
        self.layer1 = make_stage(block, 64, 64, layers[0], drop_paths=per_stage[0])  # conv2_x
        self.layer2 = make_stage(block, 64 * block.expansion, 128, layers[1], 2, per_stage[1])  # conv3_x
        self.layer3 = make_stage(block, 128 * block.expansion, 256, layers[2], 2, per_stage[2])  # conv4_x
        self.layer4 = make_stage(block, 256 * block.expansion, 512, layers[3], 2, per_stage[3])  # conv5_x
        self.num_features = 512 * block.expansion
        # The feature levels, as timm's ResNet: the stem's activation, then each stage's output.
        stem_stride = 2 if stem == "imagenet" else 1
        stage_stride = stem_stride * (2 if stem == "imagenet" else 1)  # conv2_x runs after the max-pool
        self.feature_info = [{"num_chs": 64, "reduction": stem_stride, "module": "relu"}] + [
            {"num_chs": planes * block.expansion, "reduction": stage_stride * 2**index, "module": f"layer{index + 1}"}
            for index, planes in enumerate((64, 128, 256, 512))
        ]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        # He initialisation (He et al. 2015, "Delving deep into rectifiers"), as the paper uses.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each block then starts as the identity (Goyal et al. 2017), which helps large-batch training.
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    # The rest of timm's model interface, as timm's ResNet has it.
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups by depth (layer-wise LR decay): the stem, then each stage (coarse) or block; the head is
        what no pattern matches."""
        return {"stem": r"^conv1|^bn1|^maxpool", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them: less memory, more time."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for `num_classes` (0: none, forward_head returns the pooled features); `global_pool`
        (timm's pool types, "" for none) replaces the pooling, None keeps it."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        dd = get_device_dtype(self)  # the new head where the model is, in its dtype
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The final features and the feature maps at `indices` of `feature_info` (an int n: the last n; None:
        all). `stop_early` skips the stages after the last one asked for; `norm` does nothing (no final norm)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if stop_early:
            stages = stages[:max_index]
        for index, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the stages after the last feature at `indices` (and the head); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in ("layer1", "layer2", "layer3", "layer4")[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, not Identity, so checkpoint_seq can still iterate it
        if max_index == 0:
            self.maxpool = nn.Identity()
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:  # the features now end at the last kept level; a head sized for the final ones cannot stay
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# What timm records beside each model. No `url`/`hf_hub_id` and so no `license`: there are no published weights of
# these networks (timm's license field is the weights'); weights trained here load with model.weights.
PAPER = {"paper_name": "Deep Residual Learning for Image Recognition", "paper_ids": "arXiv:1512.03385"}


def _cfg(**kwargs: object) -> dict[str, object]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),  # the final feature map at input_size: 224 / 32
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "description": "ResNet v1.5 (stride on the 3×3), the 7×7/2 stem and 3×3/2 max-pool of table 1",
        "notes": ("No published weights: torchvision's ResNet state dicts load unchanged (same names and shapes).",),
        **PAPER,
        **kwargs,
    }


def _cifar_cfg(**kwargs: object) -> dict[str, object]:
    return _cfg(
        num_classes=10,
        input_size=(3, 32, 32),
        pool_size=(4, 4),  # 32 / 8: only conv3_x … conv5_x halve the size
        crop_pct=1.0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        description="ResNet v1.5 with a 3×3/1 stem and no max-pool, for 32×32 images (the paper's section 4.2 idea)",
        notes=("No published weights.",),
        **kwargs,
    )


# timm looks default_cfgs up when the decorated functions below are defined.
default_cfgs = generate_default_cfgs(
    {
        "classic_resnet18": _cfg(),
        "classic_resnet34": _cfg(),
        "classic_resnet50": _cfg(),
        "classic_resnet101": _cfg(),
        "classic_resnet152": _cfg(),
        "classic_resnet18_cifar": _cifar_cfg(),
        "classic_resnet34_cifar": _cifar_cfg(),
        "classic_resnet50_cifar": _cifar_cfg(),
    }
)


def _create_resnet(variant: str, pretrained: bool, **kwargs: object) -> ResNet:
    return build_model_with_cfg(ResNet, variant, pretrained, **kwargs)


@register_model
def classic_resnet18(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-18: BasicBlock × (2, 2, 2, 2), 11.7 M parameters at 1000 classes."""
    model_args = {"block": BasicBlock, "layers": (2, 2, 2, 2), "stem": "imagenet"}
    return _create_resnet("classic_resnet18", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet34(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-34: BasicBlock × (3, 4, 6, 3), 21.8 M parameters at 1000 classes."""
    model_args = {"block": BasicBlock, "layers": (3, 4, 6, 3), "stem": "imagenet"}
    return _create_resnet("classic_resnet34", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet50(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-50: Bottleneck × (3, 4, 6, 3), 25.6 M parameters at 1000 classes."""
    model_args = {"block": Bottleneck, "layers": (3, 4, 6, 3), "stem": "imagenet"}
    return _create_resnet("classic_resnet50", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet101(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-101: Bottleneck × (3, 4, 23, 3), 44.5 M parameters at 1000 classes."""
    model_args = {"block": Bottleneck, "layers": (3, 4, 23, 3), "stem": "imagenet"}
    return _create_resnet("classic_resnet101", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet152(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-152: Bottleneck × (3, 8, 36, 3), 60.2 M parameters at 1000 classes."""
    model_args = {"block": Bottleneck, "layers": (3, 8, 36, 3), "stem": "imagenet"}
    return _create_resnet("classic_resnet152", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet18_cifar(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-18 with the 3×3/1 stem for 32×32 images (the common CIFAR port, not the paper's ResNet-20/32/…)."""
    model_args = {"block": BasicBlock, "layers": (2, 2, 2, 2), "stem": "cifar"}
    return _create_resnet("classic_resnet18_cifar", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet34_cifar(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-34 with the 3×3/1 stem for 32×32 images."""
    model_args = {"block": BasicBlock, "layers": (3, 4, 6, 3), "stem": "cifar"}
    return _create_resnet("classic_resnet34_cifar", pretrained, **{**model_args, **kwargs})


@register_model
def classic_resnet50_cifar(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-50 with the 3×3/1 stem for 32×32 images."""
    model_args = {"block": Bottleneck, "layers": (3, 4, 6, 3), "stem": "cifar"}
    return _create_resnet("classic_resnet50_cifar", pretrained, **{**model_args, **kwargs})

"""GoogLeNet / Inception v1 (Szegedy et al. 2014, "Going deeper with convolutions"), shaped like torchvision's.

An Inception module (figure 2b) runs four branches on the same input and concatenates them on channels:
a 1×1 convolution; a 1×1 reduction then a 3×3; a 1×1 reduction then a 5×5; a 3×3 max-pool then a 1×1
projection. The widths of every module are table 1's. As in torchvision, each convolution is followed by
BN (Ioffe & Szegedy 2015; the paper predates it and used local response normalisation in the stem instead).

Options, each an experiment the paper discusses:
- `five_by_five`: the paper's 5×5 convolution (default). False uses a 3×3 there, as torchvision does (a known
  slip in its port); with False and `aux_logits=False` the parameter count equals torchvision's googlenet.
- `reduce`: False gives the "naive" module of figure 2a, with no 1×1 reductions before the 3×3/5×5 and no pool
  projection. The pooled input then passes through whole, so every module's output is wider than its input,
  the widths add up stage after stage, and the cost explodes: the paper's argument for the reductions.
- `aux_logits`: the two auxiliary classifiers after 4a and 4d (section 5). In training mode `forward` then
  returns `GoogLeNetOutputs(logits, aux1, aux2)`, a tuple whose auxiliary losses the training module adds with
  weight 0.3; in eval mode, or without aux heads, it returns the logits tensor alone.
- `stem="cifar"`: one 3×3/1 conv to 192 channels replaces conv1…maxpool2, so 32×32 images enter inception 3a
  at full size (32 → 16 → 8 through maxpool3 and maxpool4), as common CIFAR ports of GoogLeNet do.

Module names are torchvision's, so its state dicts load into `googlenet(five_by_five=False)` unchanged.

timm's model contract: the feature levels (`feature_info`) are the stem's two convolutions (conv1 at stride 2,
conv3 at stride 4; the CIFAR stem has only conv1) and the last module of each Inception group, 3b, 4e and 5b (the
outputs at strides 8, 16 and 32 that maxpool3 and maxpool4 then halve), as timm's inception_v3 takes its stem and
Mixed_5d/6e/7c. The auxiliary heads are not features: `forward_intermediates` and the feature wrappers skip them,
and pruning removes them with the head. `set_grad_checkpointing` recomputes each Inception module's branches in
the backward pass. (No `from __future__ import annotations` here: see pipeline/models/resnet.py.)
"""

from typing import NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn

from pipeline.models.features import feature_take_indices

STEMS = ("imagenet", "cifar")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class GoogLeNetOutputs(NamedTuple):
    """What a training-mode forward returns with auxiliary classifiers: the main logits first."""

    logits: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


class BasicConv2d(nn.Module):
    """conv (no bias: the BN has one) → BN → ReLU, torchvision's building block."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Figure 2: four parallel branches, concatenated; `out_channels` is the concatenated width.

    Arguments are table 1's columns: #1×1, #3×3 reduce, #3×3, #5×5 reduce, #5×5, pool proj. Without `reduce`
    the reduce and pool-proj columns are ignored and the pool branch keeps all `in_channels`.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        five_by_five: bool = True,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        k5 = 5 if five_by_five else 3
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True)
        if reduce:
            self.branch2 = nn.Sequential(
                BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
            )
            self.branch3 = nn.Sequential(
                BasicConv2d(in_channels, ch5x5red, kernel_size=1), BasicConv2d(ch5x5red, ch5x5, k5, padding=k5 // 2)
            )
            self.branch4 = nn.Sequential(pool, BasicConv2d(in_channels, pool_proj, kernel_size=1))
            pool_channels = pool_proj
        else:
            self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3, kernel_size=3, padding=1))
            self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5, k5, padding=k5 // 2))
            self.branch4 = nn.Sequential(pool)
            pool_channels = in_channels
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_channels
        self.grad_checkpointing = False  # set by GoogLeNet.set_grad_checkpointing

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(self._forward, x)  # keeps only x; the branches run again in the backward pass
        return self._forward(x)


class InceptionAux(nn.Module):
    """Section 5's side classifier: average-pool to 4×4, 1×1 conv to 128, FC 1024 + ReLU, dropout 0.7, linear.

    The paper pools 5×5/3 (14×14 → 4×4); an adaptive pool gives 4×4 for any input size, as in torchvision.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


# The feature layers in forward order (the auxiliary heads are side branches, not on this path).
LAYERS = (
    "conv1",
    "maxpool1",
    "conv2",
    "conv3",
    "maxpool2",
    "inception3a",
    "inception3b",
    "maxpool3",
    "inception4a",
    "inception4b",
    "inception4c",
    "inception4d",
    "inception4e",
    "maxpool4",
    "inception5a",
    "inception5b",
)
INCEPTIONS = tuple(name.removeprefix("inception") for name in LAYERS if name.startswith("inception"))


class GoogLeNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        aux_logits: bool = False,
        five_by_five: bool = True,
        reduce: bool = True,
        global_pool: str = "avg",
        drop_rate: float = 0.4,
        aux_drop_rate: float = 0.7,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"googlenet: stem={stem!r} is not one of {list(STEMS)}")
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1: nn.Module
        self.maxpool1: nn.Module
        self.conv2: nn.Module
        self.conv3: nn.Module
        self.maxpool2: nn.Module
        if stem == "imagenet":  # table 1: 224 → 112 → 56 → 28 before inception 3a
            self.conv1 = BasicConv2d(in_chans, 64, kernel_size=7, stride=2, padding=3)
            self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            self.conv2 = BasicConv2d(64, 64, kernel_size=1)
            self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
            self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            stem_features = [{"num_chs": 64, "reduction": 2, "module": "conv1"}]
            stem_features.append({"num_chs": 192, "reduction": 4, "module": "conv3"})
            stride = 8  # at inception 3a
        else:  # the other stem layers become identities, so the names of the later ones stay torchvision's
            self.conv1 = BasicConv2d(in_chans, 192, kernel_size=3, padding=1)
            # One Identity each: timm's feature wrappers need every child to be a module of its own.
            self.maxpool1, self.conv2, self.conv3, self.maxpool2 = (nn.Identity() for _ in range(4))
            stem_features = [{"num_chs": 192, "reduction": 1, "module": "conv1"}]
            stride = 1

        def inception(in_channels: int, *widths: int) -> Inception:
            return Inception(in_channels, *widths, five_by_five=five_by_five, reduce=reduce)

        self.inception3a = inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception(self.inception3a.out_channels, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inception(self.inception3b.out_channels, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception(self.inception4a.out_channels, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception(self.inception4b.out_channels, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception(self.inception4c.out_channels, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception(self.inception4d.out_channels, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inception(self.inception4e.out_channels, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception(self.inception5a.out_channels, 384, 192, 384, 48, 128, 128)
        self.num_features = self.inception5b.out_channels
        # Each Inception group's output, before the max-pool that starts the next group.
        groups = ("inception3b", "inception4e", "inception5b")
        self.feature_info = stem_features + [
            {"num_chs": self.get_submodule(name).out_channels, "reduction": stride * 2**index, "module": name}
            for index, name in enumerate(groups)
        ]
        self.feature_ends = [LAYERS.index(info["module"]) for info in self.feature_info]

        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        if aux_logits:
            self.aux1 = InceptionAux(self.inception4a.out_channels, num_classes, dropout=aux_drop_rate)
            self.aux2 = InceptionAux(self.inception4d.out_channels, num_classes, dropout=aux_drop_rate)

        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.dropout = nn.Dropout(drop_rate)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        # torchvision's initialisation (truncated normal, std 0.01), so runs compare with its googlenet.
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.01, a=-2, b=2)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # timm's model interface, so transfer-learning code treats GoogLeNet like any timm backbone.
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups by depth (layer-wise LR decay): the stem, then each Inception group (coarse) or module;
        the head (the classifier and the auxiliary classifiers) is what no pattern matches."""
        if coarse:
            return {"stem": r"^conv\d\.", "blocks": r"^inception(\d)"}
        return {
            "stem": r"^conv\d\.",
            "blocks": [(rf"^inception{name}\.", (index,)) for index, name in enumerate(INCEPTIONS)],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Inception module's branches in the backward pass instead of keeping their activations."""
        self.grad_checkpointing = enable
        for module in self.modules():
            if isinstance(module, Inception):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new main classifier, and new last layers for the auxiliary heads so they predict the same classes;
        `global_pool` (timm's pool types, "" for none) replaces the pooling, None keeps it."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        dd = get_device_dtype(self)  # the new head where the model is, in its dtype
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(1024, num_classes, **dd) if num_classes > 0 else nn.Identity()
                aux.fc2.train(self.training)

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
        all). The auxiliary heads are not run. `stop_early` skips the layers after the last feature asked for;
        `norm` does nothing (no final norm)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        take_ends = [self.feature_ends[i] for i in take_indices]
        layers = LAYERS[: self.feature_ends[max_index] + 1] if stop_early else LAYERS
        for index, name in enumerate(layers):
            x = getattr(self, name)(x)
            if index in take_ends:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the layers after the last feature at `indices` (and the head, with the auxiliary heads); returns
        the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in LAYERS[self.feature_ends[max_index] + 1 :]:
            setattr(self, name, nn.Identity())
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:  # the features now end at the last kept level; a head sized for the final ones cannot stay
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.aux1 = self.aux2 = None
            self.aux_logits = False
            self.reset_classifier(0, "")
        return take_indices

    def _forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The features, plus the auxiliary logits where they are wanted (training mode, `aux_logits`)."""
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)
        return x, aux1, aux2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_features(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        """Logits; in training mode with `aux_logits`, `GoogLeNetOutputs(logits, aux1, aux2)`."""
        x, aux1, aux2 = self._forward_features(x)
        logits = self.forward_head(x)
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits


# What timm records beside each model. No `url`/`hf_hub_id` and so no `license`: there are no published weights of
# these networks (timm's license field is the weights'); weights trained here load with model.weights.
PAPER = {"paper_name": "Going Deeper with Convolutions", "paper_ids": "arXiv:1409.4842"}


def _cfg(**kwargs: object) -> dict[str, object]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),  # the final feature map at input_size: 224 / 32
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1.conv",
        "classifier": "fc",
        "description": "GoogLeNet (Inception v1) of table 1, with BN after every convolution",
        "notes": ("No published weights: torchvision's googlenet state dicts load into five_by_five=False unchanged.",),
        **PAPER,
        **kwargs,
    }


# timm looks default_cfgs up when the decorated functions below are defined.
default_cfgs = generate_default_cfgs(
    {
        "googlenet": _cfg(),
        "googlenet_cifar": _cfg(
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(8, 8),  # 32 / 4: only maxpool3 and maxpool4 halve the size
            crop_pct=1.0,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            description="GoogLeNet with a 3×3/1 stem to 192 channels for 32×32 images",
            notes=("No published weights.",),
        ),
    }
)


@register_model
def googlenet(pretrained: bool = False, **kwargs: object) -> GoogLeNet:
    """GoogLeNet for 224×224 images (table 1); 5×5 convolutions, no auxiliary heads unless asked."""
    return build_model_with_cfg(GoogLeNet, "googlenet", pretrained, **{"stem": "imagenet", **kwargs})


@register_model
def googlenet_cifar(pretrained: bool = False, **kwargs: object) -> GoogLeNet:
    """GoogLeNet with a 3×3/1 stem for 32×32 images (inception 3a at 32×32, 5b at 8×8)."""
    # Four feature levels, not timm's default five: this stem has one convolution.
    return build_model_with_cfg(
        GoogLeNet,
        "googlenet_cifar",
        pretrained,
        feature_cfg={"out_indices": (0, 1, 2, 3)},
        **{"stem": "cifar", **kwargs},
    )

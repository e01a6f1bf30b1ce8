"""Network in Network (Lin, Chen, Yan 2013), the paper's CIFAR-10 architecture.

An mlpconv layer (section 3.1) slides a small multilayer perceptron over the image: a k×k convolution followed
by two 1×1 convolutions ("cascaded cross channel parametric pooling"), each followed by a ReLU. Three mlpconv
layers are stacked with pooling and dropout between them, and the last one emits one feature map per class;
global average pooling of those maps gives the logits (section 3.2), so the network has no fully connected
layer at all. Sizes and pooling follow the authors' released CIFAR-10 model: 192-160-96 (5×5), 3×3/2 max-pool,
dropout; 192-192-192 (5×5), 3×3/2 average pool, dropout; 192-192-classes (3×3), global average pool.

As the paper does, the last mlpconv also ends in a ReLU, so the logits are non-negative. `batch_norm=True`
adds a BN after every convolution (a modern option, not in the paper) except the one that emits the class maps:
a BN there would only rescale each class's logit, and its class-count-sized statistics would stop weights
from loading into a model with another number of classes.

For the timm interface the "classifier" is that last mlpconv (`head`): `forward_features` stops before it,
`forward_head(pre_logits=True)` returns the globally pooled 192 features it would read, and
`reset_classifier(k)` builds a new last mlpconv with k output maps.

The feature levels (`feature_info`) are the outputs of the two mlpconv blocks before the head (strides 1 and 2,
ahead of the pooling that follows each) and, last, what `forward_features` returns (stride 4), as timm's VGG takes
each conv stage before its max-pool and then the final pooled map. `group_matcher` gives the first mlpconv as the
stem, the second as the one block, the class-map mlpconv as the head. (No `from __future__ import annotations`
here: see pipeline/models/resnet.py.)
"""

import torch
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from pipeline.models.features import SequentialFeatures

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class MlpConv(nn.Module):
    """k×k convolution, then two 1×1 convolutions (a two-layer MLP shared across positions), each with a ReLU.

    The 1×1 layers keep the names of the authors' Caffe model, cccp ("cascaded cross channel parametric
    pooling"). With `batch_norm`, a BN follows each convolution except, where `norm_last=False`, the last one.
    """

    def __init__(
        self,
        in_chans: int,
        channels: tuple[int, int, int],
        kernel_size: int,
        batch_norm: bool = False,
        norm_last: bool = True,
    ) -> None:
        super().__init__()
        c0, c1, c2 = channels
        norm_cccp2 = batch_norm and norm_last
        self.conv = nn.Conv2d(in_chans, c0, kernel_size=kernel_size, padding=kernel_size // 2, bias=not batch_norm)
        self.bn: nn.Module = nn.BatchNorm2d(c0) if batch_norm else nn.Identity()
        self.cccp1 = nn.Conv2d(c0, c1, kernel_size=1, bias=not batch_norm)
        self.bn1: nn.Module = nn.BatchNorm2d(c1) if batch_norm else nn.Identity()
        self.cccp2 = nn.Conv2d(c1, c2, kernel_size=1, bias=not norm_cccp2)
        self.bn2: nn.Module = nn.BatchNorm2d(c2) if norm_cccp2 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu(self.bn1(self.cccp1(x)))
        return self.relu(self.bn2(self.cccp2(x)))


class NiN(SequentialFeatures):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.5,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.batch_norm = batch_norm
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = 192
        # Pooling rounds up like the authors' Caffe model: 32×32 → 16×16 → 8×8.
        self.features = nn.Sequential(
            MlpConv(in_chans, (192, 160, 96), kernel_size=5, batch_norm=batch_norm),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.Dropout(dropout),
            MlpConv(96, (192, 192, 192), kernel_size=5, batch_norm=batch_norm),
            nn.AvgPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.Dropout(dropout),
        )
        self.feature_info = [
            {"num_chs": 96, "reduction": 1, "module": "features.0"},
            {"num_chs": 192, "reduction": 2, "module": "features.3"},
            {"num_chs": self.num_features, "reduction": 4, "module": "features.5"},
        ]
        self.feature_ends = [int(info["module"].split(".")[1]) for info in self.feature_info]
        self.head = self._make_head(num_classes)
        self.global_pool = self._make_pool(global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        # He initialisation: without BN, PyTorch's default init shrinks the signal through nine ReLU layers.
        # (The paper's hand-tuned Gaussian standard deviations were chosen for its Caffe setup.)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _make_head(self, num_classes: int) -> nn.Module:
        """The last mlpconv: one output map per class; with no classes, the features pass through."""
        if num_classes <= 0:
            return nn.Identity()
        return MlpConv(
            self.num_features, (192, 192, num_classes), kernel_size=3, batch_norm=self.batch_norm, norm_last=False
        )

    @staticmethod
    def _make_pool(global_pool: str) -> SelectAdaptivePool2d:
        """timm's global pooling of the class maps; one value per map, since each pooled map is a logit."""
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))  # no pooling: the maps stay
        if pool.feat_mult() != 1:
            raise ValueError(
                f"nin: global_pool={global_pool!r} gives {pool.feat_mult()} values per class map, but NiN's logits are "
                "its pooled class maps: use avg, max, avgmax, or '' (none)"
            )
        return pool

    # timm's model interface, so transfer-learning code treats NiN like any timm backbone.
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups by depth (layer-wise LR decay): the first mlpconv, the second; the head is the rest."""
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)\."}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new last mlpconv with `num_classes` maps (0: none, forward_head pools the features); `global_pool`
        (timm's pool types, "" for none) replaces the pooling, None keeps it."""
        self.num_classes = num_classes
        self.head = self._make_head(num_classes).to(**get_device_dtype(self))  # where the model is, in its dtype
        self.head.train(self.training)
        if global_pool is not None:
            self.global_pool = self._make_pool(global_pool)
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the layers after the last feature at `indices` (and the head); returns the absolute indices kept."""
        take_indices, max_index = self.prune_features(indices)
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:  # the features now end at the last kept level; a head sized for the final ones cannot stay
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return self.global_pool(x)
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.global_pool(self.head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict[str, object]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),  # the final feature map at input_size: 32 / 4
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "features.0.conv",
        # The whole last mlpconv is the classifier: timm drops all of it when loading weights for other classes.
        "classifier": ("head.conv", "head.cccp1", "head.cccp2"),
        "description": "Network in Network, the authors' CIFAR-10 model: three mlpconv blocks, global average pooling",
        # No `url`/`hf_hub_id` and so no `license`: there are no published weights (timm's license is the weights').
        "notes": ("No published weights.",),
        "paper_name": "Network In Network",
        "paper_ids": "arXiv:1312.4400",
        **kwargs,
    }


# timm looks default_cfgs up when the decorated functions below are defined.
default_cfgs = generate_default_cfgs({"nin": _cfg()})


@register_model
def nin(pretrained: bool = False, **kwargs: object) -> NiN:
    """Network in Network for 32×32 images; `batch_norm` (default off, as the paper), `dropout` (0.5, the paper)."""
    # Three feature levels, and the features Sequential opened up so timm's wrappers can stop inside it.
    feature_cfg = {"out_indices": (0, 1, 2), "flatten_sequential": True}
    return build_model_with_cfg(NiN, "nin", pretrained, feature_cfg=feature_cfg, **kwargs)

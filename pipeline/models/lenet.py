"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998, "Gradient-based learning applied to document recognition").

Layer names follow the paper's figure 2: C1 → S2 → C3 → S4 → C5 → F6 → output, for 32×32 inputs.
Two simplifications are the usual modern ones: S2/S4 are plain pooling (the paper's subsampling layers
had a trainable coefficient and bias), and the output is a linear layer (the paper used Euclidean RBF
units). C5 is a 5×5 convolution over 5×5 maps, i.e. fully connected to S4; it is written as a Linear.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
POOLS: dict[str, type[nn.Module]] = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class LeNet5(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        act: str = "tanh",
        pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"lenet5: act={act!r} is not one of {sorted(ACTIVATIONS)}")
        if pool not in POOLS:
            raise ValueError(f"lenet5: pool={pool!r} is not one of {sorted(POOLS)}")
        activation, pooling = ACTIVATIONS[act], POOLS[pool]
        self.num_classes = num_classes
        self.num_features = 84
        self.drop_rate = drop_rate
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5),  # C1: 32×32 → 6@28×28
            activation(),
            pooling(kernel_size=2),  # S2: → 6@14×14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: → 16@10×10
            activation(),
            pooling(kernel_size=2),  # S4: → 16@5×5
        )
        self.pre_logits = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),  # C5
            activation(),
            nn.Linear(120, self.num_features),  # F6
            activation(),
        )
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # The timm model interface, so transfer-learning code treats LeNet-5 like any timm backbone.
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict[str, object]:
    return {
        "num_classes": 10,
        "input_size": (1, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5,),
        "std": (0.5,),
        "first_conv": "features.0",
        "classifier": "head",
        **kwargs,
    }


# timm looks default_cfgs up when the decorated functions below are defined.
default_cfgs = generate_default_cfgs({"lenet5": _cfg()})


@register_model
def lenet5(pretrained: bool = False, **kwargs: object) -> LeNet5:
    """LeNet-5 for 32×32 inputs; `act=tanh|relu`, `pool=avg|max` (the paper: tanh and average pooling)."""
    return build_model_with_cfg(LeNet5, "lenet5", pretrained, **kwargs)

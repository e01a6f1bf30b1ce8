"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998, "Gradient-based learning applied to document recognition").

Layer names follow the paper's figure 2: C1 → S2 → C3 → S4 → C5 → F6 → output, for 32×32 inputs.
Two simplifications are the usual modern ones: S2/S4 are plain pooling (the paper's subsampling layers
had a trainable coefficient and bias), and the output is a linear layer (the paper used Euclidean RBF
units). C5 is a 5×5 convolution over 5×5 maps, i.e. fully connected to S4; it is written as a Linear.

timm's model contract, as timm's VGG has it: `forward_features` ends with S4's 16 maps (`num_features`), C5 and F6
are the head's pre-logits (`head_hidden_size` 84); the feature levels (`feature_info`) are the convolutions C1 and
C3 after their activation, ahead of the pooling that follows each, and last S4. `group_matcher` orders C1 (the
stem), C3, C5, F6, and the output layer (the head). (No `from __future__ import annotations` here: see
pipeline/models/resnet.py.)
"""

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from pipeline.models.features import SequentialFeatures

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
POOLS: dict[str, type[nn.Module]] = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class LeNet5(SequentialFeatures):
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
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5),  # C1: 32×32 → 6@28×28
            activation(),
            pooling(kernel_size=2),  # S2: → 6@14×14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: → 16@10×10
            activation(),
            pooling(kernel_size=2),  # S4: → 16@5×5
        )
        self.num_features = 16
        self.feature_info = [
            {"num_chs": 6, "reduction": 1, "module": "features.1"},  # C1
            {"num_chs": 16, "reduction": 2, "module": "features.4"},  # C3
            {"num_chs": 16, "reduction": 4, "module": "features.5"},  # S4
        ]
        self.feature_ends = [int(info["module"].split(".")[1]) for info in self.feature_info]
        self.head_hidden_size = 84
        self.pre_logits = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),  # C5
            activation(),
            nn.Linear(120, self.head_hidden_size),  # F6
            activation(),
        )
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    # timm's model interface, so transfer-learning code treats LeNet-5 like any timm backbone.
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups by depth (layer-wise LR decay): C1, then C3, C5 and F6; the head is the output layer."""
        layers = [(r"^features\.3\.", (0,)), (r"^pre_logits\.1\.", (1,)), (r"^pre_logits\.3\.", (2,))]
        return {"stem": r"^features\.0\.", "blocks": layers}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new output layer for `num_classes` (0: none, forward_head returns F6). LeNet-5 has no global pooling
        (C5 reads all of S4's 5×5 maps), so `global_pool` can only be None or "" (none)."""
        if global_pool:
            raise ValueError(f"lenet5: global_pool={global_pool!r}: LeNet-5 has no global pooling (C5 reads S4 whole)")
        self.num_classes = num_classes
        parameter = next(self.parameters())  # the new layer where the model is, in its dtype
        self.head = (
            nn.Linear(self.head_hidden_size, num_classes, device=parameter.device, dtype=parameter.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the layers after the last feature at `indices`, and the head with C5 and F6 (which read S4 only):
        forward_head then returns the feature maps. Returns the absolute indices kept."""
        take_indices, max_index = self.prune_features(indices)
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.feature_info[max_index]["num_chs"]
        self.pre_logits = nn.Identity()
        self.head = nn.Identity()
        self.num_classes = 0
        self.head_hidden_size = self.num_features
        return take_indices

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
        "pool_size": (5, 5),  # S4's maps at input_size
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5,),
        "std": (0.5,),
        "first_conv": "features.0",
        "classifier": "head",
        # Only 32×32 fits (C5 is fully connected to S4's 5×5 maps); not timm's `fixed_input_size`, which is for models
        # that take an `img_size` argument.
        "description": "LeNet-5 of figure 2 for 32×32 images, with plain pooling for S2/S4 and a linear output layer",
        # No `url`/`hf_hub_id` and so no `license`: there are no published weights (timm's license is the weights').
        "notes": ("No published weights.",),
        "paper_name": "Gradient-Based Learning Applied to Document Recognition",
        "paper_ids": "doi:10.1109/5.726791",
        **kwargs,
    }


# timm looks default_cfgs up when the decorated functions below are defined.
default_cfgs = generate_default_cfgs({"lenet5": _cfg()})


@register_model
def lenet5(pretrained: bool = False, **kwargs: object) -> LeNet5:
    """LeNet-5 for 32×32 inputs; `act=tanh|relu`, `pool=avg|max` (the paper: tanh and average pooling)."""
    # Three feature levels, and the features Sequential opened up so timm's wrappers can stop inside it.
    feature_cfg = {"out_indices": (0, 1, 2), "flatten_sequential": True}
    return build_model_with_cfg(LeNet5, "lenet5", pretrained, feature_cfg=feature_cfg, **kwargs)

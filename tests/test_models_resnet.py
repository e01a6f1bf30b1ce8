"""Our ResNets are torchvision's (parameters, shapes, weights), with shortcuts and options where the paper has them.

Size-only checks build the models on the meta device: shapes and counts without computing anything.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.resnet import BasicBlock, Bottleneck, ResNet

DEPTHS = (18, 34, 50, 101, 152)
STAGES = ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc")


def output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The output shape of each of the named top-level layers, for one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in STAGES:
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.update({name: out.shape}))
    model(x)
    return shapes


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_count_equals_torchvision(depth: int) -> None:
    with torch.device("meta"):
        ours = timm.create_model(f"classic_resnet{depth}", num_classes=1000)
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("depth", (18, 34, 50))
def test_every_stage_output_shape_equals_torchvision_at_224(depth: int) -> None:
    with torch.device("meta"):
        ours = timm.create_model(f"classic_resnet{depth}", num_classes=1000)
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        x = torch.empty(2, 3, 224, 224)
        assert output_shapes(ours, x) == output_shapes(theirs, x)


@pytest.mark.slow
@pytest.mark.parametrize("depth", (18, 50))
def test_torchvision_weights_load_unchanged_and_give_the_same_logits(depth: int) -> None:
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    ours = timm.create_model(f"classic_resnet{depth}", num_classes=1000).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every name and shape matches
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def shortcut_kinds(model: ResNet) -> dict[str, str]:
    """`layerN.i` → "projection" (1×1 conv + BN) or "identity" for every residual block."""
    return {
        f"{stage}.{i}": "identity" if block.downsample is None else "projection"
        for stage in ("layer1", "layer2", "layer3", "layer4")
        for i, block in enumerate(getattr(model, stage))
    }


@pytest.mark.parametrize(
    ("name", "projections"),
    [
        # BasicBlock keeps the width in conv2_x: projections only where conv3_x…conv5_x halve the size.
        ("classic_resnet18", ["layer2.0", "layer3.0", "layer4.0"]),
        ("classic_resnet34", ["layer2.0", "layer3.0", "layer4.0"]),
        ("classic_resnet18_cifar", ["layer2.0", "layer3.0", "layer4.0"]),
        # Bottleneck widens 64 → 256 in conv2_x's first block too.
        ("classic_resnet50", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
        ("classic_resnet101", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
        ("classic_resnet152", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
        ("classic_resnet50_cifar", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
    ],
)
def test_projection_shortcuts_only_where_stride_or_width_changes(name: str, projections: list[str]) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    kinds = shortcut_kinds(model)
    assert [block for block, kind in kinds.items() if kind == "projection"] == projections
    assert (
        len(kinds) - len(projections)
        == {
            "classic_resnet18": 5,
            "classic_resnet18_cifar": 5,
            "classic_resnet34": 13,
            "classic_resnet50": 12,
            "classic_resnet50_cifar": 12,
            "classic_resnet101": 29,
            "classic_resnet152": 46,
        }[name]
    ), "every other block keeps the identity"
    for block_name in projections:
        conv, bn = model.get_submodule(block_name).downsample
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and isinstance(bn, nn.BatchNorm2d)
        assert conv.stride == ((1, 1) if block_name == "layer1.0" else (2, 2))


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_branch_is_added_to_the_shortcut_before_the_final_relu(block: type[BasicBlock] | type[Bottleneck]) -> None:
    width = 8 * block.expansion
    unit = block(width, 8).eval()
    last_bn = unit.bn3 if isinstance(unit, Bottleneck) else unit.bn2
    nn.init.zeros_(last_bn.weight)  # the branch now outputs exactly zero
    x = torch.randn(2, width, 4, 4)
    with torch.no_grad():
        # ReLU(F(x) + x) = ReLU(x); a ReLU before the addition would have passed x's negative values through.
        torch.testing.assert_close(unit(x), torch.relu(x))


def test_zero_init_residual_zeroes_the_last_bn_of_every_branch() -> None:
    for name, block, last in (
        ("classic_resnet18_cifar", BasicBlock, "bn2"),
        ("classic_resnet50_cifar", Bottleneck, "bn3"),
    ):
        blocks = [m for m in timm.create_model(name, zero_init_residual=True).modules() if isinstance(m, block)]
        assert blocks and all(torch.all(getattr(b, last).weight == 0) for b in blocks)
        assert all(torch.all(b.bn1.weight == 1) for b in blocks), "the other BNs keep weight 1"
        default = [m for m in timm.create_model(name).modules() if isinstance(m, block)]
        assert all(torch.all(getattr(b, last).weight == 1) for b in default), "off by default, as torchvision"


@pytest.mark.parametrize(
    ("name", "in_chans", "size", "num_classes", "final_map"),
    [
        ("classic_resnet18_cifar", 3, 32, 10, 4),  # 3×3/1 stem: stages at 32, 16, 8, 4
        ("classic_resnet18_cifar", 1, 28, 5, 4),
        ("classic_resnet50_cifar", 3, 16, 100, 2),
        ("classic_resnet18", 1, 64, 7, 2),  # 7×7/2 stem + max-pool: 64 → 16 → … → 2
        ("classic_resnet18", 3, 96, 2, 3),
    ],
)
def test_output_shapes(name: str, in_chans: int, size: int, num_classes: int, final_map: int) -> None:
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, final_map, final_map)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        assert model.forward_head(features).shape == (2, num_classes)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), [("classic_resnet18", 64), ("classic_resnet50_cifar", 16)])
def test_gradient_reaches_every_parameter(name: str, size: int) -> None:
    model = timm.create_model(name, num_classes=3, drop_rate=0.2).train()
    model(torch.randn(2, 3, size, size)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_reset_classifier_and_bad_stem() -> None:
    with torch.device("meta"):
        model = timm.create_model("classic_resnet50", num_classes=10)
        model.reset_classifier(4)
        assert model.get_classifier().out_features == 4 and model.fc.in_features == 2048
    with pytest.raises(ValueError, match="stem='tiny'"):
        timm.create_model("classic_resnet18", stem="tiny")

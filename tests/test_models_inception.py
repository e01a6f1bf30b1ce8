"""GoogLeNet matches torchvision where it should, its options do what the paper describes, aux heads train only.

Size-only checks build the models on the meta device: shapes, counts and FLOPs without computing anything.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.inception import GoogLeNet, GoogLeNetOutputs, Inception

STAGES = (
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
    "fc",
)


def torchvision_googlenet(**kwargs: bool) -> nn.Module:
    return torchvision.models.googlenet(weights=None, init_weights=True, **{"aux_logits": False, **kwargs})


def output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name in STAGES:
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.update({name: out.shape}))
    model(x)
    return shapes


def flops_at_224(**kwargs: bool) -> int:
    with torch.device("meta"):
        model = timm.create_model("googlenet", **kwargs).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    return int(counter.get_total_flops())


def test_parameter_count_and_stage_shapes_equal_torchvision() -> None:
    with torch.device("meta"):
        ours = timm.create_model("googlenet", num_classes=1000, aux_logits=False, five_by_five=False).eval()
        theirs = torchvision_googlenet().eval()
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
        x = torch.empty(2, 3, 224, 224)
        assert output_shapes(ours, x) == output_shapes(theirs, x)


@pytest.mark.slow
def test_torchvision_weights_load_unchanged_and_give_the_same_logits() -> None:
    theirs = torchvision_googlenet(aux_logits=True).eval()
    ours = timm.create_model("googlenet", aux_logits=True, five_by_five=False).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every name and shape matches, aux heads included
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_five_by_five_is_the_paper_default_and_costs_more() -> None:
    paper, torchvision_like = GoogLeNet(), GoogLeNet(five_by_five=False)
    assert paper.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert torchvision_like.inception3a.branch3[1].conv.kernel_size == (3, 3)
    assert sum(p.numel() for p in paper.parameters()) > sum(p.numel() for p in torchvision_like.parameters())


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("five_by_five", [True, False])
def test_inception_module_out_channels_are_what_it_outputs(reduce: bool, five_by_five: bool) -> None:
    module = Inception(40, 8, 4, 16, 2, 6, 5, five_by_five=five_by_five, reduce=reduce).eval()
    with torch.no_grad():
        out = module(torch.randn(2, 40, 7, 7))
    assert out.shape == (2, module.out_channels, 7, 7)
    assert module.out_channels == (8 + 16 + 6 + 5 if reduce else 8 + 16 + 6 + 40), "the pool branch keeps its input"


@pytest.mark.slow
def test_without_reduction_the_network_builds_runs_and_costs_far_more() -> None:
    with torch.device("meta"):
        naive = timm.create_model("googlenet", reduce=False)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in naive.inception3a.branch2.modules())
    assert naive.num_features == 192 + 4752, "each module adds its 1×1, 3×3 and 5×5 widths to its input"
    model = timm.create_model("googlenet", reduce=False, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    reduced, naive_flops = flops_at_224(reduce=True), flops_at_224(reduce=False)
    print(f"googlenet at 224: {reduced / 1e9:.2f} GFLOPs, without 1×1 reductions {naive_flops / 1e9:.2f} GFLOPs")
    assert naive_flops > 5 * reduced


@pytest.mark.slow
def test_aux_heads_only_in_training_mode() -> None:
    model = timm.create_model("googlenet", aux_logits=True, num_classes=6)
    x = torch.randn(2, 3, 64, 64)
    outputs = model.train()(x)
    assert isinstance(outputs, GoogLeNetOutputs) and isinstance(outputs, tuple)
    assert [o.shape for o in outputs] == [(2, 6)] * 3, "(logits, aux1, aux2)"
    loss = outputs.logits.sum() + 0.3 * (outputs.aux1.sum() + outputs.aux2.sum())
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == [], "aux losses train the aux heads"

    model.zero_grad(set_to_none=True)
    logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 6), "eval: the logits alone"
    logits.sum().backward()
    untouched = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is None}
    assert untouched == {"aux1", "aux2"}, "eval skips the aux heads; gradient still reaches every other parameter"

    without = timm.create_model("googlenet", num_classes=6).train()
    assert without.aux1 is None and isinstance(without(x), torch.Tensor), "no aux heads: a tensor in training too"


def test_reset_classifier_also_resets_the_aux_heads() -> None:
    with torch.device("meta"):
        model = timm.create_model("googlenet", aux_logits=True, num_classes=10)
        model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    assert model.aux1.fc2.out_features == 3 and model.aux2.fc2.out_features == 3


@pytest.mark.parametrize(("in_chans", "size", "num_classes", "feature_map"), [(3, 32, 10, 8), (1, 28, 4, 7)])
def test_cifar_stem_keeps_small_images_large(in_chans: int, size: int, num_classes: int, feature_map: int) -> None:
    model = timm.create_model("googlenet_cifar", num_classes=num_classes, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1024, feature_map, feature_map), "only maxpool3 and maxpool4 halve the size"
        assert model.forward_head(features, pre_logits=True).shape == (2, 1024)
        assert model.forward_head(features).shape == (2, num_classes)


@pytest.mark.parametrize(("in_chans", "size"), [(1, 64), (3, 96)])
def test_imagenet_stem_output_shapes(in_chans: int, size: int) -> None:
    model = timm.create_model("googlenet", num_classes=12, in_chans=in_chans).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, in_chans, size, size))
    assert features.shape == (2, 1024, size // 32, size // 32)
    assert model.forward_head(features).shape == (2, 12)


def test_bad_stem_raises_value_error() -> None:
    with pytest.raises(ValueError, match="stem='tiny'"):
        timm.create_model("googlenet", stem="tiny")

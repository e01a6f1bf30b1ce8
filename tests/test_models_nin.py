"""NiN is the paper's CIFAR-10 network: mlpconv blocks, class maps from the last one, global average pooling."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.nin import MlpConv, NiN


@pytest.mark.parametrize(
    ("in_chans", "size", "num_classes", "feature_map"),
    [(3, 32, 10, 8), (1, 28, 5, 7), (3, 48, 100, 12)],  # two 3×3/2 poolings, rounding up like Caffe
)
def test_output_shapes(in_chans: int, size: int, num_classes: int, feature_map: int) -> None:
    model = timm.create_model("nin", num_classes=num_classes, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 192, feature_map, feature_map), "the maps the last mlpconv reads"
        assert model.forward_head(features, pre_logits=True).shape == (2, 192)
        assert model(x).shape == (2, num_classes)


def test_no_fully_connected_layer_the_last_mlpconv_emits_one_map_per_class() -> None:
    model = NiN(num_classes=7)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert [type(m) for m in model.modules()].count(MlpConv) == 3
    assert model.get_classifier() is model.head and model.head.cccp2.out_channels == 7
    blocks = (*model.features[::3], model.head)
    widths = [(b.conv.out_channels, b.cccp1.out_channels, b.cccp2.out_channels) for b in blocks]
    assert widths == [(192, 160, 96), (192, 192, 192), (192, 192, 7)], "the paper's 192-160-96, 192-192-192, 192-192-C"
    assert [b.conv.kernel_size for b in blocks] == [(5, 5), (5, 5), (3, 3)]


def test_paper_dropout_after_the_first_two_poolings() -> None:
    pools_then_dropouts = [type(m) for m in NiN().features if not isinstance(m, MlpConv)]
    assert pools_then_dropouts == [nn.MaxPool2d, nn.Dropout, nn.AvgPool2d, nn.Dropout]
    assert all(m.p == 0.5 for m in NiN().features if isinstance(m, nn.Dropout))
    assert all(m.p == 0.2 for m in NiN(dropout=0.2).features if isinstance(m, nn.Dropout))


def test_batch_norm_flag() -> None:
    assert not any(isinstance(m, nn.BatchNorm2d) for m in NiN().modules()), "the paper has no BN"
    model = NiN(batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8, "all but the class-map conv"
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradient_reaches_every_parameter(batch_norm: bool) -> None:
    model = NiN(num_classes=4, batch_norm=batch_norm, drop_rate=0.1).train()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_reset_classifier_rebuilds_the_last_mlpconv() -> None:
    model = NiN(num_classes=10).eval()
    model.reset_classifier(3)
    assert isinstance(model.head, MlpConv) and model.head.cccp2.out_channels == 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
        model.reset_classifier(0)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192), "no classifier: the pooled features"


@pytest.mark.parametrize("batch_norm", [False, True])
def test_weights_load_for_another_class_count_with_a_new_last_mlpconv(batch_norm: bool, tmp_path: Path) -> None:
    trained = NiN(batch_norm=batch_norm)
    weights = tmp_path / "nin.pth"
    torch.save(trained.state_dict(), weights)
    kwargs = {"batch_norm": batch_norm, "num_classes": 5, "pretrained_cfg_overlay": {"file": weights}}
    model = timm.create_model("nin", pretrained=True, **kwargs)
    assert model.head.cccp2.out_channels == 5
    torch.testing.assert_close(model.features[3].conv.weight, trained.features[3].conv.weight)

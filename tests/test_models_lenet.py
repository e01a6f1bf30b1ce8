"""LeNet-5 keeps the paper's 32×32 shapes, its act/pool options pick the layers, and bad options fail early."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.lenet import LeNet5


@pytest.mark.parametrize(("in_chans", "num_classes"), [(1, 10), (3, 4)])
def test_paper_shapes_at_32_pixels(in_chans: int, num_classes: int) -> None:
    model = timm.create_model("lenet5", num_classes=num_classes, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 16, 5, 5), "S4: 16 maps of 5×5"
        assert model.forward_head(features, pre_logits=True).shape == (2, 84), "F6: 84 units"
        assert model(x).shape == (2, num_classes)


@pytest.mark.parametrize(("act", "pool"), [("tanh", "avg"), ("relu", "max"), ("tanh", "max"), ("relu", "avg")])
def test_act_and_pool_options_choose_the_layers(act: str, pool: str) -> None:
    model = LeNet5(act=act, pool=pool)
    activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[act]
    pooling = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool]
    assert sum(isinstance(m, activation) for m in model.modules()) == 4, "after C1, C3, C5 and F6"
    assert sum(isinstance(m, pooling) for m in model.modules()) == 2, "S2 and S4"
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("option", [{"act": "sigmoid"}, {"pool": "lp"}])
def test_unknown_option_raises_value_error_naming_it(option: dict[str, str]) -> None:
    key, value = next(iter(option.items()))
    with pytest.raises(ValueError, match=f"{key}='{value}'"):
        LeNet5(**option)


def test_gradient_reaches_every_parameter() -> None:
    model = LeNet5(drop_rate=0.5).train()
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_reset_classifier_changes_the_class_count() -> None:
    model = LeNet5().eval()
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 84), "no classifier: the F6 features"

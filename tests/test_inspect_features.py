"""python -m pipeline.inspect inspect.features=true: the feature pyramid of the model as training builds it (the data's
channels, the model's input size), level by level, as features_only=True and forward_intermediates give it."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.errors import UserInputError
from pipeline.inspect import show, show_features
from pipeline.models.stats import FeatureLevel, feature_pyramid
from tests.conftest import compose_in


def test_the_pyramid_is_what_the_feature_wrapper_returns() -> None:
    model = timm.create_model("classic_resnet18_cifar", num_classes=10, in_chans=1)
    levels = feature_pyramid(model, (1, 32, 32))
    assert levels == [
        FeatureLevel(0, "relu", 64, 1, (1, 64, 32, 32)),
        FeatureLevel(1, "layer1", 64, 1, (1, 64, 32, 32)),
        FeatureLevel(2, "layer2", 128, 2, (1, 128, 16, 16)),
        FeatureLevel(3, "layer3", 256, 4, (1, 256, 8, 8)),
        FeatureLevel(4, "layer4", 512, 8, (1, 512, 4, 4)),
    ]
    wrapper = timm.create_model("classic_resnet18_cifar", in_chans=1, features_only=True).eval()
    with torch.no_grad():
        assert [tuple(t.shape) for t in wrapper(torch.zeros(1, 1, 32, 32))] == [level.output_shape for level in levels]


def test_the_cli_prints_every_level_at_the_input_size_training_uses(root: Path, capsys: pytest.CaptureFixture) -> None:
    show(compose_in(root, ["model=nin", "inspect.features=true"], config_name="inspect"))
    out = capsys.readouterr().out
    assert "nin: feature pyramid at input (1, 32, 32)" in out, "the digits' one channel, NiN's 32×32"
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    assert rows == [
        ["0", "features.0", "96", "1", "(1, 96, 32, 32)"],
        ["1", "features.3", "192", "2", "(1, 192, 16, 16)"],
        ["2", "features.5", "192", "4", "(1, 192, 8, 8)"],
    ]
    assert "parameters:" not in out, "the pyramid replaces the layer table"


def test_a_model_without_the_feature_contract_is_named() -> None:
    with pytest.raises(UserInputError, match=r"inspect\.features=true: plain has no feature_info"):
        show_features("plain", torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), (1, 8, 8))

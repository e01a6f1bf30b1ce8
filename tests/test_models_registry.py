"""Every model we register builds through timm like timm's own, runs at its default input size, and has a config.

Registering a name timm already has would silently replace timm's model; none of ours may do that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import pipeline.models  # noqa: F401  (registers the models)

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
OURS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("pipeline."))
EXPECTED = {
    "lenet5",
    "classic_resnet18",
    "classic_resnet34",
    "classic_resnet50",
    "classic_resnet101",
    "classic_resnet152",
    "classic_resnet18_cifar",
    "classic_resnet34_cifar",
    "classic_resnet50_cifar",
    "nin",
    "googlenet",
    "googlenet_cifar",
}


def test_the_registered_names_are_ours_and_none_shadows_a_timm_model() -> None:
    assert set(OURS) == EXPECTED
    timm_modules = [m for name, m in sys.modules.items() if name.startswith("timm.models.") and m is not None]
    clashes = {name for name in OURS for module in timm_modules if hasattr(module, name)}
    assert clashes == set(), "timm defines these itself"
    assert timm.models.model_entrypoint("resnet50").__module__ == "timm.models.resnet", "timm's resnet50 is intact"


@pytest.mark.parametrize("name", OURS)
def test_builds_through_timm_and_runs_at_its_default_input_size(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    _, height, width = cfg["input_size"]
    small = height <= 64
    # The 224-pixel models run on the meta device: shapes only, no arithmetic.
    with torch.device("cpu" if small else "meta"):
        model = timm.create_model(name, num_classes=7, in_chans=1).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 1, height, width))
    assert logits.shape == (2, 7)
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == cfg["input_size"] and len(data["mean"]) == len(data["std"]) == cfg["input_size"][0]
    classifier = cfg["classifier"] if isinstance(cfg["classifier"], str) else cfg["classifier"][0].split(".")[0]
    assert model.get_classifier() is model.get_submodule(classifier)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1


@pytest.mark.parametrize("name", OURS)
def test_each_model_has_a_config_file_whose_kwargs_the_constructor_accepts(name: str) -> None:
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert config["name"] == name and config["pretrained"] is False
    assert "drop_rate" in config["kwargs"]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3, in_chans=3, **config["kwargs"])
    assert model.num_classes == 3

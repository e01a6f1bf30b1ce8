"""timm's optimizer conventions: no weight decay on biases and normalisation weights, layer-wise learning-rate decay
from group_matcher, both through timm's own helpers, for our models and timm's; head/backbone factors on top; and a
real run that trains with them and logs one learning-rate curve per learning rate."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import timm
import torch
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.config import ConfigError, validate
from pipeline.module import ImageClassifier
from pipeline.recipes import ParameterGroups, name_groups
from pipeline.run import run
from tests.conftest import compose_in, store_uri

WD = 0.01


def on_meta(name: str, **kwargs: object) -> nn.Module:
    with torch.device("meta"):  # grouping needs names and shapes only
        return timm.create_model(name, num_classes=3, **kwargs)


def names_by_group(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in groups]


def one_d(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.ndim <= 1}


@pytest.mark.parametrize("name", ["classic_resnet18_cifar", "googlenet_cifar", "nin", "lenet5", "resnet18"])
def test_biases_and_norms_get_no_weight_decay(name: str) -> None:
    model = on_meta(name)
    groups = name_groups(ParameterGroups(weight_decay=WD, filter_bias_and_bn=True)(model))
    by_decay = {
        group["weight_decay"]: names for group, names in zip(groups, names_by_group(model, groups), strict=True)
    }
    assert by_decay.keys() == {0.0, WD}
    assert by_decay[0.0] == one_d(model) and by_decay[0.0], "every bias and normalisation weight, nothing else"
    assert by_decay[WD] == {n for n, _ in model.named_parameters()} - one_d(model)
    assert {g.get("name") for g in groups} == {"no_decay", None} and {g["lr_name"] for g in groups} == {""}


def test_what_a_timm_model_says_must_not_decay_does_not() -> None:
    model = on_meta("vit_tiny_patch16_224")
    groups = ParameterGroups(weight_decay=WD, filter_bias_and_bn=True)(model)
    no_decay = next(
        names for g, names in zip(groups, names_by_group(model, groups), strict=True) if g["weight_decay"] == 0
    )
    assert {"pos_embed", "cls_token"} <= no_decay, "3-d, yet in the model's no_weight_decay()"


def test_without_the_switches_one_group_holds_everything() -> None:
    model = on_meta("classic_resnet18_cifar")
    groups = name_groups(ParameterGroups(weight_decay=WD)(model))
    assert len(groups) == 1 and "weight_decay" not in groups[0], "the optimizer's own weight_decay applies"
    assert names_by_group(model, groups) == [{n for n, _ in model.named_parameters()}]


@pytest.mark.parametrize(
    ("name", "layers"),
    [
        # stem, the 8 blocks, the head
        (
            "classic_resnet18_cifar",
            [["conv1.", "bn1."], *[[f"layer{s}.{b}."] for s in (1, 2, 3, 4) for b in (0, 1)], ["fc."]],
        ),
        ("resnet18", [["conv1.", "bn1."], *[[f"layer{s}.{b}."] for s in (1, 2, 3, 4) for b in (0, 1)], ["fc."]]),
        ("lenet5", [["features.0."], ["features.3."], ["pre_logits.1."], ["pre_logits.3."], ["head."]]),
        ("nin", [["features.0."], ["features.3."], ["head."]]),
        (
            "googlenet_cifar",
            [
                ["conv1."],
                *[[f"inception{m}."] for m in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")],
                ["fc."],
            ],
        ),
    ],
)
def test_layer_decay_scales_each_depth_of_group_matcher(name: str, layers: list[list[str]]) -> None:
    decay = 0.5
    model = on_meta(name)
    groups = name_groups(ParameterGroups(weight_decay=WD, filter_bias_and_bn=True, layer_decay=decay)(model))
    held: dict[str, set[str]] = {}
    for group, names in zip(groups, names_by_group(model, groups), strict=True):
        depth = int(group["lr_name"].removeprefix("layer_"))
        assert group["lr_scale"] == pytest.approx(decay ** (len(layers) - 1 - depth)), group["lr_name"]
        assert group["weight_decay"] == (0.0 if names <= one_d(model) else WD)
        held.setdefault(group["lr_name"], set()).update(names)
    expected = {
        f"layer_{depth}": {n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))}
        for depth, prefixes in enumerate(layers)
    }
    assert held == expected
    assert len({g["name"] for g in groups}) == len(groups), "names unique, as Lightning's monitors need"


def test_backbone_factor_multiplies_into_the_layer_scales_and_frozen_parameters_stay_grouped() -> None:
    model = timm.create_model("classic_resnet18_cifar", num_classes=3)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("fc."))  # finetune=gradual before its unfreeze epoch
    module = ImageClassifier(
        model,
        3,
        optimizer=torch.optim.SGD,
        scheduler=None,
        backbone_lr_factor=0.1,
        grouping=ParameterGroups(weight_decay=WD, filter_bias_and_bn=True, layer_decay=0.5),
    )
    groups = module.parameter_groups()
    grouped = [n for names in names_by_group(model, groups) for n in names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters()), "each parameter once, frozen ones too"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"], "still frozen"
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales["head/layer_9"] == scales["head/layer_9/no_decay"] == 1.0
    assert scales["backbone/layer_0"] == pytest.approx(0.1 * 0.5**9)
    assert scales["backbone/layer_5/no_decay"] == pytest.approx(0.1 * 0.5**4)
    assert {g["lr_name"] for g in groups} == {"head/layer_9", *(f"backbone/layer_{i}" for i in range(9))}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.layer_decay=0", "optim.layer_decay=0: must be a number in (0, 1] or null"),
        ("optim.layer_decay=1.5", "optim.layer_decay=1.5"),
        ("optim.filter_bias_and_bn=yes", "optim.filter_bias_and_bn='yes': must be true or false"),
    ],
)
def test_wrong_values_fail_before_training(root: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_in(root, [override]))
    assert named in str(error.value)


@pytest.mark.slow
def test_a_run_trains_with_layer_decay_and_logs_one_curve_per_learning_rate(root: Path) -> None:
    lr, decay, epochs = 0.04, 0.5, 2
    result = run(
        compose_in(
            root,
            [
                f"optim.lr={lr}",
                f"optim.layer_decay={decay}",
                "scheduler=constant",
                "scheduler.warmup_epochs=0",
                f"trainer.max_epochs={epochs}",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
            ],
        )
    )
    data = mlflow.MlflowClient(store_uri(root)).get_run(result.run_id).data
    assert data.params["optim.layer_decay"] == str(decay) and data.params["optim.filter_bias_and_bn"] == "True"
    # LeNet-5's five depths (C1, C3, C5, F6, output), each one curve although each has a decay and a no-decay group.
    logged = {key: value for key, value in data.metrics.items() if key.startswith("lr-")}
    assert logged == pytest.approx({f"lr-SGD/layer_{depth}": lr * decay ** (4 - depth) for depth in range(5)})
    client = mlflow.MlflowClient(store_uri(root))
    assert {len(client.get_metric_history(result.run_id, key)) for key in logged} == {epochs}, "once an epoch"
    saved = torch.load(result.best_checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert sorted((g["lr_name"], g["weight_decay"]) for g in saved) == [
        (f"layer_{depth}", decay_value) for depth in range(5) for decay_value in (0.0, 5e-4)
    ], "each depth: its biases without weight decay, its weights with the SGD preset's"
    for group in saved:
        depth = int(group["lr_name"].removeprefix("layer_"))
        assert group["lr"] == pytest.approx(lr * decay ** (4 - depth)), "the group's lr is lr × its layer scale"

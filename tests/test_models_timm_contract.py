"""Every model we register keeps timm's whole model contract, as timm's own ResNet keeps it.

Each test runs over every registered model of ours (found in timm's registry, so a new one is covered the day it is
registered) and GoogLeNet with its auxiliary heads on as well as off: feature metadata and the feature wrappers,
forward_intermediates and pruning, the head API, parameter groups, gradient checkpointing, the pretrained config,
and TorchScript, torch.fx and torch.compile. Inputs are small (batch 2; 32×32 for the ImageNet-stem models and
LeNet-5, 16×16 for the CIFAR-stem ones and NiN); the architecture shared with timm's resnet18/34/50 is compared with
timm's own.

Two kinds of check run on fewer variants, to keep this file to a couple of minutes on two cores:
- what only depends on a model's Python code (TorchScript, torch.fx, TorchDynamo, gradient checkpointing) skips
  classic_resnet101/152: they are classic_resnet50's classes and code with more blocks per stage, and compiling
  them alone would take longer than everything else here;
- timm's four other feature wrappers (dict, hook, fx, getter) run on one model of each family and stem; the
  default one (list) runs on all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names, group_parameters
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)

OURS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("pipeline."))
VARIANTS = [(name, {}) for name in OURS] + [
    (name, {"aux_logits": True}) for name in OURS if name.startswith("googlenet")
]
IDS = [name + ("-aux" if kwargs else "") for name, kwargs in VARIANTS]
CLASSES = 5
SAME_CODE_AS_RESNET50 = ("classic_resnet101", "classic_resnet152")
COMPILED = [(name, kwargs) for name, kwargs in VARIANTS if name not in SAME_CODE_AS_RESNET50]
COMPILED_IDS = [i for i, (name, _) in zip(IDS, VARIANTS, strict=True) if name not in SAME_CODE_AS_RESNET50]
WRAPPED = [
    ("classic_resnet18", {}),
    ("classic_resnet50_cifar", {}),
    ("googlenet", {"aux_logits": True}),
    ("googlenet_cifar", {}),
    ("nin", {}),
    ("lenet5", {}),
]


def build(name: str, kwargs: dict[str, Any], seed: int = 0, **extra: Any) -> nn.Module:
    """The model in eval mode with `CLASSES` outputs, its weights drawn from `seed` (same seed, same weights)."""
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=CLASSES, **kwargs, **extra).eval()


def image_size(name: str) -> int:
    """Small, yet every feature level keeps at least one pixel."""
    _, height, _ = timm.models.get_pretrained_cfg(name).input_size
    return 32 if height > 32 or name == "lenet5" else 16  # LeNet-5 takes 32×32 only


def images(name: str) -> torch.Tensor:
    channels = timm.models.get_pretrained_cfg(name).input_size[0]
    size = image_size(name)
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def spatial(name: str, size: int, reduction: int) -> int:
    """The side of a feature map at `reduction`: padded convolutions and ceil-mode pooling keep size / stride, rounded
    up. LeNet-5's convolutions are unpadded, so its sizes are the paper's (32 → C1 28 → C3 10 → S4 5)."""
    if name == "lenet5":
        return {1: 28, 2: 10, 4: 5}[reduction]
    return math.ceil(size / reduction)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Batches of two small images gain nothing from torch's thread pool, and on a shared CPU its threads wait on
    each other: measured here, a ResNet-50 forward at 32×32 took 1-2 s on two threads and 0.1 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- features


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_feature_info_describes_what_forward_intermediates_returns(name: str, kwargs: dict[str, Any]) -> None:
    model, x = build(name, kwargs), images(name)
    info = model.feature_info
    assert [set(level) >= {"num_chs", "reduction", "module"} for level in info] == [True] * len(info)
    reductions = [level["reduction"] for level in info]
    assert reductions == sorted(reductions), "deeper levels never have a finer stride"
    for level in info:
        model.get_submodule(level["module"])  # each level names a module of the model
    with torch.no_grad():
        final, every = model.forward_intermediates(x)
        features = model.forward_features(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        chosen = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    size = x.shape[-1]
    assert [tuple(t.shape) for t in every] == [
        (2, level["num_chs"], spatial(name, size, level["reduction"]), spatial(name, size, level["reduction"]))
        for level in info
    ]
    assert torch.equal(final, features), "the final output is what forward_features returns"
    assert torch.equal(every[-1], features), "the last level is the final feature map"
    assert model.num_features == info[-1]["num_chs"]
    assert [torch.equal(a, b) for a, b in zip(last_two, every[-2:], strict=True)] == [True, True], "an int: the last n"
    assert [torch.equal(a, b) for a, b in zip(chosen, [every[0], every[-2]], strict=True)] == [True, True]
    assert len(early) == 1 and torch.equal(early[0], every[1])
    assert torch.equal(early_final, every[1]), "stop_early: nothing runs after the last level asked for"
    with pytest.raises(AssertionError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_features_only_gives_the_levels_forward_intermediates_gives(name: str, kwargs: dict[str, Any]) -> None:
    check_wrapper(name, kwargs, "list")


@pytest.mark.parametrize("wrapper", ["dict", "hook", "fx", "getter"])
@pytest.mark.parametrize(("name", "kwargs"), WRAPPED, ids=[n + ("-aux" if k else "") for n, k in WRAPPED])
def test_every_timm_feature_wrapper_gives_the_same_levels(name: str, kwargs: dict[str, Any], wrapper: str) -> None:
    check_wrapper(name, kwargs, wrapper)


def check_wrapper(name: str, kwargs: dict[str, Any], wrapper: str) -> None:
    model, x = build(name, kwargs), images(name)
    out_indices = (1, len(model.feature_info) - 1)
    # The same seed and arguments give the same weights: the wrapper must then return the very same maps.
    features = build(name, kwargs, features_only=True, out_indices=out_indices, feature_cls=wrapper)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
        maps = features(x)
    maps = list(maps.values()) if isinstance(maps, dict) else maps
    assert len(maps) == len(expected)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert features.feature_info.channels() == [model.feature_info[i]["num_chs"] for i in out_indices]
    assert features.feature_info.reduction() == [model.feature_info[i]["reduction"] for i in out_indices]


def test_the_default_features_only_model_has_every_level() -> None:
    for name in OURS:
        with torch.device("meta"):
            features = timm.create_model(name, features_only=True)
            plain = timm.create_model(name)
        assert features.feature_info.channels() == [level["num_chs"] for level in plain.feature_info], name


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_pruning_keeps_the_levels_asked_for_and_drops_the_head(name: str, kwargs: dict[str, Any]) -> None:
    model, x = build(name, kwargs), images(name)
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    assert sum(p.numel() for p in model.parameters()) < total, "the later layers and the head are gone"
    assert model.num_classes == 0 and not any(p.numel() for p in model.get_classifier().parameters())
    assert model.num_features == model.feature_info[1]["num_chs"]
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        features = model.forward_features(x)
    for got, want in zip(after, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(features, expected[1], msg="the features now end at the last level kept")


# ----------------------------------------------------------------------------------------- head


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_head_api(name: str, kwargs: dict[str, Any]) -> None:
    model, x = build(name, kwargs), images(name)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model.forward_head(features).shape == (2, CLASSES)
        torch.testing.assert_close(model.forward_head(features), model(x))
        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model.forward_head(features).shape == (2, model.head_hidden_size), "no classifier: the pre-logits"
        if name != "lenet5":  # LeNet-5 has no global pooling to turn off: C5 reads S4 whole
            model.reset_classifier(0, "")
            torch.testing.assert_close(model.forward_head(features), features, msg="no pooling, no classifier")
            model.reset_classifier(4, "max")
            assert model.forward_head(features).shape == (2, 4)
            assert model.global_pool.pool_type == "max"


def test_pooling_that_the_model_cannot_use_is_refused() -> None:
    with pytest.raises(ValueError, match="global_pool='catavgmax'"):
        timm.create_model("nin", global_pool="catavgmax")
    with pytest.raises(ValueError, match="global_pool='avg'"):
        timm.create_model("lenet5").reset_classifier(3, "avg")
    resnet = timm.create_model("classic_resnet18_cifar", num_classes=3, global_pool="catavgmax")
    assert resnet.head_hidden_size == 2 * resnet.num_features and resnet.fc.in_features == 1024


# ----------------------------------------------------------------------------------------- groups, checkpointing


def forward_order(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_group_matcher_orders_stem_stages_and_head(name: str, kwargs: dict[str, Any], coarse: bool) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=CLASSES, **kwargs)
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    ordered = [parameter for group in groups.values() for parameter in group]
    assert ordered == forward_order(model), "every parameter in one group, groups in forward order"
    first_conv = model.pretrained_cfg["first_conv"]
    assert f"{first_conv}.weight" in groups[0], "the stem comes first"
    head = {n for n in forward_order(model) if n.startswith(("fc.", "head.", "aux1.", "aux2."))}
    assert set(groups[max(groups)]) == head, "the last group is the head (with any auxiliary classifiers)"
    assert len(groups) == expected_groups(model, coarse)


def expected_groups(model: nn.Module, coarse: bool) -> int:
    """Stem + one group per stage (coarse) or block + head, from the model's own structure."""
    from pipeline.models.inception import GoogLeNet
    from pipeline.models.lenet import LeNet5
    from pipeline.models.nin import NiN
    from pipeline.models.resnet import ResNet

    if isinstance(model, ResNet):
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        return 2 + (4 if coarse else sum(len(stage) for stage in stages))
    if isinstance(model, GoogLeNet):
        return 2 + (3 if coarse else 9)  # Inception groups 3, 4, 5; modules 3a … 5b
    if isinstance(model, NiN):
        return 3  # mlpconv 1, mlpconv 2, the class-map mlpconv
    assert isinstance(model, LeNet5)
    return 5  # C1, C3, C5, F6, output


@pytest.mark.parametrize(("name", "kwargs"), COMPILED, ids=COMPILED_IDS)
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(
    name: str, kwargs: dict[str, Any]
) -> None:
    x = images(name)

    def step(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model = build(name, kwargs).train()
        model.set_grad_checkpointing(checkpointing)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            torch.manual_seed(2)  # the same dropout masks
            output = model(x)
        logits = output[0] if isinstance(output, tuple) else output
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    plain_logits, plain_grads, plain_saved = step(False)
    logits, grads, saved = step(True)
    torch.testing.assert_close(logits, plain_logits)
    assert grads.keys() == plain_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], plain_grads[key], rtol=1e-4, atol=1e-5, msg=key)
    assert saved < plain_saved, "activations inside the checkpointed parts are recomputed, not kept"


# ----------------------------------------------------------------------------------------- pretrained config


@pytest.mark.parametrize("name", OURS)
def test_pretrained_cfg_is_complete_and_describes_the_model(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    for key in ("input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier"):
        assert cfg.get(key) is not None, key
    for key in ("description", "paper_name", "paper_ids", "notes"):
        assert cfg.get(key), key
    channels, height, width = cfg["input_size"]
    assert len(cfg["mean"]) == len(cfg["std"]) == channels
    with torch.device("meta"):
        model = timm.create_model(name)
        features = model.forward_features(torch.empty(1, channels, height, width))
    assert tuple(features.shape[-2:]) == cfg["pool_size"], "pool_size: the final feature map at input_size"
    assert model.get_submodule(cfg["first_conv"]).in_channels == channels
    assert timm.data.resolve_model_data_config(model)["input_size"] == cfg["input_size"]


# ----------------------------------------------------------------------------------------- script, fx, compile


def eager_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(("name", "kwargs"), COMPILED, ids=COMPILED_IDS)
def test_torchscript(name: str, kwargs: dict[str, Any]) -> None:
    model, x = build(name, kwargs), images(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager_output(model, x))
    if kwargs.get("aux_logits"):
        outputs = torch.jit.script(model.train())(x)
        assert len(outputs) == 3, "in training, the logits and both auxiliary logits"


@pytest.mark.parametrize(("name", "kwargs"), COMPILED, ids=COMPILED_IDS)
def test_fx_feature_extraction_and_a_traced_graph_that_scripts(name: str, kwargs: dict[str, Any]) -> None:
    model, x = build(name, kwargs), images(name)
    _, eval_nodes = get_graph_node_names(model)
    level = model.feature_info[-2]["module"]  # a level inside the network, by its module name
    extractor = create_feature_extractor(model, {level: "level", eval_nodes[-1]: "logits"})
    with torch.no_grad():
        out = extractor(x)
        expected = model.forward_intermediates(x, indices=[-2], intermediates_only=True)[0]
    torch.testing.assert_close(out["level"], expected)
    torch.testing.assert_close(out["logits"], eager_output(model, x))
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(traced)(x), eager_output(model, x))


@pytest.mark.parametrize(("name", "kwargs"), COMPILED, ids=COMPILED_IDS)
def test_compiles_as_one_graph(name: str, kwargs: dict[str, Any]) -> None:
    # fullgraph=True fails on any graph break; that is TorchDynamo's capture, the same whatever the backend. The
    # "eager" backend runs the captured graph without generating C++ (minutes on 2 cores for a ResNet-152);
    # inductor itself is exercised by perf.compile in tests/test_recipes.py.
    model, x = build(name, kwargs), images(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager_output(model, x))


# ----------------------------------------------------------------------------------------- against timm's ResNet


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_feature_levels_and_groups_equal_timm_resnet(depth: int) -> None:
    ours, theirs = build(f"classic_resnet{depth}", {}), build(f"resnet{depth}", {})
    assert [(f["num_chs"], f["reduction"]) for f in ours.feature_info] == [
        (f["num_chs"], f["reduction"]) for f in theirs.feature_info
    ]
    assert (ours.num_features, ours.head_hidden_size) == (theirs.num_features, theirs.head_hidden_size)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours_maps = ours.forward_intermediates(x, intermediates_only=True)
        theirs_maps = theirs.forward_intermediates(x, intermediates_only=True)
        features = timm.create_model(f"classic_resnet{depth}", features_only=True, out_indices=(1, 3)).eval()(x)
        timm_features = timm.create_model(f"resnet{depth}", features_only=True, out_indices=(1, 3)).eval()(x)
    assert [t.shape for t in ours_maps] == [t.shape for t in theirs_maps]
    assert [t.shape for t in features] == [t.shape for t in timm_features]
    for coarse in (False, True):
        assert group_parameters(ours, ours.group_matcher(coarse)) == group_parameters(
            theirs, theirs.group_matcher(coarse)
        ), "the same parameter names in the same groups"


def test_timm_resnet50_weights_give_the_same_features_in_ours() -> None:
    theirs = build("resnet50", {})
    ours = build("classic_resnet50", {})
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours_final, ours_maps = ours.forward_intermediates(x)
        theirs_final, theirs_maps = theirs.forward_intermediates(x)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours_final, theirs_final)
    for got, want in zip(ours_maps, theirs_maps, strict=True):
        torch.testing.assert_close(got, want)

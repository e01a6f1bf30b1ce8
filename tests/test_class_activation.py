"""Class-activation figures: Grad-CAM built on forward_intermediates gives what the textbook computation (hooks on
the last stage, the plain forward) gives, for ours and for timm's convolutional and transformer models; every run
logs figures/class_activation.png and so does evaluate."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.cam import class_activation_png, grad_cam, pick
from pipeline.data.images import ImageSet
from pipeline.data.transforms import InputSpec
from pipeline.evaluate import evaluate
from pipeline.run import RunResult, run
from tests.conftest import compose_in, store_uri


def textbook_grad_cam(
    model: nn.Module, x: torch.Tensor, module: str, as_maps: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Selvaraju et al.'s recipe as hook-based implementations do it: the module's activations and their gradient
    from the model's ordinary forward, a channel weight = the gradient's spatial mean."""
    kept: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(module).register_forward_hook(lambda _m, _i, out: kept.setdefault("out", out))
    logits = model(x)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), kept["out"])
    activations, gradient = as_maps(kept["out"]).detach(), as_maps(gradient)
    cam = torch.relu((gradient.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1)[:, None, None]


def grid(tokens: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A ViT's patch tokens (after its class token) as NCHW maps."""
    patches = tokens[:, model.num_prefix_tokens :]
    side = int(patches.shape[1] ** 0.5)
    return patches.reshape(len(tokens), side, side, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("name", "size", "layout"),
    [
        ("classic_resnet18_cifar", 32, "maps"),
        ("googlenet", 64, "maps"),
        ("test_resnet", 64, "maps"),
        ("test_convnext", 64, "maps"),
        ("test_efficientnet", 64, "maps"),
        ("test_vit", 64, "tokens"),  # its NCHW intermediates are copies: the gradient comes from blocks.5's tokens
    ],
)
def test_grad_cam_is_the_textbook_one(name: str, size: int, layout: str) -> None:
    torch.manual_seed(0)
    # A ViT pooling its class token reads no patch token of the last block: Grad-CAM there is blank (its known limit
    # on ViTs); pooling the patch tokens, as here, makes them count.
    kwargs = {"img_size": size, "global_pool": "avg"} if layout == "tokens" else {}
    model = timm.create_model(name, num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    heat, logits = grad_cam(model, x)
    module = model.feature_info[-1]["module"]
    expected = textbook_grad_cam(model, x, module, (lambda t: grid(t, model)) if layout == "tokens" else (lambda t: t))
    torch.testing.assert_close(heat, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(x).detach())
    assert heat.shape == (2, size, size) and heat.min() >= 0 and torch.allclose(heat.flatten(1).amax(1), torch.ones(2))


def test_grad_cam_leaves_the_model_as_it_found_it_and_works_with_a_frozen_one() -> None:
    model = timm.create_model("classic_resnet18_cifar", num_classes=4).train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # a linear probe's frozen backbone, and here the head too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    heat, _ = grad_cam(model, torch.randn(2, 3, 32, 32))
    assert heat.shape == (2, 32, 32) and heat.max() > 0
    assert model.training, "the training mode is restored"
    assert all(p.grad is None for p in model.parameters()), "no gradient left on the parameters"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "BatchNorm statistics untouched"


def test_the_images_are_spread_over_the_set() -> None:
    assert pick(4, 100) == [0, 33, 66, 99]
    assert pick(5, 3) == [0, 1, 2] and pick(0, 10) == [] and pick(3, 0) == []


def test_the_figure_and_what_it_refuses(tmp_path: Path) -> None:
    images = ImageSet(np.random.default_rng(0).integers(0, 255, (6, 20, 20, 1), dtype=np.uint8), np.arange(6) % 3)
    spec = InputSpec(size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
    model = timm.create_model("lenet5", num_classes=3)
    path = class_activation_png(model, images, spec, ["a", "b", "c"], 5, tmp_path / "cam.png", title="t")
    assert path == tmp_path / "cam.png" and Image.open(path).size[0] > 4 * 200, "four images to a row"
    assert class_activation_png(model, images, spec, ["a", "b", "c"], 0, tmp_path / "none.png", title="t") is None
    no_features = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 3))  # no timm contract: no figure, no failure
    assert class_activation_png(no_features, images, spec, ["a", "b", "c"], 2, tmp_path / "x.png", title="t") is None
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    root = tmp_path_factory.mktemp("cam")
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        result = run(
            compose_in(
                root,
                [
                    "class_activation.images=3",
                    "trainer.max_epochs=1",
                    "scheduler.warmup_epochs=0",
                    "trainer.limit_train_batches=3",
                    "trainer.limit_val_batches=1",
                ],
            )
        )
    return root, result


def figures(root: Path, run_id: str) -> list[str]:
    return [Path(f.path).name for f in mlflow.MlflowClient(store_uri(root)).list_artifacts(run_id, "figures")]


@pytest.mark.slow
def test_a_run_logs_its_class_activation_figure(trained: tuple[Path, RunResult]) -> None:
    root, result = trained
    assert "class_activation.png" in figures(root, result.run_id)
    width, height = Image.open(result.output_dir / "class_activation.png").size
    assert width > height, "three test images side by side"


@pytest.mark.slow
def test_evaluate_logs_one_for_the_images_it_evaluates(trained: tuple[Path, RunResult]) -> None:
    root, result = trained
    evaluation = evaluate(
        compose_in(root, [f"source={result.run_id}", "split=val", "class_activation.images=2"], config_name="evaluate")
    )
    assert "class_activation.png" in figures(root, evaluation.run_id)
    assert evaluation.files["class_activation"].is_file()

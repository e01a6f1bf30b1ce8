"""Training recipes: Mixup/CutMix targets, model EMA (evaluated, checkpointed, resumed), LR scaling with the batch,
warm-up in every schedule, stochastic depth in our ResNet, and the channels-last / torch.compile switches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from timm.layers import DropPath

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.config import CONF_DIR
from pipeline.data.normalize import Normalize
from pipeline.ema import ema_decay
from pipeline.models.factory import create_model
from pipeline.module import ImageClassifier
from pipeline.recipes import build_mixup, optimizer_factory, scaled_lr
from pipeline.run import RunResult, build_data, build_inputs, run
from tests.conftest import compose_in, store_uri

CLASSES = 10
MIXUP = {"mixup_alpha": 0.4, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "label_smoothing": 0.0}


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(size, 1, 8, 8, generator=generator), torch.randperm(CLASSES, generator=generator)[:size]


def beta_draw(seed: int, alpha: float) -> float:
    """What timm's Mixup draws after np.random.seed(seed): the 'mix at all?' coin, then Beta(alpha, alpha)."""
    np.random.seed(seed)
    np.random.rand()
    return float(np.random.beta(alpha, alpha))


def test_mixup_mixes_images_and_targets_with_a_beta_weight() -> None:
    images, labels = batch()
    original = images.clone()
    lam = beta_draw(3, MIXUP["mixup_alpha"])
    np.random.seed(3)
    mixed, targets = build_mixup(MIXUP, CLASSES)(images, labels)
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * original + (1 - lam) * original.flip(0), atol=1e-6)
    one_hot = torch.nn.functional.one_hot(labels, CLASSES).float()
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(len(labels)))


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area() -> None:
    images, labels = batch()
    original = images.clone()
    np.random.seed(5)
    mixed, targets = build_mixup({**MIXUP, "mixup_alpha": 0.0, "cutmix_alpha": 1.0}, CLASSES)(images, labels)
    from_self = (mixed == original).all(0).all(0)  # pixels of each image's own, for the whole batch
    from_other = (mixed == original.flip(0)).all(0).all(0)
    assert (from_self | from_other).all() and from_other.any()
    kept = 1 - (~from_self).float().mean().item()  # lam = the share of the image that stayed
    one_hot = torch.nn.functional.one_hot(labels, CLASSES).float()
    assert torch.allclose(targets, kept * one_hot + (1 - kept) * one_hot.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(len(labels)))


def test_with_prob_0_targets_are_one_hot_and_images_untouched() -> None:
    images, labels = batch()
    original = images.clone()
    mixed, targets = build_mixup({**MIXUP, "prob": 0.0}, CLASSES)(images, labels)
    assert torch.equal(mixed, original)
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, CLASSES).float())
    assert build_mixup({**MIXUP, "mixup_alpha": 0.0}, CLASSES) is None, "both alphas 0: off"


def test_lr_base_scales_linearly_or_by_square_root() -> None:
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 64, "sqrt") == pytest.approx(0.05)


def test_ema_warmup_follows_early_weights_then_reaches_the_decay() -> None:
    assert ema_decay(0.999, 1, warmup=False) == 0.999
    early = [ema_decay(0.999, n, warmup=True) for n in (1, 10, 100, 1000)]
    assert early == sorted(early) and early[0] < 0.5
    assert ema_decay(0.999, 10**6, warmup=True) == 0.999


@pytest.mark.parametrize("schedule", sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml")))
def test_every_scheduler_warms_up(root: Path, schedule: str) -> None:
    lr, steps_per_epoch, warmup_epochs = 0.1, 10, 2
    cfg = compose_in(root, [f"scheduler={schedule}", f"scheduler.warmup_epochs={warmup_epochs}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=steps_per_epoch, max_epochs=20)
    values = []
    for _ in range(warmup_epochs * steps_per_epoch + 1):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = values[: warmup_epochs * steps_per_epoch + 1]
    assert values[0] < lr / 5, "starts low"
    assert warmup == sorted(warmup), "rises through the warm-up"
    assert values[warmup_epochs * steps_per_epoch] == pytest.approx(lr), "reaches the configured lr at its end"


def test_drop_path_in_our_resnet_from_model_kwargs() -> None:
    model = create_model(
        "classic_resnet18_cifar", num_classes=CLASSES, in_chans=1, pretrained=False, kwargs={"drop_path_rate": 0.2}
    )
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 7, "every block but the first (rate 0) of 2+2+2+2"
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.2)
    plain = timm.create_model("classic_resnet18_cifar", num_classes=CLASSES, in_chans=1)
    assert model.state_dict().keys() == plain.state_dict().keys(), "no new weights: checkpoints still load"
    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(0)
    model.train()
    assert not torch.equal(model.forward_features(x), model.forward_features(x)), "random in training"
    model.eval()
    assert torch.equal(model(x), model(x)), "the identity in evaluation"


# One short real training with every recipe on: Mixup + CutMix, EMA, lr_base with accumulated batches.
RECIPE = (
    "model=lenet5",
    "data.batch_size=32",
    "trainer.accumulate_grad_batches=2",  # effective batch 32 × 2 = 64
    "optim.lr_base=0.2",  # → lr 0.2 × 64 / 256 = 0.05
    "scheduler=constant",
    "scheduler.warmup_epochs=0",
    "mixup.mixup_alpha=0.2",
    "mixup.cutmix_alpha=1.0",
    "ema.enabled=true",
    "ema.decay=0.9",
    "ema.warmup=false",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    root = tmp_path_factory.mktemp("recipes")
    return root, run(compose_in(root, RECIPE))


@pytest.mark.slow
def test_mixed_training_scores_the_original_labels_and_logs_the_scaled_lr(
    recipe_run: tuple[Path, RunResult],
) -> None:
    root, result = recipe_run
    run_data = mlflow.MlflowClient(store_uri(root)).get_run(result.run_id).data
    assert 0 <= run_data.metrics["train/acc"] <= 1 and np.isfinite(run_data.metrics["train/loss"])
    assert float(run_data.params["optim.effective_batch_size"]) == 64
    assert float(run_data.params["optim.lr_scaled"]) == pytest.approx(0.05)
    assert run_data.metrics["lr-SGD"] == pytest.approx(0.05)
    assert run_data.tags["checkpoint.weights"] == "ema"


@pytest.mark.slow
def test_ema_weights_are_checkpointed_and_are_what_is_tested(recipe_run: tuple[Path, RunResult]) -> None:
    root, result = recipe_run
    checkpoint = torch.load(result.best_checkpoint, weights_only=True)
    assert checkpoint["weights"] == "ema"
    ema, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(ema[k], live[k]) for k in ema if k.startswith("model.")), "EMA ≠ live weights"

    cfg = compose_in(root, RECIPE)
    inputs = build_inputs(cfg)
    datamodule = build_data(cfg, inputs.splits, inputs.spec)
    module = ImageClassifier(
        inputs.model,
        CLASSES,
        optimizer_factory(cfg.optim),
        instantiate(cfg.scheduler),
        normalize=Normalize(inputs.spec.mean, inputs.spec.std),
    )
    tester = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    def test_loss(state: dict[str, torch.Tensor]) -> float:
        module.load_state_dict(state)
        return tester.test(module, datamodule=datamodule, verbose=False)[0]["test/loss"]

    logged = mlflow.MlflowClient(store_uri(root)).get_run(result.run_id).data.metrics["test/loss"]
    assert test_loss(ema) == pytest.approx(result.metrics["test/loss"], rel=1e-5)
    assert test_loss(ema) == pytest.approx(logged, rel=1e-5)
    assert test_loss(live) != pytest.approx(logged, rel=1e-5)


@pytest.mark.slow
def test_resume_restores_the_ema(recipe_run: tuple[Path, RunResult]) -> None:
    root, result = recipe_run
    last = result.output_dir / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    run(compose_in(root, [*RECIPE, f"resume={last}", "trainer.max_epochs=4", "trainer.limit_train_batches=2"]))
    after = torch.load(last, weights_only=True)
    assert after["epoch"] == before["epoch"] + 1
    # One optimizer step later (2 batches, 2 accumulated): EMA = 0.9 × the restored EMA + 0.1 × the new live weights.
    for name, value in after["state_dict"].items():
        if name.startswith("model.") and value.is_floating_point():
            expected = 0.9 * before["state_dict"][name] + 0.1 * after["current_model_state"][name]
            assert torch.allclose(value, expected, atol=1e-6), name


@pytest.mark.slow
def test_channels_last_and_compile_train_a_tiny_model_on_cpu(root: Path) -> None:
    result = run(
        compose_in(
            root,
            [
                "perf.channels_last=true",
                "perf.compile=true",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "scheduler.warmup_epochs=0",
            ],
        )
    )
    assert np.isfinite(result.metrics["test/loss"])
    state = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in name for name in state), "compiled in place: checkpoints keep the plain names"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("mixup.prob=2", "mixup.prob=2: must be a number in [0, 1]"),
        ("mixup.cutmix_alpha=-1", "mixup.cutmix_alpha=-1: must be a number >= 0"),
        ("ema.decay=1", "ema.decay=1: must be a number in (0, 1)"),
        ("ema.enabled=maybe", "ema.enabled='maybe': must be true or false"),
        ("optim.lr_scale=cube", "optim.lr_scale='cube': must be one of linear, sqrt"),
        ("perf.compile=1", "perf.compile=1: must be true or false"),
        ("model=classic_resnet18_cifar model.kwargs.drop_path_rate=1.5", "model.kwargs.drop_path_rate=1.5"),
        ("mixup.mixup_alpha=0.2 data.batch_size=33", "data.batch_size=33 is odd"),
    ],
)
def test_wrong_recipe_values_fail_before_training(root: Path, override: str, named: str) -> None:
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError) as error:
        validate(compose_in(root, override.split()))
    assert named in str(error.value) and "(e.g. " in str(error.value)

"""Each fine-tuning strategy trains exactly the parameters it promises, epoch by epoch, through run(cfg).

full: everything from the start. linear_probe: the classifier only, the backbone's weights and BatchNorm statistics
untouched. gradual: the classifier alone, then everything from finetune.unfreeze_epoch, the backbone at
optim.lr × finetune.backbone_lr_factor. The counts are also what MLflow shows as model/trainable_params per epoch.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch

from pipeline.config import ConfigError, validate
from pipeline.finetune import BATCH_NORMS
from pipeline.run import run
from tests.conftest import compose_in, store_uri

EPOCHS = 3
SMALL = (
    "model=timm",
    "model.name=test_resnet",  # timm's 0.4 M-parameter ResNet with BatchNorm
    "model.pretrained=false",  # what is frozen when does not depend on where the weights came from
    "data.image_size=[32,32]",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "scheduler=constant",  # so the two groups' learning rates compare exactly
)


class Watch(L.Callback):
    """Per epoch: which parameters may train, which changed, and whether frozen BatchNorm statistics moved."""

    def __init__(self) -> None:
        self.trainable: list[set[str]] = []
        self.changed: list[set[str]] = []
        self.frozen_stats_moved: list[bool] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        self.trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
        self.before = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        after = model.state_dict()
        self.changed.append({n for n, p in model.named_parameters() if not torch.equal(p, self.before[n])})
        frozen_bn = [
            name
            for name, module in model.named_modules()
            if isinstance(module, BATCH_NORMS) and not module.weight.requires_grad
        ]
        self.frozen_stats_moved.append(
            any(not torch.equal(after[f"{bn}.running_mean"], self.before[f"{bn}.running_mean"]) for bn in frozen_bn)
        )


def train(root: Path, *overrides: str) -> tuple[Watch, str, set[str], set[str]]:
    watch = Watch()
    result = run(compose_in(root, [*SMALL, *overrides]), callbacks=[watch])
    model = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    names = {k.removeprefix("model.") for k in model if k.startswith("model.") and "running" not in k}
    names = {n for n in names if not n.endswith("num_batches_tracked")}
    head = {n for n in names if n.startswith("fc.")}
    return watch, result.run_id, head, names


def logged(root: Path, run_id: str, key: str) -> list[float]:
    return [m.value for m in mlflow.MlflowClient(store_uri(root)).get_metric_history(run_id, key)]


def counts(root: Path, run_id: str) -> list[int]:
    return [int(v) for v in logged(root, run_id, "model/trainable_params")]


def size(names: set[str]) -> int:
    import timm

    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


@pytest.mark.slow
def test_full_trains_every_parameter_every_epoch(root: Path) -> None:
    watch, run_id, _, everything = train(root, "finetune=full")
    assert watch.trainable == [everything] * EPOCHS
    assert counts(root, run_id) == [size(everything)] * EPOCHS
    assert logged(root, run_id, "lr-SGD"), "one parameter group: the usual learning-rate metric"


@pytest.mark.slow
def test_linear_probe_trains_only_the_classifier_and_leaves_batchnorm_statistics(root: Path) -> None:
    watch, run_id, head, _ = train(root, "finetune=linear_probe")
    assert watch.trainable == [head] * EPOCHS
    assert all(changed == head for changed in watch.changed), "the backbone's weights never move"
    assert watch.frozen_stats_moved == [False] * EPOCHS, "frozen BatchNorm normalises with its running statistics"
    assert counts(root, run_id) == [size(head)] * EPOCHS == [970] * EPOCHS  # fc: 96 features × 10 classes + 10


@pytest.mark.slow
def test_gradual_unfreezes_the_backbone_at_its_epoch_with_a_lower_learning_rate(root: Path) -> None:
    factor = 0.1
    watch, run_id, head, everything = train(
        root, "finetune=gradual", "finetune.unfreeze_epoch=1", f"finetune.backbone_lr_factor={factor}"
    )
    assert watch.trainable == [head, everything, everything]
    assert watch.changed[0] == head and watch.changed[2] == everything
    assert watch.frozen_stats_moved == [False, False, False]  # from epoch 1 no BatchNorm is frozen any more
    assert counts(root, run_id) == [size(head), size(everything), size(everything)]
    head_lr, backbone_lr = logged(root, run_id, "lr-SGD/head"), logged(root, run_id, "lr-SGD/backbone")
    assert len(head_lr) == EPOCHS and backbone_lr == pytest.approx([lr * factor for lr in head_lr])


def test_an_unfreeze_epoch_the_run_never_reaches_is_refused(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"finetune\.unfreeze_epoch=30 is not before trainer\.max_epochs=30"):
        validate(compose_in(root, ["finetune=gradual", "finetune.unfreeze_epoch=30"]))

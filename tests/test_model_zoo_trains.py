"""Every model family of ours trains through the one training path, run(cfg), and logs its cost."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline.run import run
from tests.conftest import compose_in, store_uri

pytestmark = pytest.mark.slow

TINY = [
    "trainer.max_epochs=2",
    "scheduler.warmup_epochs=0",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.batch_size=16",
    "logger.log_checkpoint=false",
]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=lenet5", "model.kwargs.act=relu", "model.kwargs.pool=max"],
        ["model=classic_resnet18_cifar", "data.image_size=[16,16]"],
        ["model=nin", "data.image_size=[16,16]"],
        ["model=googlenet_cifar", "model.kwargs.aux_logits=true", "data.image_size=[16,16]"],
    ],
    ids=["lenet5", "classic_resnet18_cifar", "nin", "googlenet_cifar+aux"],
)
def test_family_trains_tests_and_logs_params_and_flops(root: Path, overrides: list[str]) -> None:
    result = run(compose_in(root, [*TINY, *overrides]))
    assert 0.0 <= result.metrics["test/acc"] <= 1.0
    logged = mlflow.MlflowClient(store_uri(root)).get_run(result.run_id).data.metrics
    assert logged["model/params"] > 0 and logged["model/flops"] > 0
    assert len(mlflow.MlflowClient(store_uri(root)).get_metric_history(result.run_id, "train/loss")) == 2

"""checkpoint.save_top_k keeps that many best checkpoints; the best of them is still the one tested, and the one
uploaded with logger.log_checkpoint=true."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline.run import run
from tests.conftest import compose_in, store_uri

pytestmark = pytest.mark.slow


def test_two_best_checkpoints_are_kept_and_the_best_is_tested_and_logged(root: Path) -> None:
    overrides = [
        "checkpoint.save_top_k=2",
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=1",
        "optim.lr=0.1",
        "logger.log_checkpoint=true",
    ]
    result = run(compose_in(root, overrides))

    kept = sorted(p.name for p in (root / "outputs" / "run" / "checkpoints").glob("best-*.ckpt"))
    assert len(kept) == 2, kept
    client = mlflow.MlflowClient(store_uri(root))
    val_acc = {point.step: point.value for point in client.get_metric_history(result.run_id, "val/acc")}
    scores = list(val_acc.values())  # one per epoch, in order
    tested = Path(result.best_checkpoint).name
    assert tested in kept
    assert scores[int(tested.removeprefix("best-epoch").removesuffix(".ckpt"))] == max(scores), "the best is tested"
    assert result.metrics["best_val/acc"] == max(scores)
    logged = [Path(f.path).name for f in client.list_artifacts(result.run_id, "checkpoints")]
    assert logged == [tested], "and it alone is logged"

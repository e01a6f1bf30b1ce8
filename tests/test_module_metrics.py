"""The LightningModule's metrics: top-5 accuracy only where there are at least five classes; updated in chunks,
with the values of per-batch updates; logged once an epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.metrics import EpochMetrics, classification_metrics


def test_top5_only_with_five_or_more_classes() -> None:
    assert set(classification_metrics(10).keys()) == {"acc", "f1", "acc_top5"}
    assert set(classification_metrics(3).keys()) == {"acc", "f1"}


def test_metrics_measure_what_they_say() -> None:
    metrics = classification_metrics(5)
    logits = torch.eye(5)[[0, 1, 2, 3]]  # predicts 0, 1, 2, 3
    metrics.update(logits, torch.tensor([0, 1, 2, 4]))
    values = metrics.compute()
    assert values["acc"] == 0.75
    assert values["acc_top5"] == 1.0


@pytest.mark.parametrize("chunk_images", [1, 50, 10_000])  # every batch, across batches, only at the end
def test_chunked_updates_give_the_values_of_per_batch_updates(chunk_images: int) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(n, 10, generator=generator), torch.randint(0, 10, (n,), generator=generator)) for n in (32, 32, 7)
    ]
    losses = [torch.tensor(0.5), torch.tensor(1.5), torch.tensor(4.0)]
    chunked = EpochMetrics(10, prefix="val/", chunk_images=chunk_images)
    reference = classification_metrics(10)
    for (logits, labels), loss in zip(batches, losses, strict=True):
        chunked.update(logits, labels, loss)
        reference.update(logits, labels)
    values = chunked.compute()
    expected = reference.compute()
    for name in ("acc", "f1", "acc_top5"):
        assert values[f"val/{name}"] == pytest.approx(float(expected[name]), abs=1e-6), name
    assert values["val/loss"] == pytest.approx((32 * 0.5 + 32 * 1.5 + 7 * 4.0) / 71), "the mean over images"
    chunked.update(*batches[0], torch.tensor(float("nan")))
    assert torch.isnan(chunked.compute()["val/loss"]), "a new epoch, and a NaN loss shows"


@pytest.mark.slow
def test_each_split_is_logged_once_an_epoch_and_callbacks_see_the_epoch_just_trained(root: Path) -> None:
    """Loss and metrics are logged at each epoch's end (not every step), in time for callbacks that report at
    on_train_epoch_end (Ray Tune, the sweep's per-epoch report): they must see this epoch's values, not the last."""
    import lightning as L
    import mlflow

    from pipeline.run import run
    from tests.conftest import compose_in, store_uri

    class Seen(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.values.append(float(trainer.callback_metrics["train/loss"]))

    seen = Seen()
    tiny = ["trainer.max_epochs=3", "trainer.limit_train_batches=4", "scheduler.warmup_epochs=0"]
    result = run(compose_in(root, tiny), callbacks=[seen])
    client = mlflow.MlflowClient(store_uri(root))
    for name in ("train/loss", "train/acc", "train/f1", "val/loss", "val/acc"):
        assert len(client.get_metric_history(result.run_id, name)) == 3, name
    logged = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert seen.values == pytest.approx(logged), "each epoch's own value"
    assert len(set(logged)) == 3

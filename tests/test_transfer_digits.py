"""`python -m pipeline.transfer_digits`, reduced to a few batches: all three stages run through run(cfg), the
fine-tuning stage starts from the pretraining run, and MLflow holds the three runs tagged for comparison.

The accuracy claim (fine-tuned clearly above scratch) is measured with the full preset: README.md and
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest

from tests.conftest import run_cli, store_uri

pytestmark = pytest.mark.e2e

REDUCED = (
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)


def test_the_reduced_preset_runs_all_stages_and_mlflow_compares_them(root: Path) -> None:
    done = run_cli("pipeline.transfer_digits", "--draws", "2", *REDUCED, root=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = r"\s*│\s*[0-9.]+\s*│\s*[0-9.]+\s*│\s*[0-9a-f]{32}"
    assert re.search(rf"pretrain\s*│{row}", done.stdout), done.stdout
    for stage in ("finetune", "scratch"):
        for draw in (0, 1):
            assert re.search(rf"{stage}\s*│\s*{draw}{row}", done.stdout), done.stdout
    assert re.search(r"fine-tuned − scratch on digits 5–9: [+-][0-9.]+ points .*mean of 2 draws", done.stdout)

    client = mlflow.MlflowClient(store_uri(root))
    experiment = client.get_experiment_by_name("transfer_digits")
    found = client.search_runs([experiment.experiment_id])
    assert sorted((r.data.tags["transfer_stage"], r.data.tags.get("transfer_draw")) for r in found) == [
        ("finetune", "0"), ("finetune", "1"), ("pretrain", None), ("scratch", "0"), ("scratch", "1")
    ]  # fmt: skip
    assert {r.data.tags["preset"] for r in found} == {"transfer_digits"}
    assert len({r.data.tags["transfer_group"] for r in found}) == 1, "one invocation, one group"
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in found)
    for draw in ("0", "1"):  # each pair: the same draw of images
        pair = [r for r in found if r.data.tags.get("transfer_draw") == draw]
        assert {r.data.params["data.source.split_seed"] for r in pair} == {draw}

    runs = {r.data.tags["transfer_stage"]: r for r in found if r.data.tags.get("transfer_draw") in (None, "0")}
    pretrain, finetune, scratch = runs["pretrain"], runs["finetune"], runs["scratch"]
    assert pretrain.data.params["data.classes"] == "[0, 1, 2, 3, 4]"
    assert finetune.data.params["model.weights"] == f"runs:/{pretrain.info.run_id}"
    assert finetune.data.params["model.pretrained"] == "True" and scratch.data.params["model.pretrained"] == "False"
    assert finetune.data.params["model.reset_head"] == "True", "digits 5–9 are new classes: a fresh head"
    for run in (finetune, scratch):  # the same few images of 5–9, the same schedule, every layer training
        assert run.data.params["data.classes"] == "[5, 6, 7, 8, 9]" and run.data.params["data.train_per_class"] == "2"
        assert run.data.params["finetune.name"] == "full"
    trainable = [m.value for m in client.get_metric_history(finetune.info.run_id, "model/trainable_params")]
    assert trainable[0] == trainable[-1] == scratch.data.metrics["model/trainable_params"], "every layer trains"


@pytest.mark.fresh_store
def test_a_wrong_number_of_draws_is_refused_before_anything_trains(root: Path) -> None:
    done = run_cli("pipeline.transfer_digits", "--draws", "0", root=root)
    assert done.returncode == 2 and "--draws '0': must be an integer >= 1 (e.g. --draws 3)" in done.stderr
    assert not (root / "mlruns").exists()

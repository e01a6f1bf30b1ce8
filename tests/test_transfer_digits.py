"""`python -m pipeline.transfer_digits`, reduced to a few batches: all three stages run through run(cfg), the
fine-tuning stage starts from the pretraining run, and MLflow holds the three runs tagged for comparison.

The accuracy claim (fine-tuned clearly above scratch) is measured with the full preset: README.md and
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow

from tests.conftest import run_cli, store_uri

REDUCED = (
    "trainer.max_epochs=6",  # gradual unfreezes the backbone at epoch 5: the last one
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)


def test_the_reduced_preset_runs_all_stages_and_mlflow_compares_them(root: Path) -> None:
    done = run_cli("pipeline.transfer_digits", *REDUCED, root=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("pretrain", "finetune", "scratch"):
        assert re.search(rf"{stage}\s*│\s*[0-9.]+\s*│\s*[0-9.]+\s*│\s*[0-9a-f]{{32}}", done.stdout), done.stdout
    assert "fine-tuned − scratch on digits 5–9:" in done.stdout

    client = mlflow.MlflowClient(store_uri(root))
    experiment = client.get_experiment_by_name("transfer_digits")
    runs = {r.data.tags["transfer_stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pretrain", "finetune", "scratch"}
    assert {r.data.tags["preset"] for r in runs.values()} == {"transfer_digits"}
    assert len({r.data.tags["transfer_group"] for r in runs.values()}) == 1, "one invocation, one group"
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in runs.values())

    pretrain, finetune, scratch = runs["pretrain"], runs["finetune"], runs["scratch"]
    assert pretrain.data.params["data.classes"] == "[0, 1, 2, 3, 4]"
    assert finetune.data.params["model.weights"] == f"runs:/{pretrain.info.run_id}"
    assert finetune.data.params["model.pretrained"] == "True" and scratch.data.params["model.pretrained"] == "False"
    for run in (finetune, scratch):  # the same few images of 5–9
        assert run.data.params["data.classes"] == "[5, 6, 7, 8, 9]" and run.data.params["data.train_per_class"] == "5"
    assert finetune.data.params["finetune.name"] == "gradual" and scratch.data.params["finetune.name"] == "full"

    trainable = [m.value for m in client.get_metric_history(finetune.info.run_id, "model/trainable_params")]
    assert trainable[0] < trainable[-1] == scratch.data.metrics["model/trainable_params"], "head first, then all"

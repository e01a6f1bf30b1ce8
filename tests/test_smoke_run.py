"""The smoke test people type, `python -m pipeline.train trainer.max_epochs=1`: it trains, with the preset's warm-up
shortened to fit, said once and logged; and it goes to the experiment MLflow's own MLFLOW_EXPERIMENT_NAME names."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.conftest import clean_env, run_cli, store_uri

pytestmark = pytest.mark.e2e

EXPERIMENT = "smoke tests"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("smoke")
    done = run_cli(
        "pipeline.train",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",  # fewer batches, the same warm-up: it is counted in epochs
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        root=root,
        env=clean_env(MLFLOW_EXPERIMENT_NAME=EXPERIMENT),
    )
    return root, done


def the_run(root: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    return run


def test_a_run_shorter_than_its_warmup_trains_and_says_so_once(smoke: tuple[Path, subprocess.CompletedProcess]) -> None:
    root, done = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "warmup" in line]
    assert said == [
        "warning: scheduler.warmup_epochs=1 does not fit in trainer.max_epochs=1: warming up for 0.5 epochs instead "
        "(logged as scheduler.warmup_epochs_used)"
    ]
    run = the_run(root)
    assert run.info.status == "FINISHED"
    assert run.data.params["scheduler.warmup_epochs"] == "1", "the config as given"
    assert run.data.params["scheduler.warmup_epochs_used"] == "0.5", "the warm-up it trained with"


def test_the_run_goes_to_the_experiment_mlflow_experiment_name_names(
    smoke: tuple[Path, subprocess.CompletedProcess],
) -> None:
    root, _ = smoke
    client = mlflow.MlflowClient(store_uri(root))
    assert client.get_experiment_by_name("digits") is None, "not the data set's experiment"
    assert the_run(root).data.tags["logger.experiment_name"] == EXPERIMENT

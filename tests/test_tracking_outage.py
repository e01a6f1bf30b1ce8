"""A tracking server that dies mid-run loses nothing: the run trains to the end with everything on local disk, says
how to upload it, and `python -m pipeline.sync` puts every metric point, param, artifact, dataset input and the MLflow
model on the restarted server, into the same run; syncing again sends nothing twice."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.tracking.record import RECORD_FOLDER, RunRecord
from tests.conftest import QUIET, REPO, clean_env
from tests.helpers.commands import run_module, start_module
from tests.helpers.mlflow_server import free_port, start, stop, wait_until_closed
from tests.helpers.postgres import Database

pytestmark = pytest.mark.e2e

EPOCHS = 30  # long enough to outlast the first send (metric points go out every 2 s): the server dies mid-run
SMALL = ("trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2")
EXPERIMENT = "outage"


def points(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> set[tuple[str, int, int, float]]:
    """Every metric point the server holds for the run, but MLflow's system metrics: its monitor sends those itself,
    they are not in the run's record."""
    return {
        (m.key, m.step, m.timestamp, m.value)
        for key in run.data.metrics
        if not key.startswith("system/")
        for m in client.get_metric_history(run.info.run_id, key)
    }


def only_run(client: mlflow.MlflowClient) -> mlflow.entities.Run:
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    return run


def epoch_logged(client: mlflow.MlflowClient) -> bool:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return bool(experiment and client.search_runs([experiment.experiment_id], "metrics.`val/acc` >= 0"))


def sync(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("pipeline.sync", args, cwd=REPO, env=clean_env(), timeout=120)


def test_run_outlives_its_server_and_sync_uploads_every_point(root: Path, postgres: Database) -> None:
    artifacts, port = root / "artifacts", free_port()
    url, server = start(postgres.tcp_uri, artifacts, port=port)
    output, errors = root / "train.out", root / "train.err"
    training = start_module(
        "pipeline.train",
        [
            f"paths.root={root}", f"paths.output_dir={root}/run", *QUIET, f"logger.tracking_uri={url}",
            f"logger.experiment_name={EXPERIMENT}", f"trainer.max_epochs={EPOCHS}", *SMALL,
            "logger.http.max_retries=1", "logger.http.backoff_factor=0", "logger.http.timeout=5",
        ],
        cwd=REPO, env=clean_env(), stdout=output, stderr=errors,
    )  # fmt: skip
    try:
        client = mlflow.MlflowClient(url)
        deadline = time.monotonic() + 120
        while not epoch_logged(client):
            assert training.poll() is None, errors.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch reached the server within 120 s"
            time.sleep(0.2)
        stop(server, signal.SIGKILL)  # the server dies after the first epoch
        training.wait(timeout=240)
    finally:
        stop(server)
        if training.poll() is None:
            training.kill()
            training.wait()
    stdout, stderr = output.read_text(), errors.read_text()

    assert training.returncode == 3, stderr[-3000:]
    assert "Training goes on." in stderr, "said once, when it happened"
    assert f"Everything is kept in {root}/run: when the server is back, upload it with\n" in stderr
    assert f"  python -m pipeline.sync {root}/run" in stderr
    assert "test/acc" in stdout, "the run trained and tested to the end"
    (record_folder,) = (root / "run" / RECORD_FOLDER).iterdir()
    recorded = RunRecord.load(record_folder)
    assert recorded.status == "FINISHED" and recorded.unsynced
    assert recorded.model is not None and recorded.model["model_id"] is None, "the model waits in the output folder"
    assert (root / "run" / "model" / "MLmodel").is_file()

    wait_until_closed(port)
    url, server = start(postgres.tcp_uri, artifacts, port=port)  # restarted on the same database
    try:
        before = only_run(client)
        assert before.info.status == "RUNNING" and before.info.run_id == recorded.run_id
        assert "test/acc" not in before.data.metrics, "the server died before the end of the run"
        # Its process is gone, but the run ended: closing it as killed would be a lie. It is left to pipeline.sync.
        looked = sync("--close-stale", "--tracking-uri", url)
        assert looked.returncode == 0, looked.stderr[-3000:]
        assert f"ended FINISHED but MLflow lacks part of it: python -m pipeline.sync {root}/run" in looked.stdout
        assert only_run(client).info.status == "RUNNING"

        done = sync(str(root / "run"))
        assert done.returncode == 0, done.stderr[-3000:]
        run = only_run(client)
        assert run.info.run_id == recorded.run_id, "uploaded into the run it started"
        assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
        local = {(m.key, m.step, m.timestamp, m.value) for m in RunRecord.load(record_folder).metrics()}
        assert points(client, run) == local, "every metric point, with its step and time"
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == EPOCHS
        assert run.data.params == recorded.params
        artifacts_logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "data", "figures"} <= artifacts_logged
        (output,) = run.outputs.model_outputs
        model = client.get_logged_model(output.model_id)
        assert str(model.status) == "READY" and model.source_run_id == run.info.run_id
        assert {m.key: m.dataset_name for m in model.metrics}["test/acc"] == "digits-test"
        contexts = {tag.value for item in run.inputs.dataset_inputs for tag in item.tags}
        assert contexts == {"training", "validation", "test"}, "logged before the server died, not again"
        assert RunRecord.load(record_folder).model["model_id"] == model.model_id
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert figures == {
            "figures/augmentation_preview.png",
            "figures/confusion_matrix.png",
            "figures/class_activation.png",
        }
        assert RunRecord.load(record_folder).unsynced is None

        again = sync(str(root))  # any folder above the run will do
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"0 params, 0 tags, 0 metric points ({len(local)} already there)" in again.stdout
        assert "0 dataset inputs, its model already there" in again.stdout
        assert points(client, only_run(client)) == local
        assert len(only_run(client).outputs.model_outputs) == 1
    finally:
        stop(server)


def test_sync_of_a_folder_without_runs_says_what_it_wants(root: Path) -> None:
    done = sync(str(root))
    assert done.returncode == 2
    assert f"error: {root}: no run records" in done.stderr and "outputs/<date>/<time>" in done.stderr

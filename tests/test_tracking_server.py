"""Pointing logger.tracking_uri at an MLflow server works unchanged: the run, its metrics, artifacts and MLflow model
land there, and the model is read back through the server."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline.source import load_source
from tests.conftest import run_cli
from tests.helpers.mlflow_server import mlflow_server

pytestmark = pytest.mark.e2e


@pytest.mark.fresh_store
def test_training_logs_to_a_tracking_server(root: Path) -> None:
    with mlflow_server(f"sqlite:///{root}/server.db", root / "server-artifacts") as url:
        done = run_cli("pipeline.train", f"logger.tracking_uri={url}", "trainer.max_epochs=2", root=root)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"open {url} in a browser" in done.stdout

        client = mlflow.MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
        assert "test/acc" in run.data.metrics
        folders = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "figures"} <= folders
        (output,) = run.outputs.model_outputs
        assert str(client.get_logged_model(output.model_id).status) == "READY"
        source = load_source(run.info.run_id, url)  # what evaluate and predict read: the model, through the server
        assert source.checkpoint == f"models:/{output.model_id}" and source.classes == [str(d) for d in range(10)]
    assert not (root / "mlruns").exists(), "nothing was written to the local store"
    assert any((root / "server-artifacts").rglob("weights.safetensors")), "the model went through the server's proxy"

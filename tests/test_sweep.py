"""Ray Tune sweeps end to end on a real local Ray runtime, each inside its own network and PID namespace: ASHA over
models and learning rates, nested MLflow runs named by their values, the best config retrained and registered; a bad
search space and a sweep whose every trial fails. (Recovery: test_sweep_recovery.py; several nodes and several
workers per trial: test_sweep_nodes.py — separate files, so that the test workers share them out.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO, run_cli, store_uri
from tests.helpers.isolation import isolated, run_isolated
from tests.helpers.sweeps import ROOT_ONLY, epochs_logged, ray_folder, runs, sweep_command, trial_table

pytestmark = [pytest.mark.e2e, ROOT_ONLY]


@pytest.fixture(scope="module")
def asha(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Iterator[tuple[Path, str]]:
    """One ASHA sweep over models and learning rates (5 trials, the best registered), read by the tests below: a
    sweep is a minute of CPU, so the file runs it once."""
    root = tmp_path_factory.mktemp("asha")
    (root / "mlruns").mkdir()
    shutil.copyfile(empty_store, root / "mlruns" / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch, ray_folder() as ray_tmp:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        command = sweep_command(
            root, ray_tmp, "sweep=models", "sweep.num_samples=5", "sweep.grace_period=1",
            "sweep.register_best=digits-best",
        )  # fmt: skip
        output = run_isolated(command, root / "sweep.log", timeout=420)
        yield root, output


def test_asha_sweep_over_lr_and_model_nests_every_trial(asha: tuple[Path, str]) -> None:
    root, output = asha
    assert "Retrain it: python -m pipeline.train --config-dir" in output
    assert "Best trial's model: models:/digits-best/1" in output

    parent, children = runs(root)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.params.model"] == "choice(lenet5, nin)"
    assert "best/val/acc" in parent.data.metrics and "sweep/ray_startup_s" in parent.data.metrics
    assert len(children) == 5, "one nested run per trial"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.name"] in {"lenet5", "nin"} and float(child.data.params["optim.lr"]) > 0
        steps = epochs_logged(root, child)
        assert steps and len(steps) == len(set(steps)), "per-epoch metrics, no step twice"
    stopped = [c for c in children if c.data.tags.get("sweep.stopped_early") == "true"]
    assert stopped, "ASHA stopped some trials early"
    assert all("test/acc" not in c.data.metrics for c in stopped)
    assert any("test/acc" in c.data.metrics for c in children), "the promoted trials ran to the end and were tested"
    assert {row["outcome"] for row in trial_table(root)} <= {"completed", "stopped early"}
    artifacts = {a.path for a in mlflow.MlflowClient(store_uri(root)).list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "figures", "best"} <= artifacts
    assert (root / "sweeps" / "s" / "parallel_coordinates.png").read_bytes()[:4] == b"\x89PNG"
    trials = list((root / "sweeps" / "s").glob("train_trial_*"))
    assert len(trials) == 5 and all((t / "progress.csv").exists() and (t / "result.json").exists() for t in trials)
    assert not list((root / "sweeps").rglob("events.out.tfevents*")), "no TensorBoard files: the trials log to MLflow"


def test_the_best_trial_that_ran_to_its_test_is_registered_and_its_config_retrains(asha: tuple[Path, str]) -> None:
    root, _ = asha
    parent, children = runs(root)
    client = mlflow.MlflowClient(store_uri(root))
    registered = client.get_model_version("digits-best", "1")
    completed = [c for c in children if "test/acc" in c.data.metrics]
    best_completed = max(
        completed, key=lambda c: max(m.value for m in client.get_metric_history(c.info.run_id, "val/acc"))
    )
    assert registered.run_id == best_completed.info.run_id, "the best trial that ran to its test"
    assert registered.source.startswith("models:/m-") and parent.data.tags["best.registered_model"] == "digits-best/1"

    folder = root / "sweeps" / "s"
    retrain = run_cli("pipeline.train", "--config-dir", str(folder), "--config-name", "best_config", root=root)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    best_model = parent.data.tags["best.model"]
    retrained = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.mlflow.parentRunId IS NULL and tags.`sweep.role` IS NULL"
    )
    assert len(retrained) == 1 and retrained[0].data.params["model.name"] == best_model


def test_sweep_trials_are_named_by_their_values_and_their_command_trains_them_again(asha: tuple[Path, str]) -> None:
    from tests.test_mlflow_ui import assert_reproduces

    root, _ = asha
    parent, children = runs(root)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["mlflow.source.name"].endswith("pipeline/sweep/__main__.py")
    assert parent.data.tags["command"].startswith("python -m pipeline.sweep ")
    for run in (parent, *children):
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.git.commit"] == head
    for child in children:
        # the sweep, the trial's number, its sampled values (two digits), not Ray's trial id
        assert re.fullmatch(r"s/00[0-4] model=(lenet5|nin) lr=\S+", child.info.run_name), child.info.run_name
        shown = dict(part.split("=") for part in child.info.run_name.split()[1:])
        assert shown["model"] == child.data.params["model.name"]
        assert float(shown["lr"]) == pytest.approx(float(child.data.params["optim.lr"]), rel=0.05)
        # its source is the training command, not Ray's worker; its command composes exactly its config
        assert child.data.tags["mlflow.source.name"].endswith("pipeline/train.py")
        assert_reproduces(child.data.tags["command"], child.data.params, "pipeline.train")
        assert f"optim.lr={child.data.params['optim.lr']}" in child.data.tags["command"].split()
    assert sorted(child.info.run_name[:5] for child in children) == [f"s/00{n}" for n in range(5)]


def test_bad_search_space_fails_before_ray_starts_and_the_driver_imports_no_training(root: Path, ray_tmp: str) -> None:
    """The driver composes, checks and opens runs; the trials train. It reaches the search space's check with the
    sweep's tracking code imported, and neither Lightning nor torch (seconds of CPU a sweep would wait for)."""
    python, *command = sweep_command(root, ray_tmp, "sweep.params={optim.lrr: 'interval(0.01, 0.1)'}")
    process = isolated([python, "-X", "importtime", *command], root / "bad.log")
    assert process.wait(timeout=120) == 2
    output = (root / "bad.log").read_text()
    assert "'optim.lrr' is not a config key or group. Close matches: optim.lr" in output
    assert "Ray" not in output and not (root / "sweeps").exists()
    imported = {line.rsplit("|", 1)[1].strip() for line in output.splitlines() if line.startswith("import time:")}
    assert "pipeline.sweep.tracking" in imported and "pipeline.tracking.status" in imported
    assert not imported & {"lightning", "torch", "timm", "pipeline.run"}, "the driver imported the training"


def test_sweep_whose_every_trial_fails_fails_and_names_no_best_trial(root: Path, ray_tmp: str) -> None:
    diverging = ("sweep.params={optim.lr: 'interval(1e20, 1e21)'}", "model.kwargs.act=relu", "sweep.max_failures=0")
    command = sweep_command(root, ray_tmp, "sweep.num_samples=2", "sweep.scheduler=fifo", *diverging)
    process = isolated(command, root / "sweep.log")
    assert process.wait(timeout=420) == 2, "the trials' config made them fail: a user's error"
    output = (root / "sweep.log").read_text()
    assert "error: every trial of sweep s failed (2 of 2)" in output and "training diverged" in output, output[-3000:]
    assert "Best trial" not in output and not (root / "sweeps" / "s" / "best_config.yaml").exists()
    parent, children = runs(root)
    assert parent.info.status == "FAILED" and "every trial" in parent.data.tags["failure"]
    assert "best/val/acc" not in parent.data.metrics
    assert [child.info.status for child in children] == ["FAILED", "FAILED"]
    assert {row["outcome"] for row in trial_table(root)} == {"failed"}

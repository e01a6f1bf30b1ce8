"""The production set-up under load: three trainings and a Ray Tune sweep log at the same time to `mlflow server` on
PostgreSQL, and the database holds every metric point of every run — none missing. Credentials come from the
environment and are never logged or printed.

The sweep runs in a private network namespace (Ray's rule here), which cannot reach the host's loopback: there it
logs to a second `mlflow server` on the same database, reached through PostgreSQL's unix socket (a file, which
every namespace can reach). Its runs are then read through the first server: one database holds them all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from pipeline.tracking.record import RECORD_FOLDER, RunRecord
from tests.conftest import QUIET, REPO, clean_env
from tests.helpers.commands import start_module
from tests.helpers.isolation import isolated
from tests.helpers.mlflow_server import Served
from tests.helpers.postgres import Database
from tests.helpers.sweeps import parent_and_trials

pytestmark = pytest.mark.e2e

EPOCHS = 3
SMALL = (
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.batch_size=32",
    "scheduler.warmup_epochs=0",
    "logger.log_checkpoint=false",
)
TRAININGS = 3
RACERS = 8  # runs logging one new dataset at the same moment
USER, SECRET = "ci-robot", "pa55-do-not-log-me"  # what MLFLOW_TRACKING_USERNAME / PASSWORD hold
CAN_ISOLATE = os.geteuid() == 0  # network namespaces (Ray's isolation) need root


@dataclass
class Outcome:
    root: Path
    url: str
    trainings: list[subprocess.CompletedProcess[str]]
    sweep_log: str | None  # None where Ray could not be isolated


@pytest.fixture(scope="module")
def concurrent(
    tracking_server: Served, postgres: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcome]:
    root = tmp_path_factory.mktemp("concurrent")
    env = clean_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=SECRET)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    sweep = None
    if CAN_ISOLATE:
        server = [sys.executable, "-m", "tests.helpers.mlflow_server"]
        serve = [*server, postgres.socket_uri, str(tracking_server.artifacts), "--"]
        sweep = isolated(
            [
                *serve, sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", *QUIET, *SMALL,
                "sweep=lr_wd", "sweep.name=s", "sweep.num_samples=2", "sweep.scheduler=fifo",
                "logger.experiment_name=concurrent-sweep", "ray.num_cpus=2", f"ray.temp_dir={ray_tmp}",
            ],
            root / "sweep.log",
            env,
        )  # fmt: skip
    trainings = []
    for i in range(TRAININGS):
        arguments = [
            f"paths.root={root}", f"paths.output_dir={root}/train{i}", *QUIET, *SMALL,
            f"logger.tracking_uri={tracking_server.url}", "logger.experiment_name=concurrent", f"seed={i}",
        ]  # fmt: skip
        logs = {"stdout": root / f"train{i}.out", "stderr": root / f"train{i}.err"}
        trainings.append(start_module("pipeline.train", arguments, cwd=REPO, env=env, **logs))
    try:
        done = [
            subprocess.CompletedProcess(
                p.args, p.wait(timeout=300), (root / f"train{i}.out").read_text(), (root / f"train{i}.err").read_text()
            )
            for i, p in enumerate(trainings)
        ]
        if sweep is not None:
            assert sweep.wait(timeout=300) == 0, (root / "sweep.log").read_text()[-4000:]
        yield Outcome(root, tracking_server.url, done, (root / "sweep.log").read_text() if sweep else None)
    finally:
        for process in [*trainings, *([sweep] if sweep else [])]:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def runs(client: mlflow.MlflowClient, experiment: str) -> list[mlflow.entities.Run]:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def assert_every_point_on_the_server(client: mlflow.MlflowClient, run: mlflow.entities.Run, output_dir: Path) -> None:
    """The server holds exactly the points the run recorded locally, and those are what the run should log."""
    run_id = run.info.run_id
    # MLflow's system-metrics monitor sends system/* itself: they are not in the run's record.
    keys = [key for key in run.data.metrics if not key.startswith("system/")]
    history = [m for key in keys for m in client.get_metric_history(run_id, key)]
    held = {(m.key, m.step, m.timestamp, m.value) for m in history}
    record = RunRecord.load(output_dir / RECORD_FOLDER / run_id)
    recorded = {(m.key, m.step, m.timestamp, m.value) for m in record.metrics()}
    assert held == recorded, f"{run_id}: missing {sorted(recorded - held)[:5]}, extra {sorted(held - recorded)[:5]}"
    per_key = Counter(key for key, *_ in held)
    assert {"train/loss", "val/acc", "lr-SGD", "test/acc", "model/flops"} <= per_key.keys()
    for key, count in per_key.items():
        if key.startswith(("train/", "val/", "lr-")):
            assert count == EPOCHS, f"{run_id} {key}: {count} points for {EPOCHS} epochs"
        elif key.startswith("test/") or key in ("model/params", "model/flops"):
            assert count == 1, f"{run_id} {key}: {count} points"


def test_trainings_and_a_sweep_at_once_lose_no_metric_point(concurrent: Outcome) -> None:
    for done in concurrent.trainings:
        assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(concurrent.url)
    trainings = runs(client, "concurrent")
    assert len(trainings) == TRAININGS and {r.info.status for r in trainings} == {"FINISHED"}
    outputs = {r.info.run_id: concurrent.root / f"train{r.data.params['seed']}" for r in trainings}
    for run in trainings:
        assert_every_point_on_the_server(client, run, outputs[run.info.run_id])

    if concurrent.sweep_log is None:
        pytest.skip("the sweep part needs root (network namespaces)")
    swept = runs(client, "concurrent-sweep")  # logged through the namespace's server, read through this one
    parent, trials = parent_and_trials(swept)
    assert parent.info.status == "FINISHED" and len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED"
        output = concurrent.root / "sweeps" / "s" / "trials" / trial.data.tags["sweep.trial_id"]
        assert_every_point_on_the_server(client, trial, output)


def test_credentials_from_the_environment_are_never_logged_or_printed(concurrent: Outcome) -> None:
    for done in concurrent.trainings:
        assert SECRET not in done.stdout + done.stderr
    client = mlflow.MlflowClient(concurrent.url)
    for run in runs(client, "concurrent"):
        assert SECRET not in json.dumps([run.data.params, run.data.tags])
        config = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="config.yaml", tracking_uri=concurrent.url
        )
        assert SECRET not in Path(config).read_text() and USER not in Path(config).read_text()
        # the user name is MLflow's record of who ran it (the mlflow.user tag), and nowhere else
        assert [key for key, value in run.data.tags.items() if USER in value] == ["mlflow.user"]
        assert USER not in json.dumps(run.data.params)
    for record in concurrent.root.rglob("run.json"):
        assert SECRET not in record.read_text()
    if concurrent.sweep_log is not None:
        assert SECRET not in concurrent.sweep_log


def test_runs_logging_one_new_dataset_at_once_each_have_it(tracking_server: Served) -> None:
    """MLflow's store inserts a dataset it has not seen without a lock: runs that log the same new dataset at the same
    moment (trainings started together on one data set) race for the insert. Every run ends up with it all the same."""
    from mlflow.entities import Dataset, DatasetInput

    from pipeline.tracking.datasets import log_inputs

    client = mlflow.MlflowClient(tracking_server.url)
    experiment = client.create_experiment(f"dataset-race-{os.getpid()}-{time.time_ns()}")
    runs = [client.create_run(experiment).info.run_id for _ in range(RACERS)]
    dataset = Dataset(name="digits-train", digest=f"{time.time_ns() % 16**8:08x}", source_type="code", source="{}")
    start = threading.Barrier(RACERS)
    failures: list[BaseException] = []

    def race(run_id: str) -> None:
        own = mlflow.MlflowClient(tracking_server.url)
        start.wait()
        try:
            log_inputs(own, run_id, [DatasetInput(dataset)])  # with one attempt, some of the 8 fail here
        except BaseException as error:  # collected for the assertion below
            failures.append(error)

    threads = [threading.Thread(target=race, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    for run_id in runs:
        (linked,) = client.get_run(run_id).inputs.dataset_inputs
        assert linked.dataset.digest == dataset.digest

"""A sweep across two hosts that share only a network, a storage folder and the team's tracking server: host A runs
the MLflow server (on PostgreSQL), the Ray head and the sweep's driver; host B a Ray worker. Each host has its own
address, hostname, /tmp and processes (tests/helpers/hosts.py). What cannot work across them is refused first."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, clean_env
from tests.helpers.hosts import Host, can_make_hosts, two_hosts
from tests.helpers.postgres import Database

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(can_make_hosts() is not None, reason=str(can_make_hosts()))]

BIN = Path(sys.executable).parent
RAY_PORT, MLFLOW_PORT = 6379, 5000  # each host has its own ports: nothing else listens there
FAST = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "data.batch_size=32", "scheduler.warmup_epochs=0", "logger.log_checkpoint=false",
    "sweep=lr_wd", "sweep.num_samples=2", "sweep.scheduler=fifo", "sweep.name=across",
    "logger.experiment_name=two-hosts",
]  # fmt: skip


@dataclass
class Cluster:
    a: Host
    b: Host
    shared: Path  # the shared storage, as the hosts see it
    outside: Path  # the same folder, as this machine sees it
    server: str  # the tracking server on host A, as both hosts reach it
    env: dict[str, str]

    def command(self, *overrides: str) -> list[str]:
        """The sweep driver's command, for host A."""
        return [
            str(BIN / "python"), "-m", "pipeline.sweep", f"paths.root={self.shared}", *QUIET, *FAST,
            f"ray.address={self.a.address}:{RAY_PORT}", f"logger.tracking_uri={self.server}",
            f"sweep.storage_path={self.shared}/sweeps", *overrides,
        ]  # fmt: skip

    def sweep(self, *overrides: str) -> tuple[int, str]:
        """The sweep driver, run on host A; its exit status and output."""
        done = self.a.run(self.command(*overrides), self.env, timeout=420, check=False)
        return done.returncode, done.stdout + done.stderr

    def trials(self, client: mlflow.MlflowClient, name: str) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
        """Sweep `name`'s parent run and its trials' runs, read from the server's database."""
        experiment = client.get_experiment_by_name("two-hosts")
        everything = client.search_runs([experiment.experiment_id], f"tags.`sweep.name` = '{name}'")
        (parent,) = [r for r in everything if r.data.tags.get("sweep.role") == "parent"]
        return parent, [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _wait_for_server(host: Host, url: str, env: dict[str, str], timeout: float = 90) -> None:
    probe = f"import urllib.request; urllib.request.urlopen('{url}/health', timeout=2)"
    deadline = time.monotonic() + timeout
    while host.run([str(BIN / "python"), "-c", probe], env, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"the MLflow server on {host.name} did not answer at {url}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(postgres: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    outside = tmp_path_factory.mktemp("two-hosts") / "shared"
    with two_hosts(outside) as (a, b, shared):
        home = shared / "home"  # Ray's auth token in ~/.ray: the same on both hosts, as on a real cluster
        env = clean_env(HOME=str(home))
        (outside / "home").mkdir()
        log = outside / "hosts.log"
        server = f"http://{a.address}:{MLFLOW_PORT}"
        a.start(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres.socket_uri, "--artifacts-destination",
             f"{shared}/artifacts", "--host", a.address, "--port", str(MLFLOW_PORT), "--workers", "1"],
            {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log,
        )  # fmt: skip
        ray = [str(BIN / "ray"), "start", "--num-cpus=1", "--disable-usage-stats"]
        head = ["--head", f"--node-ip-address={a.address}", f"--port={RAY_PORT}", "--include-dashboard=false"]
        a.run([*ray, *head], env)
        b.run([*ray, f"--address={a.address}:{RAY_PORT}", f"--node-ip-address={b.address}"], env)
        _wait_for_server(b, server, env)  # reached from the other host
        yield Cluster(a, b, shared, outside, server, env)


def test_what_cannot_work_across_hosts_is_refused_before_the_sweep_starts(cluster: Cluster) -> None:
    status, output = cluster.sweep("logger.tracking_uri=sqlite:////tmp/mlruns/mlflow.db")
    assert status == 2 and "Traceback" not in output, output[-3000:]
    assert "is a store on this host's disk, which trials on the cluster's other host(s) (10.77.0.2)" in output
    assert f"logger.tracking_uri=http://{cluster.a.address}:5000" in output, "the fix names this host's address"

    status, output = cluster.sweep("sweep.storage_path=/tmp/sweeps")  # each host has its own /tmp
    assert status == 2 and "Traceback" not in output, output[-3000:]
    assert "sweep.storage_path=/tmp/sweeps is not shared: node(s) 10.77.0.2 (node " in output
    assert not (cluster.outside / "sweeps").exists(), "no sweep was started"


def test_a_sweep_runs_its_trials_on_both_hosts_logging_to_the_team_server(cluster: Cluster, postgres: Database) -> None:
    status, output = cluster.sweep()
    assert status == 0, output[-4000:]
    client = mlflow.MlflowClient(postgres.tcp_uri)  # the server's database, read from this machine
    parent, trials = cluster.trials(client, "across")
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert len({trial.data.tags["sweep.node_id"] for trial in trials}) == 2, "one trial on each host"
    for trial in trials:
        assert trial.info.status == "FINISHED" and "test/acc" in trial.data.metrics
        assert len(client.get_metric_history(trial.info.run_id, "val/acc")) == 2
        # its checkpoints were written on its host into the shared storage, where the driver's host sees them
        folder = cluster.outside / "sweeps" / "across" / "trials" / trial.data.tags["sweep.trial_id"]
        assert list((folder / "checkpoints").glob("best-*.ckpt")), f"no checkpoint in {folder}"


def trials_on(host: Host) -> list[int]:
    """The Ray worker processes running a trial on `host`."""
    return [*host.processes(b"ImplicitFunc"), *host.processes(b"train_trial")]


def test_a_trial_killed_on_the_second_host_is_retried_from_its_checkpoint(cluster: Cluster, postgres: Database) -> None:
    epochs = 6
    log = cluster.outside / "retry.log"
    driver = cluster.a.start(
        cluster.command(
            "sweep.name=retry", "sweep.max_failures=2", f"trainer.max_epochs={epochs}",
            "trainer.limit_train_batches=null",  # epochs of seconds: time to see both trials checkpoint, then kill one
        ),
        cluster.env,
        log,
    )  # fmt: skip
    folder = cluster.outside / "sweeps" / "retry"
    try:
        deadline = time.monotonic() + 240
        # Both trials have checkpointed once (one runs on each host): then host B's trial dies.
        while len({p.parent for p in folder.glob("train_trial_*/checkpoint_*")}) < 2 or not trials_on(cluster.b):
            assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        for pid in trials_on(cluster.b):
            os.kill(pid, signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    client = mlflow.MlflowClient(postgres.tcp_uri)
    _, trials = cluster.trials(client, "retry")
    assert len(trials) == 2, "the retried trial continued its own run"
    for trial in trials:
        assert trial.info.status == "FINISHED" and "test/acc" in trial.data.metrics
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/acc")]
        assert steps == list(range(epochs)), "each epoch logged exactly once, the retry continuing where it stopped"
    assert "Restoring states from the checkpoint" in log.read_text()

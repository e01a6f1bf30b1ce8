"""Two hosts that share only a network, a storage folder and the team's tracking server: host A runs the MLflow
server (on PostgreSQL), the Ray head and the sweep's driver; host B a Ray worker. Each host has its own address,
hostname, /tmp and processes (tests/helpers/hosts.py); neither host's name resolves to its address, as on many real
hosts. A sweep runs its trials on both (one process each, or data-parallel over both), survives a trial's death and
its driver's; torchrun trains one run over both; what cannot work across them is refused first."""

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
from tests.helpers.hosts import Host, can_make_hosts, start_tracking_server, two_hosts, wait_for_server
from tests.helpers.postgres import Database
from tests.helpers.sweeps import TRIAL_MARKERS, parent_and_trials

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(can_make_hosts() is not None, reason=str(can_make_hosts()))]

BIN = Path(sys.executable).parent
RAY_PORT = 6379  # each host has its own ports: nothing else listens there
FAST = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "data.batch_size=32", "scheduler.warmup_epochs=0", "logger.log_checkpoint=false",
    "class_activation.images=0", "sweep=lr_wd", "sweep.num_samples=2", "sweep.scheduler=fifo", "sweep.name=across",
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
        return parent_and_trials(everything)


@pytest.fixture(scope="module")
def cluster(postgres: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    outside = tmp_path_factory.mktemp("two-hosts") / "shared"
    with two_hosts(outside) as (a, b, shared):
        home = shared / "home"  # Ray's auth token in ~/.ray: the same on both hosts, as on a real cluster
        env = clean_env(HOME=str(home))
        (outside / "home").mkdir()
        log = outside / "hosts.log"
        server = start_tracking_server(a, postgres.socket_uri, shared, env, log)
        ray = [str(BIN / "ray"), "start", "--num-cpus=1", "--disable-usage-stats"]
        head = ["--head", f"--node-ip-address={a.address}", f"--port={RAY_PORT}", "--include-dashboard=false"]
        a.run([*ray, *head], env)
        b.run([*ray, f"--address={a.address}:{RAY_PORT}", f"--node-ip-address={b.address}"], env)
        wait_for_server(b, server, env)  # reached from the other host too
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


@pytest.fixture(scope="module")
def across(cluster: Cluster) -> str:
    """The sweep `across` (two one-process trials), run once: its output."""
    status, output = cluster.sweep()
    assert status == 0, output[-4000:]
    return output


def test_a_sweep_runs_its_trials_on_both_hosts_logging_to_the_team_server(
    cluster: Cluster, postgres: Database, across: str
) -> None:
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


def trained(run: mlflow.entities.Run) -> set[str]:
    """The names of the metrics the training logged (not MLflow's timed samples of the machine)."""
    return {name for name in run.data.metrics if not name.startswith("system/")}


def trials_on(host: Host) -> list[int]:
    """The Ray worker processes running a trial on `host`."""
    return host.processes(*TRIAL_MARKERS)


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


def test_a_trial_spread_over_workers_on_both_hosts_makes_one_run(
    cluster: Cluster, postgres: Database, across: str
) -> None:
    """Each host gives Ray one CPU: with 0.9 per worker (and 0.01 for the trial itself) a trial's two workers cannot
    share a host, so the trial trains data-parallel across both, its process group formed over 10.77.0.0/24."""
    status, output = cluster.sweep(
        "sweep.name=workers", "sweep.num_samples=1", "sweep.resources.workers_per_trial=2",
        "sweep.resources.cpu=0.9",
    )  # fmt: skip
    assert status == 0, output[-4000:]
    client = mlflow.MlflowClient(postgres.tcp_uri)
    parent, trials = cluster.trials(client, "workers")
    _, single = cluster.trials(client, "across")
    assert parent.info.status == "FINISHED"
    assert len(trials) == 1, "one MLflow run for the trial, however many workers on however many hosts trained it"
    for trial in trials:
        assert trial.info.status == "FINISHED"
        hosts = trial.data.tags["sweep.worker_hosts"].split(",")
        assert sorted(hosts) == [cluster.a.address, cluster.b.address], "one worker on each host"
        # MLflow samples system/* every logger.system_metrics.interval seconds: a trial has them or not by its length
        assert trained(trial) == trained(single[0]), "the metrics a one-process trial logs"
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/acc")]
        assert steps == [0, 1], "one validation per epoch, logged once"


def started_by_others(host: Host, marker: bytes, unless: bytes) -> list[int]:
    """The processes on `host` whose command line holds `marker` but not `unless` (what started them)."""
    return [pid for pid in host.processes(marker) if unless not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_killed_driver_is_resumed_and_its_trials_continue_from_their_checkpoints(
    cluster: Cluster, postgres: Database
) -> None:
    epochs = 5
    log = cluster.outside / "resumed.log"
    overrides = ("sweep.name=resumed", f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=null")
    driver = cluster.a.start(cluster.command(*overrides), cluster.env, log)
    folder = cluster.outside / "sweeps" / "resumed"
    try:
        deadline = time.monotonic() + 240
        # Both trials have checkpointed and the sweep's state has been saved since: then the driver dies.
        while len({p.parent for p in folder.glob("train_trial_*/checkpoint_*")}) < 2:
            assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        seen = time.time()
        while not any(state.stat().st_mtime > seen for state in folder.glob("experiment_state*.json")):
            assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        (pid,) = started_by_others(cluster.a, b"pipeline.sweep", b"nsenter")
        os.kill(pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    status, output = cluster.sweep(*overrides, "resume=resumed")
    assert status == 0, output[-4000:]
    assert "Restoring states from the checkpoint" in output
    client = mlflow.MlflowClient(postgres.tcp_uri)
    parent, trials = cluster.trials(client, "resumed")
    assert parent.info.status == "FINISHED" and len(trials) == 2, "the sweep's own run and trials, continued"
    for trial in trials:
        assert trial.info.status == "FINISHED" and "test/acc" in trial.data.metrics
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/acc")]
        assert set(steps) == set(range(epochs)) and steps.count(0) == 1, f"continued, not started again: {steps}"


TORCHRUN_PORT = 29500


def private_root(case: str) -> str:
    """paths.root of a torchrun run: on each host's own disk (its /tmp), so the run's folder is the first host's."""
    return f"/tmp/{case}"


def torchrun(cluster: Cluster, rank: int, case: str, *overrides: str) -> list[str]:
    """One node of `torchrun --nnodes=2`: one process on each host, host A's the first; the run tagged `case`."""
    return [
        str(BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
        f"--master-addr={cluster.a.address}", f"--master-port={TORCHRUN_PORT}", "-m", "pipeline.train",
        f"paths.root={private_root(case)}", f"+logger.tags.case={case}", *QUIET,
        "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2",
        "data.batch_size=32", "scheduler.warmup_epochs=0", "logger.log_checkpoint=false",
        f"logger.tracking_uri={cluster.server}", "logger.experiment_name=two-hosts-ddp", *overrides,
    ]  # fmt: skip


def on_host(host: Host, path: str) -> Path:
    """`path` as `host` sees it (its own /tmp), from this machine."""
    return Path(f"/proc/{host.init_pid}/root{path}")


def ddp_runs(postgres: Database, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(postgres.tcp_uri)
    return client.search_runs([client.get_experiment_by_name("two-hosts-ddp").experiment_id], f"tags.`case` = '{name}'")


def test_torchrun_over_two_hosts_makes_one_run_with_one_folder_on_the_first(
    cluster: Cluster, postgres: Database
) -> None:
    short = ("trainer.max_epochs=2", "trainer.limit_train_batches=4")
    second = cluster.b.start(torchrun(cluster, 1, "short", *short), cluster.env, cluster.outside / "torchrun-b.log")
    try:
        first = cluster.a.run(torchrun(cluster, 0, "short", *short), cluster.env, timeout=300, check=False)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert second.wait(timeout=60) == 0, (cluster.outside / "torchrun-b.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert "effective batch size 64 (1 process × 32 × 2 nodes × 1 accumulated)" in first.stdout
    (run,) = ddp_runs(postgres, "short")  # one run, though a process on each host trained
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/samples"] == 270, "the test split counted once"
    assert run.data.params["trainer.num_nodes"] == "2"
    (folder,) = on_host(cluster.a, private_root("short")).glob("outputs/*/*/checkpoints")
    assert run.data.tags["output_dir"] == str(folder.parent).removeprefix(str(on_host(cluster.a, "")))
    assert list(folder.glob("best-*.ckpt"))
    assert not list(on_host(cluster.b, private_root("short")).rglob("*.ckpt")), "the second host writes no checkpoint"


def test_a_process_killed_on_the_second_host_fails_the_torchrun_run_which_resumes(
    cluster: Cluster, postgres: Database
) -> None:
    log_a, log_b = cluster.outside / "killed-a.log", cluster.outside / "killed-b.log"
    second = cluster.b.start(torchrun(cluster, 1, "killed", "trainer.max_epochs=200"), cluster.env, log_b)
    first = cluster.a.start(torchrun(cluster, 0, "killed", "trainer.max_epochs=200"), cluster.env, log_a)
    try:
        deadline = time.monotonic() + 180
        while not list(on_host(cluster.a, private_root("killed")).glob("outputs/*/*/checkpoints/last.ckpt")):
            assert first.poll() is None and time.monotonic() < deadline, log_a.read_text()[-3000:]
            time.sleep(0.5)
        (rank_one,) = started_by_others(cluster.b, b"pipeline.train", b"torchrun")  # not its agent: the worker
        os.kill(rank_one, signal.SIGKILL)
        killed = time.monotonic()
        assert first.wait(timeout=120) != 0
        assert time.monotonic() - killed < 60, "the first host's process gave up promptly"
        second.wait(timeout=60)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
    (run,) = ddp_runs(postgres, "killed")
    assert run.info.status == "FAILED"
    assert cluster.b.address in run.data.tags["failure"], "the reason: the connection to host B's process broke"
    client = mlflow.MlflowClient(postgres.tcp_uri)
    trained = len(client.get_metric_history(run.info.run_id, "val/acc"))
    # Resumed on the first host, whose folder holds the checkpoint: the same run goes on from it.
    resumed = cluster.a.run(
        [
            str(BIN / "python"), "-m", "pipeline.train", f"resume={run.info.run_id}",
            f"paths.root={private_root('killed')}", *QUIET, "trainer.accelerator=cpu",
            f"trainer.max_epochs={trained + 2}", "trainer.limit_train_batches=4",
            "data.batch_size=32", "scheduler.warmup_epochs=0", "logger.log_checkpoint=false",
            f"logger.tracking_uri={cluster.server}", "logger.experiment_name=two-hosts-ddp",
        ],
        cluster.env,
    )  # fmt: skip
    assert resumed.returncode == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) > trained

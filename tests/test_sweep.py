"""Ray Tune sweeps end to end on a real local Ray runtime (and a real two-node cluster), each inside its own
network and PID namespace: ASHA, nested MLflow runs, retried trials, resumed sweeps, the best config."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, REPO, clean_env, run_cli, store_uri
from tests.helpers.isolation import isolated, run_isolated

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (Ray's isolation) need root"),
]

FAST = [  # small enough that a trial-epoch takes a second or two on one core
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.batch_size=32",
    "scheduler.warmup_epochs=0",
    "logger.log_checkpoint=false",
]


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """Ray's session folder: short (its socket paths must stay under 108 characters) and private."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def sweep_command(root: Path, ray_tmp: str, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", *QUIET, *FAST,
        "ray.num_cpus=2", f"ray.temp_dir={ray_tmp}", "sweep.name=s", *overrides,
    ]  # fmt: skip


def runs(root: Path) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    """The sweep's parent run and its children."""
    client = mlflow.MlflowClient(store_uri(root))
    everything = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    (parent,) = [r for r in everything if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def epochs_logged(root: Path, run: mlflow.entities.Run) -> list[int]:
    history = mlflow.MlflowClient(store_uri(root)).get_metric_history(run.info.run_id, "val/acc")
    return [m.step for m in history]


def trial_table(root: Path) -> list[dict[str, str]]:
    with (root / "sweeps" / "s" / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_asha_sweep_over_lr_and_model_nests_every_trial_and_its_best_config_retrains(root: Path, ray_tmp: str) -> None:
    command = sweep_command(
        root, ray_tmp, "sweep=models", "sweep.num_samples=5", "sweep.grace_period=1", "sweep.register_best=digits-best"
    )
    output = run_isolated(command, root / "sweep.log", timeout=420)
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
    retrained = mlflow.MlflowClient(store_uri(root)).search_runs(
        [parent.info.experiment_id], filter_string="tags.mlflow.parentRunId IS NULL and tags.`sweep.role` IS NULL"
    )
    assert len(retrained) == 1 and retrained[0].data.params["model.name"] == best_model


def test_bad_search_space_fails_before_ray_starts(root: Path, ray_tmp: str) -> None:
    process = isolated(
        sweep_command(root, ray_tmp, "sweep.params={optim.lrr: 'interval(0.01, 0.1)'}"), root / "bad.log"
    )
    assert process.wait(timeout=120) == 2
    output = (root / "bad.log").read_text()
    assert "'optim.lrr' is not a config key or group. Close matches: optim.lr" in output
    assert "Ray" not in output and not (root / "sweeps").exists()


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


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def trial_checkpoints(root: Path) -> list[Path]:
    return list((root / "sweeps" / "s").glob("train_trial_*/checkpoint_*"))


def trial_processes() -> list[int]:
    """Ray worker processes running a trial (visible from here: only the network namespace is private)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ImplicitFunc" in command or b"train_trial" in command:
                pids.append(int(entry.name))
    return pids


def test_killed_trial_is_retried_from_its_checkpoint(root: Path, ray_tmp: str) -> None:
    command = sweep_command(
        root, ray_tmp, "sweep=lr_wd", "sweep.num_samples=1", "sweep.scheduler=fifo", "sweep.max_failures=2",
        "trainer.max_epochs=8",
    )  # fmt: skip
    process = isolated(command, root / "sweep.log")
    try:
        wait_for(lambda: trial_checkpoints(root) and trial_processes(), 240, "a trial's first checkpoint")
        for pid in trial_processes():
            os.kill(pid, signal.SIGKILL)
        assert process.wait(timeout=300) == 0, (root / "sweep.log").read_text()[-4000:]
    finally:
        process.kill()
    _, (child,) = runs(root)
    assert child.info.status == "FINISHED" and "test/acc" in child.data.metrics
    assert epochs_logged(root, child) == sorted(set(epochs_logged(root, child)))
    assert len(epochs_logged(root, child)) == 8, "resumed where it stopped: each epoch logged exactly once"
    assert "Restoring states from the checkpoint" in (root / "sweep.log").read_text()


def test_sweep_whose_driver_is_killed_resumes_and_finishes_without_duplicates(root: Path, ray_tmp: str) -> None:
    overrides = ("sweep=lr_wd", "sweep.num_samples=2", "sweep.scheduler=fifo", "trainer.max_epochs=6")
    process = isolated(sweep_command(root, ray_tmp, *overrides), root / "first.log")
    try:
        wait_for(lambda: trial_checkpoints(root), 240, "a trial's first checkpoint")
    finally:
        process.kill()  # the driver and, with its namespace, Ray and every trial
        process.wait()
    assert runs(root)[0].info.status == "RUNNING"

    resume = [sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", "resume=s", "ray.num_cpus=2",
              f"ray.temp_dir={ray_tmp}"]  # fmt: skip
    run_isolated(resume, root / "resume.log", timeout=420)
    parent, children = runs(root)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2, "the resumed trials continued their own runs"
    for child in children:
        assert child.info.status == "FINISHED" and "test/acc" in child.data.metrics
        assert len(epochs_logged(root, child)) == len(set(epochs_logged(root, child))) == 6


def test_trials_spread_over_a_two_node_cluster_and_storage_a_node_cannot_see_is_refused(
    root: Path, ray_tmp: str
) -> None:
    ray = Path(sys.executable).with_name("ray")
    home = root / "home"  # Ray keeps an auth token under ~/.ray: the test cluster keeps its own
    home.mkdir()
    hidden = root / "hidden"  # the second node has its own (empty) folder mounted here: storage it does not share
    hidden.mkdir()
    port = 6390
    sweep = sweep_command(
        root,
        ray_tmp,
        "sweep=lr_wd",
        "sweep.num_samples=2",
        "sweep.scheduler=fifo",
        "trainer.max_epochs=2",
        f"ray.address=127.0.0.1:{port}",
    )
    script = f"""
set -e
{ray} start --head --port={port} --num-cpus=1 --temp-dir={ray_tmp} --include-dashboard=false --disable-usage-stats
unshare --mount sh -c 'mount -t tmpfs tmpfs {hidden} && exec {ray} start --address=127.0.0.1:{port} --num-cpus=1 \
    --disable-usage-stats'
set +e
{" ".join(sweep)} sweep.storage_path={hidden}
echo "refused with exit status $?"
set -e
{" ".join(sweep)}
"""  # fmt: skip
    output = run_isolated(["sh", "-c", script], root / "cluster.log", timeout=420, env=clean_env(HOME=str(home)))
    assert "refused with exit status 2" in output, output[-4000:]
    assert f"sweep.storage_path={hidden} is not shared: node(s) 127.0.0.1 (node " in output
    assert not list(hidden.iterdir()), "the refused sweep wrote nothing (its check file is gone)"
    _, children = runs(root)  # one parent run: the refused sweep opened none
    assert len(children) == 2
    assert len({child.data.tags["sweep.node_id"] for child in children}) == 2, "one trial on each node"


def test_trials_spread_over_two_ddp_workers_each_make_one_mlflow_child(root: Path, ray_tmp: str) -> None:
    overrides = ("sweep=lr_wd", "sweep.num_samples=2", "sweep.scheduler=fifo", "sweep.max_concurrent_trials=1")
    workers = ("sweep.resources.workers_per_trial=2", "sweep.resources.cpu=0.5", "trainer.max_epochs=2")
    workers += ("trainer.limit_test_batches=null",)
    run_isolated(sweep_command(root, ray_tmp, *overrides, *workers), root / "sweep.log", timeout=420)
    parent, children = runs(root)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2, "one MLflow run per trial, however many workers trained it"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.metrics["test/samples"] == 270, "the test split counted once, by the first worker"
        steps = epochs_logged(root, child)
        assert len(steps) == len(set(steps)) == 2, "one validation per epoch, logged once"
    assert {row["outcome"] for row in trial_table(root)} == {"completed"}


def test_sweep_trials_are_named_by_their_values_and_their_command_trains_them_again(root: Path, ray_tmp: str) -> None:
    from tests.test_mlflow_ui import assert_reproduces

    command = sweep_command(
        root, ray_tmp, "sweep=lr_wd", "sweep.num_samples=2", "sweep.scheduler=fifo", "trainer.max_epochs=1"
    )
    run_isolated(command, root / "sweep.log", timeout=300)
    parent, children = runs(root)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["mlflow.source.name"].endswith("pipeline/sweep/__main__.py")
    assert parent.data.tags["command"].startswith("python -m pipeline.sweep ")
    assert len(children) == 2
    for run in (parent, *children):
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.git.commit"] == head
    for child in children:
        lr, wd = float(child.data.params["optim.lr"]), float(child.data.params["optim.weight_decay"])
        # the sweep, the trial's number, its sampled values (two digits), not Ray's trial id
        assert re.fullmatch(r"s/00[01] lr=\S+ wd=\S+", child.info.run_name), child.info.run_name
        shown = dict(part.split("=") for part in child.info.run_name.split()[1:])
        assert float(shown["lr"]) == pytest.approx(lr, rel=0.05) and float(shown["wd"]) == pytest.approx(wd, rel=0.05)
        # its source is the training command, not Ray's worker; its command composes exactly its config
        assert child.data.tags["mlflow.source.name"].endswith("pipeline/train.py")
        assert_reproduces(child.data.tags["command"], child.data.params, "pipeline.train")
        assert f"optim.lr={child.data.params['optim.lr']}" in child.data.tags["command"].split()
    assert sorted(child.info.run_name[:5] for child in children) == ["s/000", "s/001"]

"""A sweep on more than one Ray node and with more than one worker per trial, on a real Ray runtime in its own network
and PID namespace: trials spread over a two-node cluster (and storage a node cannot see refused), and trials each
trained by two DDP workers still make one MLflow child run each. (Across two hosts: test_two_hosts.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from tests.helpers.isolation import isolated, processes_beside, run_isolated, wait_isolated
from tests.helpers.sweeps import (
    ROOT_ONLY,
    epochs_logged,
    runs,
    sweep_command,
    trial_processes,
    trial_table,
    wait_for,
)

pytestmark = [pytest.mark.e2e, ROOT_ONLY]


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
        "trainer.max_epochs=1",  # a smoke test's length, with the default ASHA (grace period 2): every trial tested
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
    assert "warning: sweep.grace_period=2 is not shorter than trainer.max_epochs=1: ASHA could stop" in output
    _, children = runs(root)  # one parent run: the refused sweep opened none
    assert len(children) == 2
    assert all(child.info.status == "FINISHED" and "test/acc" in child.data.metrics for child in children)
    assert len({child.data.tags["sweep.node_id"] for child in children}) == 2, "one trial on each node"


def test_a_trial_spread_over_two_ddp_workers_makes_one_mlflow_child_even_when_killed_as_they_start(
    root: Path, ray_tmp: str
) -> None:
    """The trial's process is killed as its workers start: Ray keeps the placement group that holds their CPUs (its
    maker, Ray Train's controller, died with the trial, the sweep's job did not), and without the driver releasing it
    the retry waited for CPUs forever."""
    overrides = ("sweep=lr_wd", "sweep.num_samples=1", "sweep.scheduler=fifo")
    workers = ("sweep.resources.workers_per_trial=2", "sweep.resources.cpu=0.5", "trainer.max_epochs=2")
    workers += ("trainer.limit_test_batches=null",)
    log = root / "sweep.log"
    sweep = isolated(sweep_command(root, ray_tmp, *overrides, *workers), log)
    try:
        wait_for(lambda: sweep.poll() is not None or processes_beside(sweep.pid, b"RayTrainWorker"), 240, "workers")
        assert sweep.poll() is None, log.read_text(errors="replace")[-4000:]
        killed = trial_processes(sweep)
        assert killed, "the trial's process was found"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert wait_isolated(sweep, log, timeout=420) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        sweep.kill()
        sweep.wait()
    assert "Released the CPUs and GPUs Ray kept for 1 worker group(s) whose trial died." in log.read_text()
    parent, children = runs(root)
    assert parent.info.status == "FINISHED"
    assert len(children) == 1, "one MLflow run for the trial, however many workers trained it"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.metrics["test/samples"] == 270, "the test split counted once, by the first worker"
        steps = epochs_logged(root, child)
        assert len(steps) == len(set(steps)) == 2, "one validation per epoch, logged once"
    assert {row["outcome"] for row in trial_table(root)} == {"completed"}


# What the process of a trial spread over workers imports (pipeline.sweep.trial's train_trial, up to the hand-over to
# pipeline.sweep.workers), then what of the training it holds.
TRIAL_PROCESS_IMPORTS = """
import sys
import pipeline.sweep.trial, pipeline.sweep.space, pipeline.sweep.tracking, pipeline.tracking.naming
import pipeline.sweep.workers
print(sorted(name for name in ("lightning", "timm", "pipeline.run", "mlflow.pytorch") if name in sys.modules))
"""


def test_a_trial_spread_over_workers_only_drives_them_and_imports_no_training() -> None:
    """The workers train and import Lightning; the trial's own process builds the TorchTrainer and waits."""
    done = subprocess.run(
        [sys.executable, "-c", TRIAL_PROCESS_IMPORTS], cwd=REPO, env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout

"""A run that is interrupted or crashes is ended in MLflow (KILLED / FAILED), and its checkpoints stay."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, REPO, clean_env, run_cli, store_uri


def only_run(root: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return run


def checkpoints(root: Path) -> set[str]:
    return {p.name for p in root.glob("outputs/*/*/checkpoints/*.ckpt")}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_is_marked_killed_and_keeps_its_checkpoints(root: Path, signum: signal.Signals) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", f"paths.root={root}", *QUIET, "trainer.max_epochs=500"],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "last.ckpt" not in checkpoints(root):  # at least one epoch done
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.2)
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert only_run(root).info.status == "KILLED"
    assert {"last.ckpt", "interrupted.ckpt"} <= checkpoints(root)


def test_diverging_run_fails_with_advice_and_is_marked_failed(root: Path) -> None:
    done = run_cli("pipeline.train", "optim.lr=1e6", "trainer.max_epochs=3", root=root)
    assert done.returncode == 2
    assert "training diverged" in done.stderr and "Lower optim.lr" in done.stderr
    assert only_run(root).info.status == "FAILED"
    assert "interrupted.ckpt" in checkpoints(root)

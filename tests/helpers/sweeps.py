"""What the sweep tests share: the small trial config, the command a user types, and reading a sweep back from its
MLflow store and its folder."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, store_uri
from tests.helpers.isolation import processes_beside

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (Ray's isolation) need root")

FAST = [  # small enough that a trial-epoch takes a second or two on one core
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.batch_size=32",
    "scheduler.warmup_epochs=0",
    "logger.log_checkpoint=false",
    "class_activation.images=0",  # the Grad-CAM figure: half a second of a trial's CPU (test_class_activation.py)
]


@contextmanager
def ray_folder() -> Iterator[str]:
    """Ray's session folder: short (its socket paths must stay under 108 characters) and private."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_command(root: Path, ray_tmp: str, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", *QUIET, *FAST,
        "ray.num_cpus=2", f"ray.temp_dir={ray_tmp}", "sweep.name=s", *overrides,
    ]  # fmt: skip


def runs(root: Path) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    """The sweep's parent run and its children."""
    client = mlflow.MlflowClient(store_uri(root))
    return parent_and_trials(client.search_runs([client.get_experiment_by_name("digits").experiment_id]))


def parent_and_trials(runs: Sequence[mlflow.entities.Run]) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    """The one sweep's parent run among `runs`, and its trials' runs (nested under it)."""
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def epochs_logged(root: Path, run: mlflow.entities.Run) -> list[int]:
    history = mlflow.MlflowClient(store_uri(root)).get_metric_history(run.info.run_id, "val/acc")
    return [m.step for m in history]


def trial_table(root: Path) -> list[dict[str, str]]:
    with (root / "sweeps" / "s" / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def trial_checkpoints(root: Path) -> list[Path]:
    return list((root / "sweeps" / "s").glob("train_trial_*/checkpoint_*"))


TRIAL_MARKERS = (b"ImplicitFunc", b"train_trial")  # in the command line of a Ray worker process running a trial


def trial_processes(sweep: subprocess.Popen[bytes]) -> list[int]:
    """The Ray worker processes running a trial of the isolated `sweep` (only its network namespace is private: /proc
    shows them here, beside every other test's)."""
    return processes_beside(sweep.pid, *TRIAL_MARKERS)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)

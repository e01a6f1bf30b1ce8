"""One run data-parallel over two CPU processes (gloo), inside a private network namespace: one MLflow run,
one output folder, the test set counted once, metrics like a single process's; a dead rank fails the run."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, run_cli, store_uri
from tests.helpers.isolation import isolated, processes_beside, run_isolated

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (gloo's isolation) need root"),
]

TEST_IMAGES = 270  # the digits' test split
SHORT = ["trainer.max_epochs=8", "logger.log_checkpoint=false"]


def train(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", f"paths.root={root}", *QUIET, *SHORT, *overrides]


def finished_runs(root: Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(store_uri(root))
    return client.search_runs([client.get_experiment_by_name("digits").experiment_id])


def test_ddp_cpu_makes_one_run_with_global_metrics_like_a_single_process(root: Path) -> None:
    single, ddp = root / "single", root / "ddp"
    alone = run_cli("pipeline.train", *SHORT, "data.batch_size=64", root=single)  # one process: no namespace
    assert alone.returncode == 0, alone.stderr[-3000:]
    output = run_isolated(
        train(ddp, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=32"), root / "ddp.log", timeout=300
    )
    assert "effective batch size 64 (2 processes × 32 × 1 node × 1 accumulated)" in output
    (run,) = finished_runs(ddp)  # exactly one run, though two processes trained
    assert run.info.status == "FINISHED"
    assert len(list((ddp / "outputs").glob("*/*"))) == 1, "one output folder"
    assert run.data.metrics["test/samples"] == TEST_IMAGES, "the test split is evaluated once, unpadded"
    assert run.data.params["trainer.devices"] == "2"
    (reference,) = finished_runs(single)
    assert abs(run.data.metrics["test/acc"] - reference.data.metrics["test/acc"]) < 0.05


def test_a_dead_rank_fails_the_whole_run_promptly(root: Path) -> None:
    process = isolated(train(root, "trainer=ddp_cpu", "trainer.max_epochs=200"), root / "ddp.log")
    try:
        deadline = time.monotonic() + 180
        while not list(root.glob("outputs/*/*/checkpoints/last.ckpt")):  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, (root / "ddp.log").read_text()[-3000:]
            time.sleep(0.5)
        (rank_one,) = processes_beside(process.pid, b"train_ddp_process_1")
        os.kill(rank_one, signal.SIGKILL)
        started = time.monotonic()
        code = process.wait(timeout=120)
        assert time.monotonic() - started < 90, "the surviving rank gave up within the DDP timeout"
    finally:
        process.kill()
    assert code != 0
    (run,) = finished_runs(root)
    assert run.info.status == "FAILED"

"""A sweep survives its failures, on a real local Ray runtime in its own network and PID namespace: a trial killed
mid-run is retried from its checkpoint, and a killed driver is resumed with `resume=` without repeating an epoch."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.helpers.isolation import isolated, run_isolated, wait_isolated
from tests.helpers.sweeps import (
    ROOT_ONLY,
    epochs_logged,
    runs,
    sweep_command,
    trial_checkpoints,
    trial_processes,
    wait_for,
)

pytestmark = [pytest.mark.e2e, ROOT_ONLY]


def test_killed_trial_is_retried_from_its_checkpoint(root: Path, ray_tmp: str) -> None:
    command = sweep_command(
        root, ray_tmp, "sweep=lr_wd", "sweep.num_samples=1", "sweep.scheduler=fifo", "sweep.max_failures=2",
        "trainer.max_epochs=8",
    )  # fmt: skip
    process = isolated(command, root / "sweep.log")
    try:
        wait_for(lambda: trial_checkpoints(root) and trial_processes(process), 240, "a trial's first checkpoint")
        killed = trial_processes(process)
        assert killed, "the trial's process was found"
        # A process Tune reuses gives the trial that ended in it time to finish (Tune's default: 2 s, then the next
        # trial sent there fails without starting).
        assert b"TUNE_FUNCTION_THREAD_TIMEOUT_S=120" in Path(f"/proc/{killed[0]}/environ").read_bytes().split(b"\0")
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert wait_isolated(process, root / "sweep.log", timeout=300) == 0, (root / "sweep.log").read_text()[-4000:]
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
    # resumed with the result loggers it was started with: Tune's CSV and JSON ones, still no TensorBoard logger
    assert not list((root / "sweeps").rglob("events.out.tfevents*"))
    assert all((folder / "progress.csv").exists() for folder in (root / "sweeps" / "s").glob("train_trial_*"))

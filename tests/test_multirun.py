"""`python -m pipeline.train -m …` (Hydra's multirun): every job a normal run under outputs/, a failing job recorded
while the others run, an exit status that says so, and each job's best metric returned to Hydra."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import mlflow
import pytest

from pipeline.multirun import one_process_problem
from tests.conftest import QUIET, REPO, clean_env, compose_in, store_uri
from tests.helpers.commands import run_module
from tests.helpers.hydra_returns import RETURNED_FILE

TINY = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "logger.log_checkpoint=false",
    "+hydra.callbacks.returns._target_=tests.helpers.hydra_returns.RecordReturns",
)


def multirun(root: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The multirun as a user starts it in their project folder (`root`, so paths.root's default); its sweep folder."""
    done = run_module(
        "pipeline.train",
        ["-m", *QUIET, *TINY, *overrides],
        cwd=root,
        env=clean_env(PYTHONPATH=str(REPO)),  # the test helpers' callback (the pipeline itself is installed)
        timeout=300,
    )
    sweeps = list((root / "outputs").glob("*/*"))
    assert len(sweeps) == 1, f"one sweep folder under outputs/<date>/<time>: {sweeps}\n{done.stderr[-3000:]}"
    assert not (root / "multirun").exists(), "no multirun/ folder beside outputs/"
    return done, sweeps[0]


def runs_by_lr(root: Path) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(store_uri(root))
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return {run.data.params["optim.lr"]: run for run in runs}


def best(root: Path, run: mlflow.entities.Run) -> float:
    history = mlflow.MlflowClient(store_uri(root)).get_metric_history(run.info.run_id, "val/acc")
    return max(point.value for point in history)


@pytest.mark.e2e
def test_a_bad_value_fails_its_job_only_and_the_exit_status_says_so(root: Path) -> None:
    done, sweep = multirun(root, "optim.lr=0.05,-1,0.1")

    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: Invalid configuration: optim.lr=-1: must be a number > 0" in done.stderr
    assert "error: 1 of 3 jobs failed (#1); the others ran" in done.stderr
    assert "Traceback" not in done.stderr, "a user's mistake is a message, also in a multirun"
    assert f"Multirun: 3 jobs in {sweep}" in done.stdout
    assert "#1 optim.lr=-1: failed: Invalid configuration: optim.lr=-1: must be a number > 0" in done.stdout

    runs = runs_by_lr(root)
    assert set(runs) == {"0.05", "0.1"}, "the bad value never made a run"
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    assert {run.data.tags["multirun"] for run in runs.values()} == {str(sweep)}
    # each job named by its own overrides: the default lr is no difference, 0.1 is
    assert re.fullmatch(r"lenet5-digits-affine( \S+)* #[0-9a-f]{4}", runs["0.05"].info.run_name)
    assert "lr=" not in runs["0.05"].info.run_name and " lr=0.1 " in runs["0.1"].info.run_name

    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    for number, lr in ((0, "0.05"), (2, "0.1")):
        job = sweep / str(number)
        assert any(job.glob("checkpoints/best-*.ckpt")) and (job / ".hydra" / "config.yaml").exists()
        returned = json.loads((job / RETURNED_FILE).read_text())
        assert returned["status"] == "COMPLETED"
        assert returned["value"] == pytest.approx(best(root, runs[lr])), "main returns the job's best val/acc"
        assert f"#{number} optim.lr={lr}: best val/acc {returned['value']:.4f}" in done.stdout
    failed = json.loads((sweep / "1" / RETURNED_FILE).read_text())
    assert failed["status"] == "COMPLETED" and math.isnan(failed["value"]), "a failed job returns NaN to a sweeper"
    assert json.loads((sweep / "1" / "job.json").read_text())["status"] == "failed"


@pytest.mark.e2e
def test_a_crashed_job_is_marked_failed_and_the_next_one_runs(root: Path) -> None:
    # The first job crashes in its first epoch (TINY trains one); the second's crash would come after its last.
    crash = ("+callbacks.crash._target_=tests.helpers.crash.CrashAtEpoch", "+callbacks.crash.at_epoch=0,1")
    done, _ = multirun(root, *crash)

    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" in done.stderr and "a crash at the start of epoch 0" in done.stderr, (
        "a crash keeps its traceback"
    )
    client = mlflow.MlflowClient(store_uri(root))
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    statuses = {run.data.params["callbacks.crash.at_epoch"]: run.info.status for run in runs}
    assert statuses == {"0": "FAILED", "1": "FINISHED"}
    assert "#0 +callbacks.crash.at_epoch=0: failed: " in done.stdout
    assert "#1 +callbacks.crash.at_epoch=1: best val/acc" in done.stdout


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["trainer.accelerator=cpu"], None),
        (["trainer=gpu"], None),
        (["trainer=ddp_cpu"], "trainer.devices=2"),
        (["trainer.devices=[0,1]"], "trainer.devices=[0, 1]"),
        (["trainer.accelerator=cpu", "trainer.num_nodes=2"], "trainer.num_nodes=2"),
    ],
)
def test_a_job_that_would_start_more_processes_is_refused(root: Path, overrides: list[str], problem: str) -> None:
    """Lightning starts a data-parallel run's other processes by running the command line again: the whole sweep."""
    assert one_process_problem(compose_in(root, overrides).trainer) == problem


@pytest.mark.e2e
@pytest.mark.fresh_store
def test_a_multirun_whose_output_folder_cannot_be_written_names_the_key_before_any_job(root: Path) -> None:
    (root / "taken").write_text("a file where the folder would go")
    where = root / "taken" / "out"
    done = run_module(
        "pipeline.train",
        ["-m", *QUIET, *TINY[:-1], f"paths.output_dir={where}", "optim.lr=0.1,0.01"],
        cwd=root,
        env=clean_env(),
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: paths.output_dir={where}: cannot write there"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "paths.root=<folder>" in done.stderr
    assert not (root / "mlruns").exists(), "no job started"


@pytest.mark.e2e
def test_a_multirun_whose_every_job_fails_says_none_trained(root: Path) -> None:
    done, _ = multirun(root, "optim.lr=-1,-2")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: 2 of 2 jobs failed (#0, #1); none trained" in done.stderr

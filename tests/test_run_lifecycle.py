"""A run that is interrupted or crashes is ended in MLflow (KILLED / FAILED), and its checkpoints stay."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, REPO, clean_env, run_cli, store_uri
from tests.helpers.commands import start_module


def only_run(root: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return run


def checkpoints(root: Path) -> set[str]:
    return {p.name for p in root.glob("outputs/*/*/checkpoints/*.ckpt")}


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_is_marked_killed_and_keeps_its_checkpoints(root: Path, signum: signal.Signals) -> None:
    errors = root / "train.err"
    arguments = [f"paths.root={root}", *QUIET, "trainer.max_epochs=500"]
    process = start_module(
        "pipeline.train", arguments, cwd=REPO, env=clean_env(), stdout=root / "train.out", stderr=errors
    )
    try:
        deadline = time.monotonic() + 120
        while "last.ckpt" not in checkpoints(root):  # at least one epoch done
            assert process.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.2)
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, "exit status 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them"
    killed = only_run(root)
    run_id = killed.info.run_id
    assert killed.info.status == "KILLED"
    assert {"last.ckpt", "interrupted.ckpt"} <= checkpoints(root)
    said = errors.read_text()
    assert f"interrupted: run {run_id} is marked KILLED; continue it from interrupted.ckpt: " in said, said[-2000:]
    assert f"python -m pipeline.train resume={run_id}" in said

    if signum == signal.SIGTERM:  # and it resumes from the mid-epoch checkpoint, the newest, to the end
        resumed = run_cli("pipeline.train", f"resume={run_id}", "trainer.max_epochs=3", root=root)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "interrupted.ckpt" in resumed.stdout + resumed.stderr
        assert only_run(root).info.status == "FINISHED"


TINY = ("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("lr", "diverged", "kept"),
    [
        ("1e20", "of epoch 0: training diverged", "No checkpoint was written before it."),
        ("1e6", "of epoch 1: training diverged", "Kept from before it: "),
    ],
)
def test_a_diverging_run_keeps_no_nan_checkpoint_and_says_what_it_kept(
    root: Path, lr: str, diverged: str, kept: str
) -> None:
    steep = (f"optim.lr={lr}", "model.kwargs.act=relu", "scheduler.warmup_epochs=0", "trainer.max_epochs=3")
    done = run_cli("pipeline.train", *steep, *TINY, root=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert diverged in done.stderr and "Lower optim.lr" in done.stderr and kept in done.stderr
    assert only_run(root).info.status == "FAILED"
    assert only_run(root).data.tags["failure"].startswith("TrainingDiverged: "), "the run records why it failed"
    from pipeline.checkpointing import problem

    kept_files = list(root.glob("outputs/*/*/checkpoints/*.ckpt"))
    assert "interrupted.ckpt" not in {p.name for p in kept_files}, "no checkpoint of NaN weights"
    assert [problem(p) for p in kept_files] == [None] * len(kept_files), "every one kept can be resumed"
    if not kept_files:
        again = run_cli("pipeline.train", f"resume={only_run(root).info.run_id}", *TINY, root=root)
        assert again.returncode == 2 and "holds no checkpoint" in again.stderr, again.stderr[-3000:]
    else:
        assert f"{kept_files[0].parent}/last.ckpt (epoch 0)" in done.stderr


@pytest.mark.slow
def test_last_checkpoint_is_written_every_epoch_whether_or_not_the_monitored_metric_improves(root: Path) -> None:
    from pipeline.checkpointing import load
    from pipeline.run import run
    from tests.conftest import compose_in

    # So small a learning rate that val/acc never changes: the best checkpoint stays the first epoch's.
    result = run(compose_in(root, ["trainer.max_epochs=3", "optim.lr=1e-12", *TINY]))
    folder = result.output_dir / "checkpoints"
    assert {p.name for p in folder.iterdir()} == {"best-epoch000.ckpt", "last.ckpt"}
    assert load(folder / "last.ckpt")["epoch"] == 2, "written after the last epoch too"


@pytest.mark.e2e
def test_resume_into_another_network_is_refused_before_anything_is_written(root: Path) -> None:
    from pipeline.run import run
    from tests.conftest import compose_in

    nin = run(compose_in(root, ["model=nin", "trainer.max_epochs=1", "scheduler.warmup_epochs=0", *TINY]))
    before = {p: p.stat().st_mtime_ns for p in nin.output_dir.rglob("*")}
    for given in (nin.run_id, nin.output_dir / "checkpoints" / "last.ckpt"):
        done = run_cli("pipeline.train", f"resume={given}", "trainer.max_epochs=2", *TINY, root=root)  # lenet5
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "model.name is nin there, lenet5 here" in done.stderr and "(model=nin resume=" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in nin.output_dir.rglob("*")} == before, "its folder untouched"
    run_after = only_run(root)
    assert run_after.info.status == "FINISHED" and run_after.data.params["model.name"] == "nin"


def val_points(root: Path) -> int:
    records = list(root.glob("outputs/*/*/mlflow/*/metrics.csv"))
    return sum(line.startswith("val/acc,") for line in records[0].read_text().splitlines()) if records else 0


@pytest.mark.e2e
def test_a_run_killed_mid_training_resumes_by_run_id_and_ends_like_an_uninterrupted_one(root: Path) -> None:
    settings = ("trainer.max_epochs=8", "seed=3", "logger.log_checkpoint=false")
    reference = run_cli("pipeline.train", *settings, root=root / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    errors = root / "train.err"
    arguments = [f"paths.root={root}", *QUIET, *settings]
    process = start_module(
        "pipeline.train", arguments, cwd=REPO, env=clean_env(), stdout=root / "train.out", stderr=errors
    )
    try:
        deadline = time.monotonic() + 120
        while val_points(root) < 3:  # three epochs done, the fourth under way
            assert process.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "three epochs did not finish within 120 s"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL: nothing in the process gets to clean up
        process.wait()
    killed = only_run(root)
    assert killed.info.status == "RUNNING", "killed outright, it could not say so"

    resumed = run_cli("pipeline.train", f"resume={killed.info.run_id}", *settings, root=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = only_run(root)  # the same run, continued
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    client = mlflow.MlflowClient(store_uri(root))
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "val/acc")]
    assert len(steps) == len(set(steps)) == 8, "every epoch logged exactly once"
    expected = only_run(root / "reference").data.metrics
    for name in ("test/acc", "test/loss"):
        assert run.data.metrics[name] == pytest.approx(expected[name], abs=1e-4), name


@pytest.mark.e2e
def test_resume_of_something_that_is_neither_a_run_nor_a_checkpoint_says_what_to_give(root: Path) -> None:
    for given, message in (("0123abcd", "no such run in MLflow"), (f"{root}/gone.ckpt", "no such checkpoint file")):
        done = run_cli("pipeline.train", f"resume={given}", root=root)
        assert done.returncode == 2 and message in done.stderr and "resume=" in done.stderr, done.stderr[-2000:]


@pytest.mark.e2e
def test_resume_of_a_file_that_is_not_a_training_checkpoint_stops_before_a_run_is_created(root: Path) -> None:
    import torch

    (root / "notes.ckpt").write_text("not a checkpoint\n" * 100)
    torch.save({"conv.weight": torch.ones(2, 2)}, root / "weights.pt")  # a state dict: weights, no training state
    cases = {
        root / "notes.ckpt": "is not a checkpoint: not the zip archive torch.save writes",
        root / "weights.pt": "holds no training state to continue (no state_dict, optimizer_states, epoch",
    }
    for path, message in cases.items():
        done = run_cli("pipeline.train", f"resume={path}", root=root)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"error: resume={path}: {path} {message}" in done.stderr and "Traceback" not in done.stderr
    assert "model.weights=" in done.stderr, "weights alone can start a new training"
    client = mlflow.MlflowClient(store_uri(root))
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == [], "no run was created"
    assert not list(root.glob("outputs/*/*/checkpoints")), "nothing trained"


@pytest.mark.slow
def test_runs_in_one_process_each_log_to_their_own_store(root: Path) -> None:
    """MLflow exports the tracking URI of a run into the environment; the next run must not follow it."""
    from pipeline.run import run
    from tests.conftest import compose_in

    tiny = ["trainer.max_epochs=1", "scheduler.warmup_epochs=0", "trainer.limit_train_batches=2", "model=lenet5"]
    for name in ("first", "second"):
        result = run(compose_in(root / name, tiny))
        assert result.tracking_uri == store_uri(root / name)
    assert only_run(root / "first").info.run_id != only_run(root / "second").info.run_id


def test_points_a_killed_process_recorded_but_never_sent_reach_mlflow_when_the_run_continues(root: Path) -> None:
    """Metric points are sent from a background thread: a SIGKILL can take queued ones with it. They are in the
    run's record on disk, so continuing the run sends them, and a repeated step is not logged a second time."""
    from mlflow.entities import Metric

    from pipeline.tracking.runs import open_training_run
    from tests.conftest import compose_in

    cfg = compose_in(root)
    first = open_training_run(cfg)
    first.log_metrics({"val/acc": 0.5}, step=9)
    first.flush()
    first.record.add_metrics([Metric("val/acc", 0.6, 0, 19)])  # recorded, then the process died before sending

    cfg.logger.run_id = first.run_id
    continued = open_training_run(cfg)
    continued.log_metrics({"val/acc": 0.61}, step=19)  # the resumed run repeats the epoch it had not checkpointed
    continued.log_metrics({"val/acc": 0.7}, step=29)
    continued.end("FINISHED")
    history = mlflow.MlflowClient(store_uri(root)).get_metric_history(first.run_id, "val/acc")
    assert sorted((m.step, m.value) for m in history) == [(9, 0.5), (19, 0.6), (29, 0.7)]


def test_an_unexpected_error_while_sending_stops_the_sending_but_never_the_end_of_the_run(root: Path) -> None:
    from pipeline.tracking.record import RunRecord
    from pipeline.tracking.runs import open_training_run
    from tests.conftest import compose_in

    logger = open_training_run(compose_in(root))

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("not what MLflow's client raises")

    logger.experiment.log_batch = broken  # type: ignore[method-assign]
    logger.log_metrics({"val/acc": 0.5}, step=1)
    logger.end("FINISHED")  # returns: the sender neither hangs nor dies with points left unaccounted
    assert "ValueError: not what MLflow's client raises" in (logger.unsynced or "")
    assert "pipeline.sync" in (logger.unsynced or "") and RunRecord.load(logger.record.folder).unsynced
    assert [m.step for m in logger.record.metrics()] == [1], "kept on disk for pipeline.sync"


def test_a_continued_run_keeps_a_param_it_cannot_change_and_goes_on_tracking(root: Path) -> None:
    from pipeline.tracking.runs import open_training_run
    from tests.conftest import compose_in

    cfg = compose_in(root)
    first = open_training_run(cfg)
    first.log_hyperparams({"optim.lr_scaled": 0.1})
    first.end("KILLED")
    cfg.logger.run_id = first.run_id
    continued = open_training_run(cfg)
    continued.log_hyperparams({"optim.lr_scaled": 0.2, "optim.effective_batch_size": 128})  # another device count
    continued.log_metrics({"val/acc": 0.9}, step=3)
    continued.end("FINISHED")
    assert continued.unsynced is None
    run = mlflow.MlflowClient(store_uri(root)).get_run(first.run_id)
    assert run.data.params["optim.lr_scaled"] == "0.1" and run.data.params["optim.effective_batch_size"] == "128"
    assert run.data.metrics["val/acc"] == 0.9

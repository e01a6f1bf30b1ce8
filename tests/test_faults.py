"""Fault injection: real trainings killed with SIGKILL at seeded random moments (before the first checkpoint, inside
a checkpoint write, mid-epoch), a disk that fills up, a tracking server that dies and comes back, runs started
together from one folder, runs left RUNNING on this host and on another. After each fault: nothing is lost (every
checkpoint on disk can be resumed, no metric point is missing or logged twice), the next command leaves no run
RUNNING, and `resume=` continues to the test metrics of an uninterrupted run of the same seed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow
import pytest

from pipeline.checkpointing import TEMPORARY_SUFFIX, problem
from pipeline.tracking.processes import CLOSED_TAG
from pipeline.tracking.record import RECORD_FOLDER, RunRecord
from pipeline.tracking.store import sqlite_path
from tests.conftest import QUIET, REPO, clean_env, run_cli, store_uri
from tests.helpers.commands import Started, run_module, start_module
from tests.helpers.mlflow_server import free_port, start, stop, wait_until_closed
from tests.helpers.postgres import Database

pytestmark = pytest.mark.e2e

SEED = 2026  # every random kill moment is drawn from it: a failure replays exactly
EPOCHS = 5
SETTINGS = (
    f"trainer.max_epochs={EPOCHS}",
    "seed=3",
    "logger.log_checkpoint=false",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem or naming a host needs root")


def all_runs(uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> dict[str, float]:
    """The test metrics of the run every faulty one must end with, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    sqlite_path(store_uri(root)).parent.mkdir(parents=True)
    shutil.copyfile(empty_store, sqlite_path(store_uri(root)))
    done = run_cli("pipeline.train", *SETTINGS, root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = all_runs(store_uri(root))
    return run.data.metrics


def train(root: Path, *overrides: str, name: str = "train", env: dict[str, str] | None = None) -> Started:
    """`python -m pipeline.train` started in the background; its output goes to <root>/<name>.log."""
    arguments = [f"paths.root={root}", *QUIET, *overrides]
    return start_module("pipeline.train", arguments, cwd=REPO, env=env or clean_env(), stdout=root / f"{name}.log")


def wait_for(
    condition: Callable[[], object], process: Started | subprocess.Popen[str], what: str, timeout: float = 180
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the training ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def kill(process: Started | subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)  # nothing in the process gets to clean up
    process.wait(timeout=60)


def output_folder(root: Path) -> Path | None:
    found = list((root / "outputs").glob("*/*/mlflow/*/run.json"))
    return found[0].parents[2] if found else None


def epochs_done(output: Path | None) -> int:
    """Epochs whose validation the run has recorded (its record's metrics.csv)."""
    records = list(output.glob(f"{RECORD_FOLDER}/*/metrics.csv")) if output else []
    return sum(line.startswith("val/acc,") for line in records[0].read_text().splitlines()) if records else 0


def assert_nothing_torn(output: Path) -> None:
    """Every checkpoint under its own name can be resumed, and no other file of the run is empty."""
    for checkpoint in (output / "checkpoints").glob("*.ckpt"):
        assert problem(checkpoint) is None, f"{checkpoint.name}: {problem(checkpoint)}"
    parts = f"*{TEMPORARY_SUFFIX}"  # a write cut short: never under the checkpoint's name, removed on resume
    empty = [p for p in output.rglob("*") if p.is_file() and p.stat().st_size == 0 and not p.match(parts)]
    assert not empty, f"empty files: {empty}"
    for record in output.glob(f"{RECORD_FOLDER}/*"):
        RunRecord.load(record)  # whole JSON


def assert_resumes_to_the_reference(
    root: Path, run_id: str, reference: dict[str, float], uri: str | None = None
) -> None:
    """`resume=<run id>` ends the run FINISHED with every epoch logged once and the reference's test metrics;
    nothing in the store (`uri`, default the local one) stays RUNNING."""
    uri = uri or store_uri(root)
    resumed = run_cli("pipeline.train", f"resume={run_id}", *SETTINGS, f"logger.tracking_uri={uri}", root=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and CLOSED_TAG not in run.data.tags, "continued: no longer a closed run"
    steps = [point.step for point in client.get_metric_history(run_id, "val/acc")]
    assert len(steps) == len(set(steps)) == EPOCHS, f"every epoch logged exactly once: {steps}"
    for name in ("test/acc", "test/loss", "test/f1"):
        assert run.data.metrics[name] == pytest.approx(reference[name], abs=1e-4), name
    assert [r.info.run_id for r in all_runs(uri) if r.info.status == "RUNNING"] == []
    output = Path(run.data.tags["output_dir"])
    assert not list((output / "checkpoints").glob(f"*{TEMPORARY_SUFFIX}")), "the killed write's part is gone"
    assert_nothing_torn(output)


@contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the block, unmounted after."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def test_killed_before_its_first_checkpoint_the_run_is_closed_by_the_next_command(root: Path) -> None:
    process = train(root, *SETTINGS)
    wait_for(lambda: output_folder(root), process, "run opened")
    kill(process)
    output = output_folder(root)
    assert not list((output / "checkpoints").glob("*.ckpt")), "killed before the first checkpoint, as intended"
    (killed,) = all_runs(store_uri(root))
    assert killed.info.status == "RUNNING", "killed outright, it could not say so"

    again = run_cli("pipeline.train", f"resume={killed.info.run_id}", *SETTINGS, root=root)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "holds no checkpoint" in again.stderr and "Start it again" in again.stderr
    run = mlflow.MlflowClient(store_uri(root)).get_run(killed.info.run_id)
    assert run.info.status == "KILLED" and "is gone" in run.data.tags[CLOSED_TAG]


@pytest.mark.parametrize("moment", ["inside a checkpoint write", "mid-run"])
def test_killed_at_a_random_moment_the_run_resumes_to_the_uninterrupted_result(
    root: Path, reference: dict[str, float], moment: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    draw = random.Random(f"{SEED}-{moment}")
    after = draw.randint(1, EPOCHS - 2)  # epochs done before the kill
    # Lightning staged checkpoints in the temporary folder and copied them over when it is another filesystem
    # (a kill during the copy left last.ckpt truncated): the temporary folder is a filesystem of its own here.
    env = None
    if moment == "inside a checkpoint write" and os.geteuid() == 0:
        tmp = tmp_path_factory.mktemp("tmpdir")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmp)], check=True)
        env = clean_env(TMPDIR=str(tmp))
    try:
        process = train(root, *SETTINGS, env=env)
        wait_for(lambda: epochs_done(output_folder(root)) >= after, process, f"{after} epochs")
        output = output_folder(root)
        if moment == "inside a checkpoint write":
            part = freeze_inside_a_checkpoint_write(process, output / "checkpoints")
            kill(process)
            assert part.exists(), "the part of the checkpoint being written stays under its temporary name"
        else:
            time.sleep(draw.uniform(0, 0.2))
            process.send_signal(signal.SIGSTOP)  # alive, holding still while a second command tries to resume it
            assert_refused_while_it_trains(root, process)
            kill(process)
    finally:
        if env is not None:
            subprocess.run(["umount", "--lazy", env["TMPDIR"]], check=True)
    assert_nothing_torn(output)
    (killed,) = all_runs(store_uri(root))
    assert killed.info.status == "RUNNING", "killed outright, it could not say so"

    assert_resumes_to_the_reference(root, killed.info.run_id, reference)


def assert_refused_while_it_trains(root: Path, process: Started) -> None:
    assert process.poll() is None, "the training ended before the kill"
    (run,) = all_runs(store_uri(root))
    second = run_cli("pipeline.train", f"resume={run.info.run_id}", *SETTINGS, root=root)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is still training (process {process.pid} on host" in second.stderr
    assert f"kill -TERM {process.pid}" in second.stderr, "and says how to stop it"
    assert mlflow.MlflowClient(store_uri(root)).get_run(run.info.run_id).info.status == "RUNNING"


def freeze_inside_a_checkpoint_write(process: Started, folder: Path) -> Path:
    """Stop the process (SIGSTOP) while it writes a checkpoint; returns the temporary file being written."""
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, "the training ended before a checkpoint write was caught"
        assert time.monotonic() < deadline, "no checkpoint write caught within 120 s"
        with os.scandir(folder) as entries:
            parts = [Path(e.path) for e in entries if e.name.endswith(TEMPORARY_SUFFIX)]
        if parts:
            process.send_signal(signal.SIGSTOP)
            caught = [part for part in parts if part.exists()]
            if caught:
                return caught[0]
            process.send_signal(signal.SIGCONT)  # the write ended in between: the next one
        time.sleep(0.001)


def test_torn_checkpoints_are_named_and_skipped_for_the_newest_sound_one(root: Path) -> None:
    """What an older version, a copy cut short or a full disk elsewhere may have left: resume= never takes it."""
    tiny = (*SETTINGS[1:], "trainer.max_epochs=2")
    first = run_cli("pipeline.train", *tiny, root=root)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = all_runs(store_uri(root))
    folder = Path(run.data.tags["output_dir"]) / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn
    (folder / "interrupted.ckpt").write_bytes(b"")  # empty, and the newest
    (best,) = folder.glob("best-*.ckpt")

    given = run_cli("pipeline.train", f"resume={last}", *tiny, root=root)
    assert given.returncode == 2 and "Traceback" not in given.stderr, given.stderr[-3000:]
    assert "the training cannot continue from it: it cannot be read" in given.stderr
    assert f"Give resume={best}" in given.stderr, "names the sound one"

    resumed = run_cli("pipeline.train", f"resume={run.info.run_id}", *tiny, "trainer.max_epochs=3", root=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipped {folder / 'interrupted.ckpt'}: it is empty (0 bytes)" in resumed.stderr
    assert f"skipped {last}: it cannot be read" in resumed.stderr
    ended = mlflow.MlflowClient(store_uri(root)).get_run(run.info.run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags["resumed_from"] == str(best)
    assert problem(last) is None, "written whole again by the resumed run"


@as_root
def test_a_disk_that_fills_up_mid_run_tears_nothing_and_the_run_resumes(
    root: Path, reference: dict[str, float]
) -> None:
    with small_filesystem(root / "small", "8m") as disk:
        process = train(root, f"paths.output_dir={disk}/run", *SETTINGS)
        last = disk / "run" / "checkpoints" / "last.ckpt"
        wait_for(last.exists, process, "first checkpoint")
        process.send_signal(signal.SIGSTOP)  # the disk fills up between two of its writes
        filler = disk / "filler"
        with filler.open("wb") as handle, suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
        process.send_signal(signal.SIGCONT)
        assert process.wait(timeout=120) == 2
        log = (root / "train.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        error = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "no space left on the disk" in error[0] and "resume=" in error[0], log[-3000:]
        (failed,) = all_runs(store_uri(root))
        assert failed.info.status == "FAILED", "ended, not left RUNNING"
        assert not list((disk / "run" / "checkpoints").glob(f"*{TEMPORARY_SUFFIX}"))
        filler.unlink()  # space again: only what the run wrote is left
        assert_nothing_torn(disk / "run")

        assert_resumes_to_the_reference(root, failed.info.run_id, reference)


def test_runs_started_together_from_one_folder_keep_apart(root: Path) -> None:
    tiny = (*SETTINGS[1:], "trainer.max_epochs=2")
    processes = {seed: train(root, *tiny, f"seed={seed}", name=f"seed{seed}") for seed in (1, 2, 3)}
    for seed, process in processes.items():
        assert process.wait(timeout=300) == 0, (root / f"seed{seed}.log").read_text()[-3000:]
    runs = {int(run.data.params["seed"]): run for run in all_runs(store_uri(root))}
    assert sorted(runs) == [1, 2, 3] and {run.info.status for run in runs.values()} == {"FINISHED"}
    folders = {seed: Path(run.data.tags["output_dir"]) for seed, run in runs.items()}
    assert len(set(folders.values())) == 3, "one output folder per run"
    for seed, folder in folders.items():
        assert f"seed: {seed}\n" in (folder / ".hydra" / "config.yaml").read_text()
        assert (folder / "confusion_matrix.png").is_file() and (folder / "train.log").is_file()
        names = {p.name for p in (folder / "checkpoints").iterdir()}
        assert "last.ckpt" in names and not [n for n in names if "-v" in n], names
        assert [p.name for p in (folder / RECORD_FOLDER).iterdir()] == [runs[seed].info.run_id]

    second = runs[2].info.run_id
    resumed = run_cli("pipeline.train", f"resume={second}", *tiny, "seed=2", "trainer.max_epochs=3", root=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = mlflow.MlflowClient(store_uri(root)).get_run(second)
    assert run.data.tags["resumed_from"] == str(folders[2] / "checkpoints" / "last.ckpt"), "its own checkpoint"
    steps = [m.step for m in mlflow.MlflowClient(store_uri(root)).get_metric_history(second, "val/acc")]
    assert len(steps) == len(set(steps)) == 3


@as_root
def test_a_run_left_running_on_another_host_is_closed_only_by_hand(root: Path) -> None:
    # A host of another name: its own UTS namespace, as root.
    elsewhere = ["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh"]
    with (root / "elsewhere.log").open("w") as log:
        process = subprocess.Popen(
            [*elsewhere, sys.executable, "-m", "pipeline.train", f"paths.root={root}", *QUIET, *SETTINGS],
            cwd=REPO,
            env=clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    wait_for(lambda: output_folder(root), process, "run opened")
    kill(process)
    (run,) = all_runs(store_uri(root))
    assert run.data.tags["host"] == "elsewhere"

    def sync(*args: str) -> subprocess.CompletedProcess[str]:
        arguments = [*args, "--tracking-uri", store_uri(root)]
        return run_module("pipeline.sync", arguments, cwd=REPO, env=clean_env(), timeout=120)

    listed = sync("--close-stale")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert f"python -m pipeline.sync --close-run {run.info.run_id}" in listed.stdout, "said how to close it"
    assert mlflow.MlflowClient(store_uri(root)).get_run(run.info.run_id).info.status == "RUNNING", "no guessing"

    closed = sync("--close-run", run.info.run_id)
    assert closed.returncode == 0, closed.stderr[-3000:]
    ended = mlflow.MlflowClient(store_uri(root)).get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and "by hand" in ended.data.tags[CLOSED_TAG]


def test_a_run_killed_while_its_tracking_server_is_down_resumes_with_every_point(
    root: Path, postgres: Database, reference: dict[str, float]
) -> None:
    artifacts, port = root / "artifacts", free_port()
    url, server = start(postgres.tcp_uri, artifacts, port=port)
    settings = (*SETTINGS, f"logger.tracking_uri={url}")
    try:
        process = train(root, *settings, "logger.http.max_retries=0")
        wait_for(lambda: epochs_done(output_folder(root)) >= 2, process, "2 epochs")
        process.send_signal(signal.SIGSTOP)
        stop(server, signal.SIGKILL)  # the server dies mid-run, and the run is killed while it is down:
        kill(process)  # what it recorded but had not sent yet is only on its disk
        wait_until_closed(port)
        output = output_folder(root)
        before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
        run_id = next(output.glob(f"{RECORD_FOLDER}/*")).name
        early = run_cli("pipeline.train", f"resume={run_id}", *settings, root=root)  # the server still down
        assert early.returncode == 2 and "Traceback" not in early.stderr, early.stderr[-3000:]
        assert "cannot connect (connection refused)" in early.stderr
        assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before, "nothing changed"
        url, server = start(postgres.tcp_uri, artifacts, port=port)  # the server comes back
        (killed,) = all_runs(url)
        record = RunRecord.load(next(output.glob(f"{RECORD_FOLDER}/*")))

        assert_resumes_to_the_reference(root, killed.info.run_id, reference, url)
        client = mlflow.MlflowClient(url)
        recorded = {(point.key, point.step) for point in record.metrics()}
        held = {(m.key, m.step) for key in dict(recorded) for m in client.get_metric_history(killed.info.run_id, key)}
        assert recorded <= held, "every point the killed process recorded reached the server"
    finally:
        stop(server)

"""Shards end to end, as a user runs them: digits converted by `python -m pipeline.shard` straight into a bucket of a
real S3 API server on loopback (moto's server mode), trained on with data=shards from s3:// into an MLflow run, and
evaluated; bad input stopped before anything trains; data-parallel ranks fed the same number of batches; a run that
crashed mid-epoch resumed with the batches it would have drawn next."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from tests.conftest import QUIET, REPO, clean_env, run_cli, store_uri
from tests.helpers.batch_log import read
from tests.helpers.commands import run_module
from tests.helpers.isolation import run_isolated
from tests.helpers.s3_server import make_bucket, s3_env, s3_server

pytestmark = pytest.mark.e2e

BUCKET, PREFIX = "datasets", "digits"
URL = f"s3://{BUCKET}/{PREFIX}"
DIGITS = ["data.mean=[0.305]", "data.std=[0.323]"]  # what the converter prints for digits
SHORT = ["trainer.max_epochs=1", "logger.log_checkpoint=false", "class_activation.images=2"]
TRAIN_IMAGES, TEST_IMAGES = 1257, 270  # the digits' splits


def convert(output: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.shard data=digits output=<output>` as a user types it (7 shards of at most 300 images)."""
    arguments = ["data=digits", f"output={output}", "shard.max_samples=300"]
    return run_module("pipeline.shard", arguments, cwd=REPO, env=env or clean_env(), timeout=300)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The server's environment (endpoint and credentials), with digits converted into s3://datasets/digits."""
    folder = tmp_path_factory.mktemp("s3")
    with s3_server(folder / "moto.log") as endpoint:
        make_bucket(endpoint, BUCKET)
        env = clean_env(**s3_env(endpoint))
        done = convert(URL, env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"Train on them: python -m pipeline.train data=shards data.url={URL} {' '.join(DIGITS)}" in done.stdout
        yield env


def test_digits_converted_into_s3_train_from_it_into_an_mlflow_run_and_evaluate(s3: dict[str, str], root: Path) -> None:
    done = run_cli("pipeline.train", "data=shards", f"data.url={URL}", *DIGITS, *SHORT, root=root, env=s3)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("shards").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test/samples"] == TEST_IMAGES and metrics["test/acc"] > 0.3 and "val/acc" in metrics
    assert run.data.params["data.url"] == URL
    inputs = {item.dataset.name: item.dataset for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"shards-train", "shards-val", "shards-test"}
    assert f'"images": {TRAIN_IMAGES}' in inputs["shards-train"].profile
    confusion = next(root.glob("outputs/*/*/confusion_matrix.csv")).read_text()
    assert all(str(digit) in confusion.splitlines()[0] for digit in range(10)), "class names from the shards' index"

    evaluated = run_cli("pipeline.evaluate", f"source={run.info.run_id}", root=root, env=s3)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (evaluation,) = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert evaluation.data.metrics["test/samples"] == TEST_IMAGES
    assert abs(evaluation.data.metrics["test/acc"] - metrics["test/acc"]) < 1e-6, "the same images, the same model"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([f"data.url=s3://{BUCKET}/nothing-here"], f"data.url=s3://{BUCKET}/nothing-here: no shards there"),
        (["data.url=s3://no-such-bucket/digits"], "s3://no-such-bucket/digits: no such bucket"),
        (
            [f"data.url={URL}", "data.endpoint_url=http://127.0.0.1:9"],
            f"{URL}: the S3 endpoint http://127.0.0.1:9 does not answer",
        ),
    ],
)
def test_bad_shards_input_stops_with_exit_2_before_a_run_exists(
    s3: dict[str, str], root: Path, overrides: list[str], message: str
) -> None:
    done = run_cli("pipeline.train", "data=shards", *overrides, root=root, env=s3)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: {message}" in done.stderr and "Traceback" not in done.stderr
    client = mlflow.MlflowClient(store_uri(root))
    assert client.get_experiment_by_name("shards") is None, "no MLflow run was opened"


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits converted into a folder (the DDP test runs in a network namespace the loopback server is not in)."""
    folder = tmp_path_factory.mktemp("local")
    done = convert(str(folder / "shards"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "shards"


def logged(folder: Path) -> list[str]:
    return ["+callbacks.log._target_=tests.helpers.batch_log.BatchLog", f"+callbacks.log.folder={folder}"]


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (gloo's isolation) need root")
def test_every_ddp_rank_trains_the_same_number_of_batches(local_shards: Path, root: Path) -> None:
    argv = [
        sys.executable, "-m", "pipeline.train", f"paths.root={root}", *QUIET, "data=shards", f"data.url={local_shards}",
        *DIGITS, "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=2", "data.batch_size=32",
        "data.num_workers=1", "logger.log_checkpoint=false", "class_activation.images=0", *logged(root / "batches"),
    ]  # fmt: skip
    run_isolated(argv, root / "ddp.log", timeout=400)
    ranks = [read(root / "batches" / f"rank{rank}.txt") for rank in (0, 1)]
    per_rank = TRAIN_IMAGES // 2  # 628 each; the odd one out waits for the next epoch
    for epoch in (0, 1):
        counts = [sorted(b for e, b in batches if e == epoch) for batches in ranks]
        assert counts[0] == counts[1] == list(range(-(-per_rank // 32))), "20 batches on each rank, every epoch"
        sizes = [sum(size for (e, _), (size, _) in batches.items() if e == epoch) for batches in ranks]
        assert sizes == [per_rank, per_rank]
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("shards").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["test/samples"] == TEST_IMAGES


def test_a_run_that_crashed_mid_epoch_resumes_with_the_batches_it_would_have_drawn(
    local_shards: Path, root: Path
) -> None:
    settings = [
        "data=shards", f"data.url={local_shards}", *DIGITS, "aug=none", "trainer.max_epochs=2", "data.batch_size=128",
        "data.num_workers=2", "data.shuffle_block=100", "logger.log_checkpoint=false", "class_activation.images=0",
    ]  # fmt: skip
    whole = run_cli("pipeline.train", *settings, *logged(root / "whole"), root=root)
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = run_cli("pipeline.train", *settings, *logged(root / "crashed"), "+callbacks.log.stop_at=[1,4]", root=root)
    assert crashed.returncode != 0 and "stopped by the test at epoch 1, batch 4" in crashed.stderr
    (interrupted,) = root.glob("outputs/*/*/checkpoints/interrupted.ckpt")
    resumed = run_cli("pipeline.train", *settings, *logged(root / "resumed"), f"resume={interrupted}", root=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = read(root / "whole" / "rank0.txt"), read(root / "resumed" / "rank0.txt")
    later = {key: value for key, value in expected.items() if key >= (1, 4)}
    assert len(later) == 6 and got == later, "batches 4..9 of epoch 1, the same images in the same order"
    assert read(root / "crashed" / "rank0.txt")[(0, 3)] == expected[(0, 3)], "the same seed draws the same epoch"

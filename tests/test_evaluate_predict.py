"""Evaluate, predict and register a real trained run: the evaluation is a new run linked to its source with the
same test metrics, predictions name the run's classes and survive a corrupt file, a registered version loads back
by name and version, and every mistake a user can make is exit status 2 with the fix."""

from __future__ import annotations

import csv
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import compose
from pipeline.errors import UserInputError
from pipeline.evaluate import evaluate
from pipeline.predict import predict
from pipeline.register import register
from pipeline.run import RunResult, run
from tests.conftest import QUIET, REPO, clean_env, compose_in, run_cli, store_uri
from tests.helpers.commands import run_module

QUICK = ("trainer.max_epochs=2", "trainer.limit_train_batches=5", "scheduler.warmup_epochs=0")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(module: str, *overrides: str, root: Path) -> subprocess.CompletedProcess[str]:
    """`python -m <module>` for entry points without a Trainer (run_cli adds Trainer overrides)."""
    return run_module(module, [f"paths.root={root}", *overrides], cwd=REPO, env=clean_env(), timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        result = run(compose_in(root, QUICK))
    return root, result


@pytest.fixture(scope="module")
def evaluated(trained: tuple[Path, RunResult]) -> tuple[str, subprocess.CompletedProcess[str]]:
    root, result = trained
    done = run_cli("pipeline.evaluate", f"source={result.run_id}", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"Evaluation run: ([0-9a-f]{32})", done.stdout).group(1), done


@pytest.mark.e2e
def test_evaluation_is_a_new_linked_run_with_the_training_test_metrics(
    trained: tuple[Path, RunResult], evaluated: tuple[str, subprocess.CompletedProcess[str]]
) -> None:
    root, result = trained
    run_id, done = evaluated
    client = mlflow.MlflowClient(store_uri(root))
    evaluation, source = client.get_run(run_id), client.get_run(result.run_id)
    assert run_id != result.run_id and evaluation.info.status == "FINISHED"
    assert evaluation.info.experiment_id == source.info.experiment_id
    assert evaluation.data.tags["kind"] == "evaluation" and evaluation.data.tags["source_run_id"] == result.run_id
    for metric in ("test/acc", "test/f1", "test/acc_top5"):
        assert evaluation.data.metrics[metric] == pytest.approx(source.data.metrics[metric], abs=1e-6), metric
    assert evaluation.data.metrics["test/samples"] == source.data.metrics["test/samples"] == 270
    assert "│ 0     │" in done.stdout.replace("┃", "│"), "the per-class table is printed"

    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=store_uri(root)))
    with (artifacts / "reports" / "per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == [str(digit) for digit in range(10)]
    assert sum(int(row["support"]) for row in rows) == 270
    assert all(0 <= float(row[key]) <= 1 for row in rows for key in ("precision", "recall", "f1"))
    assert (artifacts / "figures" / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_a_checkpoint_file_evaluates_like_its_run(trained: tuple[Path, RunResult], root: Path) -> None:
    train_root, result = trained
    cfg = compose_in(
        root, [f"source={result.best_checkpoint}", f"logger.tracking_uri={store_uri(train_root)}", "split=val"],
        config_name="evaluate",
    )  # fmt: skip
    evaluation = evaluate(cfg)
    assert evaluation.source_run_id == result.run_id, "the run is found from the run folder beside the checkpoint"
    assert evaluation.metrics["val/acc"] == pytest.approx(result.metrics["best_val/acc"], abs=1e-6)
    assert evaluation.files["figures"].read_bytes()[:8] == PNG_MAGIC


def write_digits(folder: Path, count: int = 6) -> list[int]:
    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = (digits.images[index] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).resize((32, 32)).save(folder / f"digit{index}.png")
    (folder / "corrupt.png").write_bytes(PNG_MAGIC + b"truncated")
    return [int(label) for label in digits.target[:count]]


@pytest.mark.e2e
def test_predict_prints_top_k_and_writes_a_csv_with_an_error_row(trained: tuple[Path, RunResult]) -> None:
    root, result = trained
    write_digits(root / "to_predict")
    done = cli("pipeline.predict", f"source={result.run_id}", f"input={root / 'to_predict'}", "top_k=3", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Top-3 predictions" in done.stdout and "6 predicted, 1 unreadable" in done.stdout
    path = Path(re.search(r"Predictions: (\S+\.csv)", done.stdout.replace("\n", "")).group(1))
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and list(rows[0]) == [
        "file", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3", "error",
    ]  # fmt: skip
    (bad,) = [row for row in rows if row["error"]]
    assert bad["file"].endswith("corrupt.png") and bad["class_1"] == ""
    for row in rows:
        if row is bad:
            continue
        probabilities = [float(row[f"probability_{rank}"]) for rank in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert {row[f"class_{rank}"] for rank in (1, 2, 3)} <= {str(digit) for digit in range(10)}


@pytest.mark.slow
def test_a_registered_version_is_a_source_by_name_and_version(trained: tuple[Path, RunResult], root: Path) -> None:
    train_root, result = trained
    uri = store_uri(train_root)
    version = register(result.run_id, "digits-lenet", uri)
    assert str(version.version) == "1" and version.run_id == result.run_id
    assert str(register(result.run_id, "digits-lenet", uri).version) == "2", "registering again adds a version"
    cfg = compose_in(root, ["source=models:/digits-lenet/1", f"logger.tracking_uri={uri}"], config_name="evaluate")
    evaluation = evaluate(cfg)
    assert evaluation.source_run_id == result.run_id
    assert evaluation.metrics["test/acc"] == pytest.approx(result.metrics["test/acc"], abs=1e-6)
    tags = mlflow.MlflowClient(uri).get_run(evaluation.run_id).data.tags
    assert tags["registered_model"] == "digits-lenet/1" and tags["source"] == "models:/digits-lenet/1"


def class_folders(folder: Path, classes: int) -> Path:
    digits = load_digits()
    for label in range(classes):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(digits.target == label)[:10]:
            image = (digits.images[index] * 16).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).resize((16, 16)).save(folder / str(label) / f"{index}.png")
    return folder


@pytest.mark.e2e
def test_user_errors_name_the_problem_and_the_fix(
    trained: tuple[Path, RunResult], evaluated: tuple[str, subprocess.CompletedProcess[str]], root: Path
) -> None:
    train_root, result = trained
    uri = f"logger.tracking_uri={store_uri(train_root)}"
    three = class_folders(root / "three", 3)

    def fails(overrides: list[str], message: str) -> None:
        with pytest.raises(UserInputError, match=message):
            evaluate(compose_in(root, [uri, *overrides], config_name="evaluate"))

    fails([f"source={evaluated[0]}"], r"logged no MLflow model and has no checkpoint artifact.*its training run is")
    fails([f"source={root / 'missing.ckpt'}"], r"no such file")
    fails([f"source={root}"], r"is a folder")
    fails(["source=models:/digits-lenet/99"], r"not found.*pipeline.register")
    fails([f"source={result.run_id}", "data=imagefolder", f"data.root={three}"], r"has 3 classes.*trained on 10")
    fails([f"source={result.run_id}", "split=holdout"], r"split=holdout: must be one of test, val, train")
    fails([f"source={result.run_id}", "trainer.accelerator=tpu"], r"this machine has no TPU \(torch_xla\)")
    Image.new("L", (8, 8)).save(root / "one.png")
    with pytest.raises(UserInputError, match=r"device=cuda:99: this machine has (no|\d+) cuda device\(s\)"):
        overrides = [f"paths.root={root}", uri, f"source={result.run_id}", f"input={root}/one.png", "device=cuda:99"]
        predict(compose(overrides, config_name="predict"))

    with ThreadPoolExecutor(2) as pool:  # the CLI: exit status 2 and the message, no traceback
        unknown = pool.submit(run_cli, "pipeline.evaluate", f"source={'0' * 32}", root=train_root)
        empty = pool.submit(cli, "pipeline.predict", f"source={result.run_id}", f"input={root}/*.jpg", root=train_root)
        unknown, empty = unknown.result(), empty.result()
    assert unknown.returncode == 2 and f"error: source={'0' * 32}: no run" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert empty.returncode == 2 and "matches no files" in empty.stderr


@pytest.mark.e2e
def test_a_run_on_a_relative_data_root_evaluates_from_another_folder(root: Path, tmp_path: Path) -> None:
    """data.root as typed in the project folder: the run records it absolute, so its evaluation finds the images."""
    class_folders(root / "shapes", 2)
    done = run_module(
        "pipeline.train",
        [*QUIET, "data=imagefolder", "data.root=shapes", "data.batch_size=4", "trainer.max_epochs=1"],
        cwd=root,
        env=clean_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("imagefolder").experiment_id])
    assert run.data.params["data.root"] == str(root / "shapes")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    evaluated = run_module(
        "pipeline.evaluate",
        [*QUIET, f"source={run.info.run_id}", f"logger.tracking_uri={store_uri(root)}"],
        cwd=elsewhere,
        env=clean_env(),
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

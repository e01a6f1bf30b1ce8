"""A trained run leaves the pipeline as an MLflow model: a logged model linked to its run, test metrics and test
dataset; dataset inputs whose digests follow the images and the split; system metrics; a pyfunc that answers for
image bytes exactly as pipeline.predict does for the files, row by row through a corrupt one; registered with an
alias that evaluate, predict and MLflow's real scoring server all take, over HTTP with real PNG and JPEG bytes."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import compose
from pipeline.data.sources import load_data
from pipeline.predict import Prediction, predict
from pipeline.register import register
from pipeline.run import RunResult, run
from pipeline.tracking.datasets import split_datasets
from pipeline.tracking.record import RECORD_FOLDER, RunRecord
from tests.conftest import REPO, clean_env, compose_in, store_uri
from tests.helpers.commands import run_module
from tests.helpers.mlflow_server import free_port
from tests.helpers.scoring_server import post, scoring_server, served_by

QUICK = (
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=5",
    "scheduler.warmup_epochs=0",
    "logger.system_metrics.interval=1",  # a sample every second: a short run still gets several
)
CLASSES = [str(digit) for digit in range(10)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    root = tmp_path_factory.mktemp("model")
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        result = run(compose_in(root, QUICK))
    return root, result


@pytest.fixture(scope="module")
def images(trained: tuple[Path, RunResult]) -> Path:
    """Digits as 8-bit grayscale PNGs, one as an RGB JPEG, and a file that is no image, in a folder."""
    folder = trained[0] / "images"
    folder.mkdir()
    digits = load_digits()
    for index in range(6):
        pixels = (digits.images[index] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(folder / f"digit{index}.png")
    rgb = np.repeat((digits.images[6] * 16).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).resize((32, 32)).save(folder / "digit6.jpg", quality=95)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return folder


def predicted(root: Path, source: str, folder: Path) -> list[Prediction]:
    """pipeline.predict on every file of `folder`, with every class's probability (top_k = all)."""
    cfg = compose(
        [f"paths.root={root}", f"source={source}", f"input={folder}", "top_k=10", f"csv={root}/predictions.csv"],
        config_name="predict",
    )
    return predict(cfg)[0]


def same_answers(rows: list[dict], expected: list[Prediction]) -> None:
    """The pyfunc's rows say exactly what pipeline.predict said of the same files, in the same order."""
    assert len(rows) == len(expected)
    for row, prediction in zip(rows, expected, strict=True):
        if prediction.error:
            assert row["error"] and row["class"] is None and row["probabilities"] is None, row
            continue
        assert row["error"] == ""
        assert (row["class"], row["probability"]) == prediction.top[0]
        assert dict(zip(CLASSES, row["probabilities"], strict=True)) == dict(prediction.top), "to the last bit"


@pytest.mark.slow
def test_the_run_logs_its_model_datasets_and_system_metrics(trained: tuple[Path, RunResult]) -> None:
    root, result = trained
    client = mlflow.MlflowClient(store_uri(root))
    finished = client.get_run(result.run_id)
    (output,) = finished.outputs.model_outputs
    assert output.model_id == result.model_id
    (model,) = client.search_logged_models([finished.info.experiment_id])
    assert model.model_id == result.model_id and model.source_run_id == result.run_id
    assert model.name == "model" and str(model.status) == "READY" and model.model_type == "image-classifier"
    assert model.params["model.name"] == "lenet5", "the run's config describes the model"

    datasets = {
        tag.value: item.dataset
        for item in finished.inputs.dataset_inputs
        for tag in item.tags
        if tag.key == "mlflow.data.context"
    }
    assert set(datasets) == {"training", "validation", "test"}
    assert datasets["test"].name == "digits-test" and datasets["test"].source_type == "code"
    assert '"images_per_class": {"0": 27' in datasets["test"].profile
    linked = {metric.key: metric for metric in model.metrics}
    assert linked["test/acc"].value == pytest.approx(result.metrics["test/acc"])
    assert (linked["test/acc"].dataset_name, linked["test/acc"].dataset_digest) == (
        "digits-test",
        datasets["test"].digest,
    )
    assert linked["model/params"].dataset_name is None and linked["model/params"].value > 0

    # The digest follows the images and the split: the same config gives the same digests, another split others.
    again = split_datasets(compose_in(root, QUICK).data, load_data(compose_in(root, QUICK).data))
    assert {context: d.digest for context, d in again.items()} == {c: d.digest for c, d in datasets.items()}
    other = compose_in(root, [*QUICK, "data.source.split_seed=1"]).data
    assert split_datasets(other, load_data(other))["test"].digest != datasets["test"].digest

    system = {key for key in finished.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert {"system/disk_usage_megabytes", "system/network_receive_megabytes"} <= system

    artifacts = {item.path for item in client.list_artifacts(result.run_id)}
    assert "checkpoints" not in artifacts, "the weights are in the model; the checkpoint stays in the output folder"
    record = RunRecord.load(result.output_dir / RECORD_FOLDER / result.run_id)
    assert record.model is not None and record.model["model_id"] == result.model_id
    assert (result.output_dir / "model" / "MLmodel").is_file() and len(record.datasets) == 3


@pytest.mark.slow
def test_the_pyfunc_answers_exactly_as_predict_does(trained: tuple[Path, RunResult], images: Path) -> None:
    root, result = trained
    files = sorted(images.iterdir())
    expected = predicted(root, result.run_id, images)
    assert [p.path for p in expected] == [str(f) for f in files] and sum(bool(p.error) for p in expected) == 1
    assert predicted(root, f"models:/{result.model_id}", images) == expected, "the logged model by its id"

    mlflow.set_tracking_uri(store_uri(root))  # runs:/ and models:/ URIs are resolved through it
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.metadata.metadata["classes"] == CLASSES
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    assert model.metadata.saved_input_example_info["serving_input_path"] == "serving_input_example.json"
    answers = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert list(answers.columns) == ["class", "probability", "probabilities", "error"]
    same_answers(answers.to_dict("records"), expected)


@pytest.mark.slow
def test_registered_with_an_alias_it_is_served_over_http(trained: tuple[Path, RunResult], images: Path) -> None:
    root, result = trained
    uri = store_uri(root)
    version = register(result.run_id, "digits-lenet", uri, alias="champion")
    assert version.source == f"models:/{result.model_id}" and version.run_id == result.run_id
    assert version.tags["test/acc"] == str(result.metrics["test/acc"]) and version.tags["model"] == "lenet5"
    client = mlflow.MlflowClient(uri)
    assert client.get_model_version_by_alias("digits-lenet", "champion").version == version.version

    files = sorted(images.iterdir())
    expected = predicted(root, result.run_id, images)
    assert predicted(root, "models:/digits-lenet@champion", images) == [
        Prediction(str(p.path), p.top, p.error) for p in expected
    ], "source=models:/<name>@<alias> reads the same weights"

    payload = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}
    }
    with scoring_server("models:/digits-lenet@champion", uri, root / "serve.log") as url:
        status, answer = post(url, payload)
        assert status == 200, answer
        same_answers(answer["predictions"], expected)

        status, refused = post(url, {"dataframe_split": {"columns": ["picture"], "data": [["aGk="]]}})
        assert status == 400 and "missing inputs ['image']" in refused["message"]
        status, refused = post(url, b"{not json")
        assert status == 400 and "JSON" in refused["message"]
        status, again = post(
            url, {"dataframe_split": {"columns": ["image"], "data": payload["dataframe_split"]["data"][:1]}}
        )
        assert status == 200 and again["predictions"][0] == answer["predictions"][0], "it still serves"


@pytest.mark.e2e
def test_register_cli_sets_the_alias_prints_a_serve_command_that_serves_and_refuses_mistakes(
    trained: tuple[Path, RunResult], images: Path
) -> None:
    root, result = trained

    def cli(*overrides: str) -> subprocess.CompletedProcess[str]:
        arguments = [f"paths.root={root}", *overrides]
        return run_module("pipeline.register", arguments, cwd=REPO, env=clean_env(), timeout=120)

    done = cli(f"source=models:/{result.model_id}", "name=digits-cli", "alias=champion")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Registered models:/digits-cli/1" in done.stdout
        and "models serve -m models:/digits-cli@champion" in done.stdout
    )
    # The printed command, pasted into a shell whose PATH lacks the environment (not activated), on a free port
    (serve,) = [line.removeprefix("Serve it:") for line in done.stdout.splitlines() if line.startswith("Serve it:")]
    port = free_port()
    line = serve.replace("--port 5001", f"--port {port}")
    env = clean_env(PATH="/usr/local/bin:/usr/bin:/bin")
    with served_by(["sh", "-c", line], env, port, root / "serve-cli.log") as url:
        image = base64.b64encode((images / "digit0.png").read_bytes()).decode()
        status, answer = post(url, {"dataframe_split": {"columns": ["image"], "data": [[image]]}})
        assert status == 200 and answer["predictions"][0]["error"] == "", answer
    bad = cli(f"source={result.run_id}", "name=digits/cli")
    assert bad.returncode == 2 and "error: name=digits/cli" in bad.stderr and "Traceback" not in bad.stderr

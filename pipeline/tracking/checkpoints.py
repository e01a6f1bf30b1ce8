"""An MLflow run of ours brought to local disk: its network's weights, its config and its classes.

`runs:/<run id>` (or runs:/<run id>/model) names the weights of the MLflow model the training logged
(pipeline.tracking.model); a run from
before models were logged, the checkpoint it uploaded under `checkpoints/` (logger.log_checkpoint=true).
`runs:/<run id>/<artifact path>` names the checkpoint at that path. `source=` (evaluate, predict, register) and
`model.weights=runs:/…` (transfer learning) both read runs through this module.

Every error names `what` the user gave (e.g. "source=…", "model.weights=…") and is raised as the caller's own
error type, so each command reports it as it reports its other input mistakes.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import UserInputError
from pipeline.tracking.provenance import KIND_TAG, SOURCE_TAG
from pipeline.tracking.store import existing_store_client

RUNS_PREFIX = "runs:/"
MODELS_PREFIX = "models:/"
CHECKPOINT_FOLDER = "checkpoints"  # where run(cfg) uploads the best checkpoint (logger.log_checkpoint=true)
MODEL_NAME = "model"  # the name of the MLflow model a training logs: runs:/<run id>/model names it, as in MLflow
MODEL_WEIGHTS = "artifacts/weights.safetensors"  # the network's weights inside it
CONFIG_ARTIFACT, CLASSES_ARTIFACT = "config.yaml", "data/class_counts.json"  # what every training logs
RUN_ID = re.compile(r"[0-9a-f]{32}")

ErrorType = type[UserInputError]


def is_run_uri(text: str) -> bool:
    return str(text).startswith(RUNS_PREFIX)


def parse_run_uri(text: str) -> tuple[str, str | None]:
    """runs:/<run id>[/<artifact path>] → (run id, artifact path or None)."""
    run_id, _, artifact = str(text)[len(RUNS_PREFIX) :].strip("/").partition("/")
    return run_id, artifact or None


def get_run(client: Any, run_id: str, what: str, error: ErrorType = UserInputError) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as failure:
        raise error(
            f"{what}: no run {run_id!r} in {client.tracking_uri} ({str(failure).splitlines()[0]}). Copy the run id "
            "from the training's output ('MLflow run: …') or the MLflow UI, and point logger.tracking_uri at the "
            "store that holds it."
        ) from failure


def checkpoint_artifact(
    client: Any, run: Any, what: str, artifact: str | None = None, error: ErrorType = UserInputError
) -> str:
    """The artifact path of the run's single checkpoint (under `checkpoints/`, or `artifact`)."""
    run_id = run.info.run_id
    folder = artifact or CHECKPOINT_FOLDER
    found = [item.path for item in client.list_artifacts(run_id, folder) if item.path.endswith(".ckpt")]
    if artifact and artifact.endswith(".ckpt") and not found:
        parent = artifact.rpartition("/")[0]
        found = [item.path for item in client.list_artifacts(run_id, parent or None) if item.path == artifact]
    if len(found) == 1:
        return found[0]
    if found:
        raise error(
            f"{what}: run {run_id} has {len(found)} checkpoints under {folder!r} ({', '.join(found)}): name one with "
            f"{RUNS_PREFIX}{run_id}/<file>.ckpt."
        )
    evaluated = run.data.tags.get(SOURCE_TAG)
    hint = f" It is a {run.data.tags[KIND_TAG]} run; its training run is {evaluated}." if evaluated else ""
    raise error(
        f"{what}: run {run_id} logged no MLflow model and has no checkpoint artifact under {folder!r}.{hint} Every "
        "training logs its best network as an MLflow model: give a training run's id, or the checkpoint file itself "
        "(<output folder>/checkpoints/best-….ckpt)."
    )


def _download(client: Any, run_id: str, path: str, folder: Path) -> Path:
    import mlflow

    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(folder), tracking_uri=client.tracking_uri
        )
    )


def run_model_id(client: Any, run: Any) -> str | None:
    """The id of the newest finished (READY) MLflow model the run logged; None for a run that logged none."""
    from mlflow.entities import LoggedModelStatus

    outputs = sorted(run.outputs.model_outputs if run.outputs else [], key=lambda output: output.step)
    for output in reversed(outputs):
        if client.get_logged_model(output.model_id).status == LoggedModelStatus.READY:
            return output.model_id
    return None


def download_model_weights(client: Any, model_id: str, folder: Path) -> Path:
    """The network's weights of logged model `model_id` (pipeline.tracking.model), downloaded into `folder`."""
    import mlflow

    location = client.get_logged_model(model_id).artifact_location
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/{MODEL_WEIGHTS}", dst_path=str(folder), tracking_uri=client.tracking_uri
        )
    )


def download_weights(
    client: Any, run: Any, artifact: str | None, folder: Path, what: str, error: ErrorType = UserInputError
) -> tuple[Path, str]:
    """The run's network weights downloaded into `folder`, and where they came from (a models:/ or runs:/ URI): those
    of the MLflow model it logged, else (a run from before models were logged, or `artifact` named) its checkpoint."""
    model_id = run_model_id(client, run) if artifact in (None, MODEL_NAME) else None
    if model_id is not None:
        return download_model_weights(client, model_id, folder), f"{MODELS_PREFIX}{model_id}"
    path = checkpoint_artifact(client, run, what, artifact, error)
    return _download(client, run.info.run_id, path, folder), f"{RUNS_PREFIX}{run.info.run_id}/{path}"


def download_run_config(
    client: Any, run: Any, folder: Path, what: str, error: ErrorType = UserInputError
) -> tuple[Any, list[str] | None]:
    """The training's resolved config and its class names (None when it logged none), downloaded into `folder`."""
    from omegaconf import OmegaConf

    run_id = run.info.run_id
    names = {item.path for item in client.list_artifacts(run_id)} | {
        item.path for item in client.list_artifacts(run_id, "data")
    }
    if CONFIG_ARTIFACT not in names:
        raise error(
            f"{what}: run {run_id} has no {CONFIG_ARTIFACT} artifact, so its model cannot be rebuilt: it is not a "
            "training run of this pipeline. Give a training run's id, or a .ckpt file together with model=<option>."
        )
    config = OmegaConf.load(_download(client, run_id, CONFIG_ARTIFACT, folder))
    counts = _download(client, run_id, CLASSES_ARTIFACT, folder) if CLASSES_ARTIFACT in names else None
    return config, class_names(counts)


def class_names(counts: Path | None) -> list[str] | None:
    """Class names in label order: the keys of the training split in a run's data/class_counts.json."""
    if counts is None or not counts.is_file():
        return None
    splits = json.loads(counts.read_text())
    first = splits.get("train") or next(iter(splits.values()), {})
    return [str(name) for name in first] or None


@contextmanager
def local_weights(text: str | None, tracking_uri: str, what: str, error: ErrorType) -> Iterator[Path | None]:
    """For runs:/<id>[/<path>] (model.weights), the run's weights (its MLflow model's, or the checkpoint at <path>)
    downloaded into a temporary folder for as long as the block runs; None for anything else (a file is read where it
    is, and checked by whoever reads it)."""
    if text is None or not is_run_uri(text):
        yield None
        return
    run_id, artifact = parse_run_uri(text)
    client = existing_store_client(tracking_uri, what, error)
    run = get_run(client, run_id, what, error)
    with tempfile.TemporaryDirectory(prefix="weights-") as folder:
        yield download_weights(client, run, artifact, Path(folder), what, error)[0]

"""A run's best network as an MLflow Model: saved into the run's output folder, then logged as the run's MLflow 3
logged model.

`<output folder>/model/` is a complete MLflow model directory (MLmodel, the pyfunc of pipeline.serving, its
signature, an input example, pinned requirements): the best checkpoint's network weights as safetensors and the run's
evaluation preprocessing and class names (pipeline.inference.ClassifierSpec). It is saved first, then logged: a
logged model created with the run as its source, its files uploaded, marked an output of the run (the run's "Logged
models", the runs table's Models column), and linked to the run's test metrics with the test dataset they were
measured on (and to its size, `model/params` and `model/flops`).

MLflow's `log_model` does these steps on a temporary copy; here the copy in the output folder is the one logged, so
when the server fails the run keeps it and `python -m pipeline.sync` logs it later (the record names it), and a
model can be served from the output folder without any server (`mlflow models serve -m <output folder>/model`).

Requirements are pinned to the versions installed here, for the packages the model's code imports. MLflow's own
inference of them loads the model in a new process (about 20 s here) and returned a list without torch.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.data.images import ImageSplits
from pipeline.data.transforms import InputSpec
from pipeline.inference import ClassifierSpec
from pipeline.tracking.checkpoints import MODEL_NAME, MODEL_WEIGHTS

if TYPE_CHECKING:
    from pipeline.tracking.logger import RecordedMLFlowLogger
    from pipeline.tracking.record import RunRecord

MODEL_FOLDER = "model"  # <output folder>/model/: the MLflow model, as logged
MODEL_TYPE = "image-classifier"
WEIGHTS_FILE, SPEC_FILE = Path(MODEL_WEIGHTS).name, "classifier.json"  # the model's artifacts
# What the model's code imports (pipeline.serving, pipeline.inference and what they import), pinned as installed.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "albumentations", "numpy", "pandas", "pillow", "safetensors")
LINKED_METRICS = ("test/", "model/params", "model/flops")  # the run's metrics that describe the model
ENTRY_POINT = Path(__file__).resolve().parents[1] / "served_model.py"  # MLflow's "models from code" file


def requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def png(image: np.ndarray) -> bytes:
    """A uint8 HWC image (1 or 3 channels) as the bytes of a PNG file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_model(folder: Path, spec: ClassifierSpec, weights: Mapping[str, torch.Tensor], example: bytes) -> Path:
    """Save the MLflow model of `spec` with `weights` into `folder` (replaced if it exists). `example`: an image
    file's bytes, the input example; the signature is inferred from the model's own answer to it."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature
    from safetensors.torch import save_file

    from pipeline.inference import Classifier
    from pipeline.serving import INPUT_COLUMN, SPEC_ARTIFACT, WEIGHTS_ARTIFACT, answer

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    classifier = Classifier.build(spec, tensors)  # the saved weights must rebuild the network, now
    frame = pd.DataFrame({INPUT_COLUMN: [example]})
    # The answer to a good and a broken image: the schema shows which fields an image that fails leaves empty.
    signature = infer_signature(frame, answer(classifier, classifier.classify([example, b"not an image"])))
    if folder.exists():  # a resumed run saves its model again
        shutil.rmtree(folder)
    with tempfile.TemporaryDirectory(prefix="model-") as scratch:
        weights_file, spec_file = Path(scratch) / WEIGHTS_FILE, Path(scratch) / SPEC_FILE
        save_file(tensors, weights_file)
        spec_file.write_text(spec.to_json())
        mlflow.pyfunc.save_model(
            folder,
            python_model=str(ENTRY_POINT),
            artifacts={WEIGHTS_ARTIFACT: str(weights_file), SPEC_ARTIFACT: str(spec_file)},
            signature=signature,
            input_example=frame,
            pip_requirements=requirements(),
            metadata={"classes": spec.classes, "model": spec.model_name, "preprocessing": asdict(spec.input)},
        )
    return folder


def best_weights(best_checkpoint: str | None, network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights in the best checkpoint (the tested ones; the EMA weights with ema.enabled), or the
    network's own when there is no checkpoint (debug=fast)."""
    if best_checkpoint:
        from pipeline.models.weights import read_state_dict

        return read_state_dict(Path(best_checkpoint))
    return dict(network.state_dict())


def log_best_model(
    logger: RecordedMLFlowLogger,
    cfg: DictConfig,
    network: nn.Module,
    best_checkpoint: str | None,
    splits: ImageSplits,
    spec: InputSpec,
    step: int,
) -> str | None:
    """Save the run's best network as an MLflow model in its output folder and log it (see the module's docstring);
    the logged model's id, or None when MLflow did not get it (the record keeps it for pipeline.sync)."""
    # MLflow would draw a progress bar over the training's output for each file it copies or uploads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True) if cfg.model.get("kwargs") else {}
    classifier = ClassifierSpec(str(cfg.model.name), dict(kwargs), list(splits.classes), splits.channels, spec)
    example = next(part for part in (splits.test, splits.val, splits.train) if len(part))[0][0]
    save_model(logger.output_dir / MODEL_FOLDER, classifier, best_weights(best_checkpoint, network), png(example))
    tags = {"model": str(cfg.model.name), "dataset": str(cfg.data.name)}
    if OmegaConf.select(cfg, "ema.enabled"):
        tags["weights"] = "ema"
    entry = {"path": MODEL_FOLDER, "name": MODEL_NAME, "step": step, "tags": tags, "model_id": None}
    record = logger.record
    return logger.log_model(entry, lambda client, run_id: upload_model(client, run_id, record, entry))


def linked_metrics(record: RunRecord, model_id: str, run_id: str) -> list[Metric]:
    """The last point of each of the run's metrics that describe the model (LINKED_METRICS), for the model: the test
    metrics with the test dataset they were measured on."""
    test = next((entry for entry in record.datasets if entry["context"] == "test"), None)
    last: dict[str, Metric] = {}
    for point in record.metrics():
        if point.key.startswith(LINKED_METRICS):
            last[point.key] = point
    return [
        Metric(
            point.key,
            point.value,
            point.timestamp,
            point.step,
            run_id=run_id,
            model_id=model_id,
            dataset_name=test["name"] if test and point.key.startswith("test/") else None,
            dataset_digest=test["digest"] if test and point.key.startswith("test/") else None,
        )
        for point in last.values()
    ]


def upload_model(client: MlflowClient, run_id: str, record: RunRecord, entry: dict[str, Any]) -> str:
    """Log the model saved in the run's output folder (`entry` of its record) as a logged model of run `run_id`;
    returns its id. A model whose upload fails is marked FAILED in MLflow, as MLflow's log_model marks it."""
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    folder = record.output_dir / entry["path"]
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=entry["name"],
        source_run_id=run_id,
        tags=entry["tags"],
        params=dict(run.data.params),  # as MLflow's log_model does: the run's params describe the model
        model_type=MODEL_TYPE,
    )
    try:
        described = Model.load(folder)  # the MLmodel file names the logged model it is, as log_model writes it
        described.model_id, described.run_id, described.artifact_path = model.model_id, run_id, model.artifact_location
        described.save(folder / MLMODEL_FILE_NAME)
        client.log_model_artifacts(model.model_id, str(folder))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, entry["step"])])
        client.log_batch(run_id, metrics=linked_metrics(record, model.model_id, run_id))
    except BaseException:
        # The server that failed the upload may refuse this too: the record keeps the model either way.
        with suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id

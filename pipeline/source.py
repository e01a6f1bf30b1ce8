"""A trained model to evaluate, predict with or register: the one place that reads `source=`.

  <run id> | runs:/<run id>[/<artifact path>]
        a training run in logger.tracking_uri: the network weights of the MLflow model it logged (runs from before
        models were logged: the checkpoint they uploaded under `checkpoints/`; with <artifact path>, the checkpoint
        there), its `config.yaml` and its classes (`data/class_counts.json`)
  models:/<name>/<version> | models:/<name>/latest | models:/<name>@<alias>
        a version registered with `python -m pipeline.register`: the weights of the MLflow model it is (or the
        checkpoint it points at, for versions registered before), with the config and classes of the run that
        logged it
  models:/<model id>
        a logged MLflow model (`m-…`, printed by training as 'MLflow model: …'), with its run's config and classes
  <file>.ckpt
        a checkpoint on disk. Its config and classes come from the run folder it lies in: the record every run
        writes (`<output>/mlflow/<run id>/files/`, which also names the run), else Hydra's
        `<output>/.hydra/config.yaml` (no class names: they are numbered); failing both, from the model=<option>
        (and data=<option>) given on the command line.

The network is rebuilt with the class count and input channels of the checkpoint and its weights are loaded as
tensors only (torch.load(weights_only=True)); the input size and normalization are the run's own.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.errors import UserInputError
from pipeline.tracking import checkpoints
from pipeline.tracking.checkpoints import MODELS_PREFIX, RUNS_PREFIX
from pipeline.tracking.store import existing_store_client

LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


class SourceError(UserInputError):
    """`source=` names nothing that can be loaded: the message says what was looked for, and the fix."""


@dataclass(frozen=True)
class Source:
    """A trained network and what it was trained with."""

    text: str  # as the user gave it
    config: DictConfig  # the training's resolved config (at least `model`; `data` when known)
    state: dict[str, torch.Tensor]  # the network's weights
    classes: list[str]  # class names in the order of the network's outputs
    channels: int  # input channels the network was trained on
    checkpoint: str  # where the weights were read
    run_id: str | None = None  # the training run, when known
    experiment_id: str | None = None
    model_version: str | None = None  # <name>/<version> when it came from the model registry


def client_for(uri: str, what: str = "logger.tracking_uri") -> Any:
    """An MlflowClient on a store that exists (MLflow would create an empty one and find nothing in it)."""
    return existing_store_client(uri, what, SourceError)


def load_source(text: str, tracking_uri: str, fallback: DictConfig | None = None) -> Source:
    """Read `source=<text>` (see the module's docstring). `fallback` holds the user's `model`/`data` groups, used for
    a checkpoint file without a config beside it."""
    text = str(text).strip()
    if not text or text == "None":
        raise SourceError(
            "source= is required: a training run's id (printed as 'MLflow run: …'), runs:/<run id>, "
            "models:/<name>/<version>, or a checkpoint file (.ckpt)."
        )
    if text.startswith(MODELS_PREFIX):
        return _from_registry(text, tracking_uri)
    if checkpoints.is_run_uri(text):
        run_id, artifact = checkpoints.parse_run_uri(text)
        return _from_run(text, tracking_uri, run_id, artifact)
    path = Path(text).expanduser()
    if path.is_file():
        return _from_file(text, path, fallback)
    if path.is_dir():
        inside = sorted(path.rglob("*.ckpt"))
        example = f" (e.g. source={inside[0]})" if inside else ""
        raise SourceError(f"source={text} is a folder: give the checkpoint file in it{example}, or a run id.")
    if checkpoints.RUN_ID.fullmatch(text):
        return _from_run(text, tracking_uri, text, None)
    raise SourceError(
        f"source={text}: no such file, and not a run id (32 hexadecimal characters). Give a checkpoint file (.ckpt), "
        "a training run's id, runs:/<run id> or models:/<name>/<version>."
    )


def _from_run(
    text: str, uri: str, run_id: str, artifact: str | None, version: str | None = None, model_id: str | None = None
) -> Source:
    """The run's weights (those of logged model `model_id` when given), config and classes."""
    what = f"source={text}"
    client = client_for(uri, what)
    run = checkpoints.get_run(client, run_id, what, SourceError)
    with tempfile.TemporaryDirectory(prefix="source-") as folder:
        if model_id is not None:
            local = checkpoints.download_model_weights(client, model_id, Path(folder))
            where = f"{MODELS_PREFIX}{model_id}"
        else:
            local, where = checkpoints.download_weights(client, run, artifact, Path(folder), what, SourceError)
        state = _read_weights(local, text)
        config, classes = checkpoints.download_run_config(client, run, Path(folder), what, SourceError)
    return _source(text, config, state, classes, where, run_id, run.info.experiment_id, version)


def _from_logged_model(text: str, uri: str, model_id: str) -> Source:
    from mlflow.exceptions import MlflowException

    client = client_for(uri, f"source={text}")
    try:
        model = client.get_logged_model(model_id)
    except MlflowException as error:
        raise SourceError(
            f"source={text}: no logged model {model_id} in {uri} ({str(error).splitlines()[0]}). Copy its id from the "
            "training's output ('MLflow model: …') or the run's page in the MLflow UI."
        ) from error
    if not model.source_run_id:
        raise SourceError(f"source={text}: the model names no run, so its config is unknown.")
    return _from_run(text, uri, model.source_run_id, None, model_id=model_id)


def _from_registry(text: str, uri: str) -> Source:
    from mlflow.exceptions import MlflowException

    client = client_for(uri, f"source={text}")
    reference = text[len(MODELS_PREFIX) :].strip("/")
    if LOGGED_MODEL_ID.fullmatch(reference):
        return _from_logged_model(text, uri, reference)
    fix = (
        "See the registered models and their versions in the MLflow UI (Models), or register a training run with "
        "python -m pipeline.register source=<run id> name=<name>."
    )
    try:
        if "@" in reference:
            name, _, alias = reference.partition("@")
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = reference.rpartition("/")
            if not name or not number:
                raise SourceError(f"source={text}: write models:/<name>/<version> (e.g. models:/digits-lenet/1).")
            if number == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise SourceError(f"source={text}: model {name!r} has no versions. {fix}")
                number = str(max(int(v.version) for v in versions))
            version = client.get_model_version(name, number)
    except MlflowException as error:
        raise SourceError(f"source={text}: {str(error).splitlines()[0]} in {uri}. {fix}") from error
    model_id = getattr(version, "model_id", None)
    if model_id:  # a version of a logged MLflow model
        run_id = version.run_id or client.get_logged_model(model_id).source_run_id
        return _from_run(text, uri, run_id, None, f"{version.name}/{version.version}", model_id)
    if not version.run_id:
        raise SourceError(f"source={text}: version {version.version} names no run, so its config is unknown. {fix}")
    artifact = _artifact_path(version.source, version.run_id)  # a version of a checkpoint, registered before models
    return _from_run(text, uri, version.run_id, artifact, f"{version.name}/{version.version}")


def _artifact_path(source: str, run_id: str) -> str | None:
    """The path inside the run's artifacts that a model version's source points at (runs:/<id>/<path>)."""
    prefix = f"{RUNS_PREFIX}{run_id}/"
    if source.startswith(prefix):
        return source[len(prefix) :].strip("/") or None
    marker = f"/{run_id}/artifacts/"
    return source.split(marker, 1)[1].strip("/") or None if marker in source else None


def _from_file(text: str, path: Path, fallback: DictConfig | None) -> Source:
    state = _read_weights(path, text)
    run_id, config, classes = _beside(path)
    if config is None:
        if fallback is None or fallback.get("model") is None:
            raise SourceError(
                f"source={text}: found no config beside the checkpoint (looked for <output>/mlflow/<run id>/files/"
                "config.yaml and <output>/.hydra/config.yaml in its run folder), so the model it holds is unknown. "
                "Name it: add model=<option> as it was trained (e.g. model=lenet5), and data=<option> for its input "
                "size and normalization."
            )
        config = OmegaConf.create(_resolved(fallback, [k for k in ("model", "data") if fallback.get(k) is not None]))
    return _source(text, config, state, classes, str(path.resolve()), run_id, None, None)


def _resolved(cfg: DictConfig, keys: Any) -> dict[str, Any]:
    return {key: OmegaConf.to_container(cfg[key], resolve=True) for key in keys}


def _beside(path: Path) -> tuple[str | None, DictConfig | None, list[str] | None]:
    """The run folder a checkpoint lies in (`<output>/checkpoints/x.ckpt`): its run id, config and classes."""
    for folder in (path.resolve().parent.parent, path.resolve().parent):
        records = sorted(folder.glob("mlflow/*/files/config.yaml"), key=lambda p: p.stat().st_mtime)
        if records:
            files = records[-1].parent
            return (
                files.parent.name,
                OmegaConf.load(records[-1]),
                checkpoints.class_names(files / "data" / "class_counts.json"),
            )
        hydra = folder / ".hydra" / "config.yaml"
        if hydra.is_file():
            loaded = OmegaConf.load(hydra)
            try:
                config = OmegaConf.create(_resolved(loaded, [k for k in ("model", "data") if k in loaded]))
            except Exception:  # an interpolation that cannot be resolved here: the model is what counts
                config = OmegaConf.create({"model": OmegaConf.to_container(loaded.model, resolve=False)})
            return None, config, None
    return None, None, None


def _read_weights(path: Path, text: str) -> dict[str, torch.Tensor]:
    from pipeline.models.weights import read_state_dict

    found = [path] if path.is_file() else sorted(path.rglob("*.ckpt"))
    if len(found) != 1:
        raise SourceError(f"source={text}: expected one checkpoint, found {len(found)} in {path}.")
    try:
        return read_state_dict(found[0], f"source={text}")
    except UserInputError as error:
        raise SourceError(str(error).replace("model.weights=", "", 1)) from error


def _source(
    text: str,
    config: DictConfig,
    state: dict[str, torch.Tensor],
    classes: list[str] | None,
    checkpoint: str,
    run_id: str | None,
    experiment_id: str | None,
    version: str | None,
) -> Source:
    if config.get("model") is None or not config.model.get("name"):
        raise SourceError(f"source={text}: its config names no model (model.name).")
    name = str(config.model.name)
    import pipeline.models  # noqa: F401  (registers ours into timm)

    if not timm.is_model(name):
        raise SourceError(f"source={text}: model.name={name} is not a known model in this version of the pipeline.")
    outputs = _weight_dim(state, timm.models.get_pretrained_cfg_value(name, "classifier"), 0)
    if classes is None:
        if outputs is None:
            raise SourceError(f"source={text}: cannot tell the class count of {name} from its weights.")
        classes = [str(index) for index in range(outputs)]
    elif outputs is not None and outputs != len(classes):
        raise SourceError(
            f"source={text}: the checkpoint's classifier has {outputs} outputs but its run lists {len(classes)} "
            "classes: the checkpoint belongs to another run. Give the run's own checkpoint."
        )
    channels = _weight_dim(state, timm.models.get_pretrained_cfg_value(name, "first_conv"), 1)
    if channels is None:
        data = config.get("data") or {}
        channels = int(data.get("channels") or (data.get("source") or {}).get("channels") or 3)
    return Source(text, config, state, classes, channels, checkpoint, run_id, experiment_id, version)


def _weight_dim(state: Mapping[str, torch.Tensor], modules: str | tuple[str, ...] | None, dim: int) -> int | None:
    """A dimension of the weight of the last of `modules` that the state holds (the classifier, the first conv)."""
    names = [modules] if isinstance(modules, str) else list(modules or ())
    for name in reversed(names) if dim == 0 else names:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 2:
            return int(weight.shape[dim])
    return None


def build_model(source: Source) -> nn.Module:
    """The network of `source`, with its weights, in eval mode."""
    from pipeline.models.factory import create_model
    from pipeline.models.weights import fit_state_dict

    model_cfg = source.config.model
    model = create_model(
        str(model_cfg.name),
        num_classes=len(source.classes),
        in_chans=source.channels,
        pretrained=False,
        kwargs=model_cfg.get("kwargs"),
    )
    fitted = fit_state_dict(model, source.state, f"source={source.text}")
    changed = fitted.reset_classifier + fitted.adapted_inputs
    if changed:
        raise SourceError(
            f"source={source.text}: the checkpoint does not fit {model_cfg.name} with {len(source.classes)} classes "
            f"and {source.channels} input channels (changed: {', '.join(changed)})."
        )
    return model.eval()


def input_spec(source: Source, model: nn.Module) -> Any:
    """How the run prepared its images for the network: the model's data config, overridden by the run's data."""
    from pipeline.data.transforms import InputSpec

    data = source.config.get("data") or {}
    return InputSpec.resolve(
        timm.data.resolve_model_data_config(model),
        data.get("image_size"),
        data.get("mean"),
        data.get("std"),
        source.channels,
    )


def describe(source: Source) -> str:
    where = f"registered model {source.model_version}, " if source.model_version else ""
    run = f"run {source.run_id}, " if source.run_id else ""
    return f"{source.config.model.name} with {len(source.classes)} classes ({where}{run}{source.checkpoint})"

"""python -m pipeline.register source=<run id> name=<model name> [alias=champion]: a run's MLflow model as a registered
model version.

The version is the MLflow model the training logged (source `models:/<model id>`; nothing is copied), carries the run
id and is tagged with the run's test metrics (and its model, dataset and augmentation), so
`source=models:/<name>/<version>` (or `@<alias>`) gives evaluate and predict the network with the run's config and
classes, and `mlflow models serve -m models:/<name>@<alias>` serves it. `alias=` points the alias (e.g. champion) at
the new version, moving it from the version it named before. Exit status: 0 registered; 2 an error the message
explains.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.cli import hydra_command, user_errors
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError

TAGGED = ("model", "dataset", "aug")  # the run's tags a version repeats


def register(
    source: str, name: str, tracking_uri: str, description: str | None = None, alias: str | None = None
) -> Any:
    """Create the registered model if new, and a version of it that is the run's logged MLflow model; point `alias`
    at it when given. Returns MLflow's ModelVersion."""
    from mlflow.exceptions import MlflowException

    from pipeline.internals import process_tracking_uri
    from pipeline.source import LOGGED_MODEL_ID, SourceError, client_for
    from pipeline.tracking.checkpoints import MODELS_PREFIX, RUN_ID, RUNS_PREFIX, get_run, run_model_id

    if not name or name == "None" or "/" in name or "@" in name:
        raise UserInputError(f"name={name}: give the model a name without '/' or '@' (e.g. name=digits-lenet).")
    if alias is not None and (not str(alias).strip() or any(c in str(alias) for c in "/@:")):
        raise UserInputError(f"alias={alias}: give a name without '/', '@' or ':' (e.g. alias=champion).")
    what = f"source={source}"
    client = client_for(tracking_uri, what)
    text = str(source).strip()
    model_id = text.removeprefix(MODELS_PREFIX).strip("/") if text.startswith(MODELS_PREFIX) else None
    if model_id is not None and LOGGED_MODEL_ID.fullmatch(model_id):
        try:
            run_id = client.get_logged_model(model_id).source_run_id
        except MlflowException as error:
            raise SourceError(f"{what}: no logged model {model_id} in {tracking_uri}.") from error
        run = get_run(client, run_id, what, SourceError)
    else:
        run_id = text.removeprefix(RUNS_PREFIX).strip("/").partition("/")[0]
        if not RUN_ID.fullmatch(run_id):
            raise UserInputError(
                f"{what}: register takes a training run (its 32-character id, or runs:/<id>) or its logged model "
                "(models:/m-…), whose MLflow model becomes the version."
            )
        run = get_run(client, run_id, what, SourceError)
        model_id = run_model_id(client, run)
    if model_id is None:
        raise SourceError(
            f"{what}: run {run_id} logged no MLflow model: it is not a training run, or it was trained before runs "
            "logged their models. Give a training run's id, or train it again."
        )
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise UserInputError(f"name={name}: {str(error).splitlines()[0]}") from error
    tags = {key: run.data.tags[key] for key in TAGGED if key in run.data.tags}
    tags.update({key: str(value) for key, value in run.data.metrics.items() if key.startswith("test/")})
    with process_tracking_uri(tracking_uri):  # a local registry finds the logged model through it
        version = client.create_model_version(
            name,
            source=f"{MODELS_PREFIX}{model_id}",
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=model_id,
        )
    if alias is not None:
        try:
            client.set_registered_model_alias(name, str(alias), version.version)
        except MlflowException as error:  # MLflow refuses some names, e.g. latest or v1
            raise UserInputError(
                f"alias={alias}: {str(error).splitlines()[0]} (version {version.version} is registered, without it)"
            ) from error
    return version


@hydra.main(config_path=str(CONF_DIR), config_name="register", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.tracking.store import prepare

    alias = None if cfg.alias is None else str(cfg.alias)
    with user_errors():
        prepare(str(cfg.logger.tracking_uri), cfg.logger.http)
        version = register(str(cfg.source), str(cfg.name), str(cfg.logger.tracking_uri), cfg.description, alias)
    print(f"Registered models:/{version.name}/{version.version} ({version.source})")
    reference = f"models:/{version.name}@{alias}" if alias else f"models:/{version.name}/{version.version}"
    if alias:
        print(f"Alias {alias} → version {version.version}")
    print(f"Evaluate it: python -m pipeline.evaluate source={reference}")
    # As a shell runs it: the store it is registered in, and the environment's bin on PATH (MLflow starts uvicorn by
    # name) whether or not the environment is activated.
    bin_dir = Path(sys.executable).parent
    print(
        f"Serve it:    PATH={shlex.quote(str(bin_dir))}:$PATH "
        f"MLFLOW_TRACKING_URI={shlex.quote(str(cfg.logger.tracking_uri))} {shlex.quote(str(bin_dir / 'mlflow'))} "
        f"models serve -m {reference} --env-manager local --host 127.0.0.1 --port 5001"
    )


if __name__ == "__main__":
    hydra_command(main)

"""python -m pipeline.register source=<run id> name=<model name>: a run's checkpoint as a registered model version.

The version points at the checkpoint artifact the run logged (source `runs:/<run id>/checkpoints/<file>.ckpt`) and
carries the run id, so `source=models:/<name>/<version>` gives evaluate and predict the weights and the run's config
and classes. Nothing is copied. Exit status: 0 registered; 2 an error the message explains.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.cli import user_errors
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError


def register(source: str, name: str, tracking_uri: str, description: str | None = None) -> Any:
    """Create the registered model if new, and a version of it pointing at the run's checkpoint."""
    from mlflow.exceptions import MlflowException

    from pipeline.source import SourceError, client_for
    from pipeline.tracking.checkpoints import RUN_ID, RUNS_PREFIX, checkpoint_artifact, get_run

    if not name or name == "None" or "/" in name or "@" in name:
        raise UserInputError(f"name={name}: give the model a name without '/' or '@' (e.g. name=digits-lenet).")
    run_id, _, artifact = str(source).removeprefix(RUNS_PREFIX).strip("/").partition("/")
    if not RUN_ID.fullmatch(run_id):
        raise UserInputError(
            f"source={source}: register takes a training run (its 32-character id, or runs:/<id>), whose logged "
            "checkpoint becomes the version."
        )
    what = f"source={source}"
    client = client_for(tracking_uri, what)
    run = get_run(client, run_id, what, SourceError)
    path = checkpoint_artifact(client, run, what, artifact or None, SourceError)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise UserInputError(f"name={name}: {str(error).splitlines()[0]}") from error
    tags = {key: run.data.tags[key] for key in ("model", "dataset", "aug") if key in run.data.tags}
    tags.update({key: str(value) for key, value in run.data.metrics.items() if key.startswith("test/")})
    return client.create_model_version(
        name, source=f"{RUNS_PREFIX}{run_id}/{path}", run_id=run_id, tags=tags, description=description
    )


@hydra.main(config_path=str(CONF_DIR), config_name="register", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.tracking.store import prepare

    with user_errors():
        prepare(str(cfg.logger.tracking_uri), cfg.logger.http)
        version = register(str(cfg.source), str(cfg.name), str(cfg.logger.tracking_uri), cfg.description)
    print(f"Registered models:/{version.name}/{version.version} ({version.source})")
    print(f"Evaluate it: python -m pipeline.evaluate source=models:/{version.name}/{version.version}")


if __name__ == "__main__":
    main()

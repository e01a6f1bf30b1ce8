"""A run opened before any work, its inputs and files logged, and its end recorded with an honest status."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.tracking.logger import SENT_ERRORS, RecordedMLFlowLogger, flatten
from pipeline.tracking.provenance import run_tags
from pipeline.tracking.store import TrackingError, artifact_location, ensure_experiment, make_store_folder


def open_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    output_dir: str | Path,
    tags: Mapping[str, str],
    artifact_root: str | Path,
    run_id: str | None = None,
    system_metrics: Mapping[str, Any] | None = None,
) -> RecordedMLFlowLogger:
    """Create the experiment (if new) and the run now, so a tracking problem shows before the work; with `run_id`,
    that existing run is continued (marked RUNNING again) instead. `artifact_root`: where a new experiment on a
    local store keeps its artifacts. `system_metrics` (logger.system_metrics): whether and how often MLflow samples
    the machine's CPU, memory, disk, network and GPU into the run."""
    artifacts = artifact_location(tracking_uri, artifact_root)
    make_store_folder(tracking_uri)
    try:
        if not run_id:
            ensure_experiment(MlflowClient(tracking_uri), experiment_name, artifacts)
        logger = RecordedMLFlowLogger(
            Path(output_dir),
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            run_name=run_name,
            tags=dict(tags),
            artifact_location=artifacts,
            run_id=run_id,
            system_metrics=system_metrics,
        )
        logger.open(continued=bool(run_id))
    except SENT_ERRORS as error:
        raise TrackingError(
            f"MLflow at {tracking_uri}: cannot create the run in experiment {experiment_name!r}: {error}"
        ) from error
    return logger


def open_training_run(cfg: DictConfig) -> RecordedMLFlowLogger:
    """The run of a training, as its config says (logger.*); logger.run_id continues an existing run."""
    what = {"model": cfg.model.name, "dataset": cfg.data.name, "aug": cfg.aug.name}
    tags = run_tags(cfg.paths.output_dir, what, cfg.logger.parent_run_id, cfg.logger.tags)
    return open_run(
        str(cfg.logger.tracking_uri),
        str(cfg.logger.experiment_name),
        str(cfg.logger.run_name),
        cfg.paths.output_dir,
        tags,
        cfg.logger.artifact_root,
        cfg.logger.run_id,
        cfg.logger.get("system_metrics"),
    )


def log_inputs(
    logger: RecordedMLFlowLogger,
    cfg: DictConfig,
    model_cost: Mapping[str, float],
    class_counts: Mapping[str, Any],
    skipped_files: Sequence[tuple[str, str]] = (),
) -> None:
    """The run's config (params and YAML), what it costs, what it trains on, and which files it left out."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = flatten(resolved)
    if cfg.logger.run_id:  # continuing a run: MLflow params are write-once, and step 0 is already logged
        logger.log_hyperparams({key: value for key, value in params.items() if key not in logger.record.params})
        logger.set_tag("resumed_from", str(cfg.resume))
        return
    logger.log_hyperparams(params)
    logger.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
    logger.log_text(json.dumps(dict(class_counts), indent=2), "data/class_counts.json")
    logger.log_metrics({**model_cost, "data/skipped_files": len(skipped_files)}, step=0)
    if skipped_files:
        lines = "".join(f"{path}\t{reason}\n" for path, reason in skipped_files)
        logger.log_text("path\treason\n" + lines, "data/skipped_files.tsv")


def log_files(logger: RecordedMLFlowLogger, files: Mapping[str, Path]) -> None:
    """Upload each file into the run's artifact folder named by its key."""
    for folder, path in files.items():
        logger.log_artifact(Path(path), folder)


@contextmanager
def recorded_status(end: Callable[[str], None]) -> Iterator[None]:
    """End the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any error): never left RUNNING."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        end("KILLED")
        raise
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")

"""A run opened before any work, and its inputs and files logged (its end: pipeline.tracking.status)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.tracking import naming
from pipeline.tracking.logger import SENT_ERRORS, RecordedMLFlowLogger
from pipeline.tracking.naming import flatten
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
    """The run of a training, as its config says (logger.*); logger.run_id continues an existing run. Unnamed
    (logger.run_name=null), it is named by what it trains and what differs from the defaults (tracking.naming); its
    `command` tag trains the same config again (logger.tags.command, when given, wins: a sweep trial's)."""
    name, command = cfg.logger.run_name, None
    if not name or "command" not in (cfg.logger.tags or {}):
        name, command = _name_and_command(cfg)
    what = {"model": cfg.model.name, "dataset": cfg.data.name, "aug": cfg.aug.name}
    tags = run_tags(cfg.paths.output_dir, what, cfg.logger.parent_run_id, cfg.logger.tags, command)
    return open_run(
        str(cfg.logger.tracking_uri),
        str(cfg.logger.experiment_name),
        str(name),
        cfg.paths.output_dir,
        tags,
        cfg.logger.artifact_root,
        cfg.logger.run_id,
        cfg.logger.get("system_metrics"),
    )


def _name_and_command(cfg: DictConfig) -> tuple[str, str]:
    """logger.run_name, or one made from the overrides that differ from the defaults; the command that reproduces
    the run: the overrides typed on `python -m pipeline.train`, or (a run started from Python) those that turn the
    defaults into its config, with where it tracks."""
    from pipeline.config import compose

    defaults = compose([])
    typed = naming.hydra_overrides()
    if typed is not None:
        differing = naming.differing_overrides(typed, cfg, defaults)
        command = naming.train_command(typed)
    else:
        differing = naming.config_overrides(cfg, defaults)
        where = [f"{key}={OmegaConf.select(cfg, key)}" for key in WHERE_IT_TRACKS]
        command = naming.train_command([*differing, *where])
    return str(cfg.logger.run_name or naming.run_name(cfg, differing)), command


# A run started from Python: what its command needs besides the config to land beside it.
WHERE_IT_TRACKS = ("paths.root", "logger.tracking_uri", "logger.experiment_name")
# Keys that differ between any two runs (where they write, what they are called): tags, so that MLflow's "Show diff
# only" and parallel coordinates show what was trained differently. The resolved config is also the run's
# config.yaml.
TAG_KEYS = ("paths.", "logger.", "resume")


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A flattened config → (params, tags): the keys of TAG_KEYS become tags (logger.tags.* are the run's tags
    already, logger.run_name its name)."""
    kept, tags = {}, {}
    for key, value in params.items():
        if not key.startswith(TAG_KEYS):
            kept[key] = value
        elif not key.startswith("logger.tags.") and key != "logger.run_name" and value not in (None, "", {}):
            tags[key] = str(value)
    return kept, tags


def log_inputs(
    logger: RecordedMLFlowLogger,
    cfg: DictConfig,
    model_cost: Mapping[str, float],
    class_counts: Mapping[str, Any],
    skipped_files: Sequence[tuple[str, str]] = (),
) -> None:
    """The run's config (params and YAML), what it costs, what it trains on, and which files it left out."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params, tags = split_params(flatten(resolved))
    if cfg.logger.run_id:  # continuing a run: MLflow params are write-once, and step 0 is already logged
        logger.log_hyperparams({key: value for key, value in params.items() if key not in logger.record.params})
        logger.set_tag("resumed_from", str(cfg.resume))
        return
    logger.log_hyperparams(params)
    logger.set_tags(tags)
    logger.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
    logger.log_text(json.dumps(dict(class_counts), indent=2), "data/class_counts.json")
    # Single values at step 0: MLflow's chart view draws them as one bar per run. The count of skipped files is a
    # tag, and a metric (a chart) only when there are some: an always-empty axis above the learning curves says
    # nothing.
    logger.log_metrics({**model_cost, **({"data/skipped_files": len(skipped_files)} if skipped_files else {})}, step=0)
    logger.set_tag("data.skipped_files", str(len(skipped_files)))
    if skipped_files:
        lines = "".join(f"{path}\t{reason}\n" for path, reason in skipped_files)
        logger.log_text("path\treason\n" + lines, "data/skipped_files.tsv")


def log_files(logger: RecordedMLFlowLogger, files: Mapping[str, Path]) -> None:
    """Upload each file into the run's artifact folder named by its key."""
    for folder, path in files.items():
        logger.log_artifact(Path(path), folder)

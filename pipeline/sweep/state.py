"""A sweep's state on disk (`<storage>/<name>/sweep.json`): everything a trial, or a resumed sweep, needs to rebuild
the exact same runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import relative_data_root
from pipeline.errors import UserInputError

STATE_FILE = "sweep.json"
SWEEP_ONLY = ("sweep", "ray", "resume", "progress", "hydra")  # override keys that configure the sweep itself
TRIAL_CHECKPOINT = "checkpoint.ckpt"


def tune_name(metric: str) -> str:
    """Tune flattens nested results on "/", so metrics travel as val_acc rather than val/acc."""
    return metric.replace("/", "_")


@dataclass
class SweepState:
    """Everything a trial, or a resumed sweep, needs to rebuild the exact same runs."""

    name: str
    folder: str
    base_overrides: list[str]  # the train config every trial starts from
    params: dict[str, str]  # key → Hydra sweeper expression
    settings: dict[str, Any]  # the resolved `sweep` config node
    tracking_uri: str
    experiment_name: str
    artifact_root: str  # where a new experiment on a local store keeps artifacts
    parent_run_id: str = ""
    # Tune's CSV and JSON result loggers are the sweep's own callbacks, and Tune adds no TensorBoard logger. False for
    # a sweep saved before: resumed, it keeps Tune's default loggers (its saved callbacks have none of their own).
    own_result_loggers: bool = False

    def save(self) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> SweepState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def new_state(cfg: DictConfig, cli_overrides: list[str]) -> SweepState:
    settings = OmegaConf.to_container(cfg.sweep, resolve=True)
    params = dict(settings.pop("params") or settings.pop("space", None) or {})
    settings.pop("space", None)
    pinned = {  # resolved here: trials run in other folders, processes and machines
        "paths.root": cfg.paths.root,
        "logger.tracking_uri": cfg.logger.tracking_uri,
        "logger.experiment_name": cfg.logger.experiment_name,
    }
    # A relative data.root, from the folder the driver runs in (a local sweep: a cluster refuses it, sweep.cluster)
    if (data_root := relative_data_root(cfg)) is not None:
        pinned["data.root"] = str(data_root)
    base = [
        o
        for o in cli_overrides
        if not _key(o).startswith(SWEEP_ONLY) and _key(o) not in params and _key(o) not in pinned
    ]
    base += [f"{key}={value}" for key, value in pinned.items()]
    folder = Path(settings["storage_path"]).resolve() / settings["name"]
    if (folder / STATE_FILE).exists():
        raise UserInputError(f"a sweep named {settings['name']!r} exists in {folder}: continue it with resume=")
    return SweepState(
        name=settings["name"],
        folder=str(folder),
        base_overrides=base,
        params=params,
        settings=settings,
        tracking_uri=str(cfg.logger.tracking_uri),
        experiment_name=str(cfg.logger.experiment_name),
        artifact_root=str(cfg.logger.artifact_root),
        own_result_loggers=True,
    )


def locate(resume: str, storage_path: str) -> Path:
    for folder in (Path(resume), Path(storage_path) / resume):
        if (folder / STATE_FILE).exists():
            return folder.resolve()
    raise UserInputError(
        f"resume={resume!r}: no sweep there (looked for {STATE_FILE} in {resume} and in {storage_path}/{resume}). "
        "Give the sweep's name or its folder."
    )

"""Continuing an interrupted training: `resume=<MLflow run id | checkpoint>`.

A run id finds the run's output folder (its `output_dir` tag) and the newest checkpoint there; a checkpoint
finds its run through the run record beside it. Either way the training continues from that checkpoint
(weights, optimizer, schedule, epoch, random state) in the same output folder and into the same MLflow run.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import internals
from pipeline.errors import UserInputError
from pipeline.tracking.record import RECORD_FOLDER, RunRecord

CHECKPOINTS = ("last.ckpt", "interrupted.ckpt")  # written every epoch; written when a run is stopped
TRAINING_STATE = ("state_dict", "optimizer_states", "epoch", "global_step")  # what Trainer.fit resumes from


class ResumeError(UserInputError):
    """`resume=` names nothing that can be continued."""


class RandomStateCheckpoint(Callback):
    """Keep the random generators (torch, CUDA, NumPy, Python) in every checkpoint and restore them on resume, so
    a resumed run draws the same dropout masks, shuffles and augmentations as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        # Plain lists and tensors only: checkpoints are loaded with torch.load(weights_only=True).
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
                "python": random.getstate(),
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = state_dict["rng"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, after Lightning's own set-up has drawn its random numbers.
        saved = getattr(self, "saved", None)
        if saved is None:
            return
        torch.set_rng_state(saved["torch"])
        if saved["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda"])
        name, keys, position, has_gauss, cached_gaussian = saved["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
        random.setstate(saved["python"])
        self.saved = None
        # Lightning made the first epoch's loader iterator while setting up, before this restore, and reuses it
        # when resuming; an uninterrupted run makes each epoch's iterator at the epoch's start, drawing its
        # shuffle and worker seeds from the generator restored above. Make it again, so the draws are the same.
        internals.remake_train_iterator(trainer)


def newest_checkpoint(output_dir: Path) -> Path | None:
    found = [output_dir / "checkpoints" / name for name in CHECKPOINTS if (output_dir / "checkpoints" / name).exists()]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def check_checkpoint(checkpoint: Path, given: str) -> None:
    """Raise ResumeError unless `checkpoint` is a training checkpoint Trainer.fit can resume from, read as it will
    read it (tensors only): a wrong file then fails here, in seconds, before a run is created or the data loaded."""
    fix = "Give a checkpoint a training wrote (<output folder>/checkpoints/last.ckpt) or an MLflow run id"
    # torch.save writes a zip archive; anything else (another file, a copy cut short) would fail deep inside torch.
    if not zipfile.is_zipfile(checkpoint):
        raise ResumeError(
            f"resume={given}: {checkpoint} is not a checkpoint: not the zip archive torch.save writes (another kind "
            f"of file, or one cut short). {fix}."
        )
    try:  # mmap: the tensors are not read, only the structure
        content = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, KeyError… for what it cannot read
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ResumeError(f"resume={given}: {checkpoint} cannot be read as a checkpoint ({reason}). {fix}.") from None
    missing = [key for key in TRAINING_STATE if not isinstance(content, dict) or key not in content]
    if missing:
        raise ResumeError(
            f"resume={given}: {checkpoint} holds no training state to continue (no {', '.join(missing)}): weights "
            f"only? To start a new training from its weights: model.pretrained=true model.weights={checkpoint}. "
            f"To continue a training: {fix[0].lower()}{fix[1:]}."
        )


def _run_of_checkpoint(checkpoint: Path) -> str | None:
    """The MLflow run whose record lies in the checkpoint's output folder (<output>/checkpoints/x.ckpt)."""
    records = sorted((checkpoint.parent.parent / RECORD_FOLDER).glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    return RunRecord.load(records[-1].parent).run_id if records else None


def _from_run(cfg: DictConfig, run_id: str) -> tuple[Path, Path]:
    uri = str(cfg.logger.tracking_uri)
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise ResumeError(
            f"resume={run_id}: no such checkpoint file, and no such run in MLflow at {uri}. Give a checkpoint "
            "(<output folder>/checkpoints/last.ckpt) or the id of a run in this store (logger.tracking_uri)."
        ) from None
    output_dir = run.data.tags.get("output_dir")
    if output_dir is None or not Path(output_dir).is_dir():
        raise ResumeError(
            f"resume={run_id}: the run's output folder ({output_dir or 'not recorded'}) is not on this machine. "
            "Give its checkpoint instead: resume=<path>/checkpoints/last.ckpt."
        )
    checkpoint = newest_checkpoint(Path(output_dir))
    if checkpoint is None:
        raise ResumeError(
            f"resume={run_id}: {output_dir}/checkpoints holds neither {' nor '.join(CHECKPOINTS)}; the run stopped "
            "before its first epoch ended. Start it again instead."
        )
    return Path(output_dir), checkpoint


def resolve(cfg: DictConfig) -> DictConfig:
    """The config with `resume` turned into a checkpoint path and the run (logger.run_id) and output folder it
    continues; unchanged when there is nothing to resume."""
    if cfg.resume is None:
        return cfg
    given = str(cfg.resume)
    path = Path(given).expanduser()
    if path.suffix == ".ckpt" or path.exists():
        if not path.is_file():
            raise ResumeError(f"resume={given}: no such checkpoint file. Give an existing .ckpt or an MLflow run id.")
        checkpoint, run_id = path.resolve(), _run_of_checkpoint(path)
        # A checkpoint of one of our runs continues in its folder; any other continues in this run's new one.
        output_dir = checkpoint.parent.parent if run_id is not None else Path(cfg.paths.output_dir)
    else:
        output_dir, checkpoint = _from_run(cfg, given)
        run_id = given
    check_checkpoint(checkpoint, given)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg))  # the caller's config stays as it was
    with open_dict(resolved):
        resolved.resume = str(checkpoint)
        resolved.paths.output_dir = str(output_dir)
        if run_id is not None and not cfg.logger.run_id:
            resolved.logger.run_id = run_id
    return resolved

"""Continuing an interrupted training: `resume=<MLflow run id | checkpoint>`.

A run id finds the run's output folder (its `output_dir` tag) and the most recent checkpoint there that can be
resumed (whole, finite weights: damaged ones are skipped and named); a checkpoint finds its run through the run
record beside it. Either way the training continues from that checkpoint
(weights, optimizer, schedule, epoch, random state) in the same output folder and into the same MLflow run.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import checkpointing, internals
from pipeline.errors import RESUME_HINT, UserInputError
from pipeline.tracking import processes
from pipeline.tracking.record import RECORD_FOLDER, RunRecord

TRAINING_STATE = ("state_dict", "optimizer_states", "epoch", "global_step")  # what Trainer.fit resumes from
if TYPE_CHECKING:
    from pipeline.tracking.logger import RecordedMLFlowLogger

CONFIG_KEY = "config"  # a checkpoint's copy of its run's resolved config (ConfigCheckpoint)
# What makes a checkpoint's weights and what they mean: resuming with other values would load the weights into
# another network (a traceback) or go on training them on other data.
NETWORK_KEYS = ("model.name", "model.kwargs", "data.name", "data.channels", "data.classes", "data.image_size")


class ResumeError(UserInputError):
    """`resume=` names nothing that can be continued."""


class DiskFull(UserInputError):
    """The disk a run writes its output folder to is full."""


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


class ConfigCheckpoint(Callback):
    """Keep the run's resolved config in every checkpoint (key `config`), so resuming can check that it continues
    the same network on the same data."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config


def candidates(output_dir: Path) -> list[Path]:
    """The checkpoints of an output folder, the most recently written first."""
    found = [path for path in (output_dir / "checkpoints").glob("*.ckpt") if path.is_file()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def newest_sound(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The most recently written checkpoint a run can be resumed from, and those skipped on the way (why)."""
    skipped = []
    for path in candidates(output_dir):
        reason = checkpointing.problem(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


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


def _check_not_running(client: MlflowClient, run: Any, given: str) -> None:
    """A run still RUNNING is continued only when its process is certainly gone (then it is ended KILLED first):
    two processes training into one folder would mix their checkpoints."""
    if run.info.status != "RUNNING":
        return
    recorded = processes.recorded_process(run)
    if recorded is None:
        return  # recorded before runs named their process: nothing to go by
    judged = processes.verdict(recorded)
    run_id = run.info.run_id
    if judged == "alive":
        raise ResumeError(
            f"resume={given}: run {run_id} is still training ({processes.describe(recorded)}). Stop it first "
            f"(kill -TERM {recorded.get('pid')}: it saves interrupted.ckpt and ends KILLED), then resume it."
        )
    if judged == "unknown":
        raise ResumeError(
            f"resume={given}: run {run_id} is RUNNING in {processes.describe(recorded)}, which cannot be checked from "
            f"here; two processes must not train into one folder. If that process is gone, end the run with "
            f"`python -m pipeline.sync --close-run {run_id}`, then resume it."
        )
    processes.close(client, run, f"{processes.describe(recorded)} is gone; resumed by process {os.getpid()}")


def _from_run(cfg: DictConfig, run_id: str, lead: bool) -> tuple[Path, Path]:
    uri = str(cfg.logger.tracking_uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
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
    if lead:  # the other ranks of a data-parallel run find it RUNNING: their first process has just continued it
        _check_not_running(client, run, run_id)
    checkpoint, skipped = newest_sound(Path(output_dir))
    for path, reason in skipped:
        print(f"note: resume={run_id}: skipped {path}: {reason}", file=sys.stderr, flush=True)
    if checkpoint is None:
        what = "no checkpoint" if not skipped else "no checkpoint it can be resumed from"
        raise ResumeError(
            f"resume={run_id}: {output_dir}/checkpoints holds {what}; the run stopped before its first epoch "
            "ended. Start it again instead (without resume=)."
        )
    return Path(output_dir), checkpoint


def _recorded_config(checkpoint: Path, run_id: str | None) -> DictConfig | None:
    """The config the checkpoint was trained with: kept in it, else in its run's record, else Hydra's copy."""
    saved = checkpointing.load(checkpoint).get(CONFIG_KEY)
    if isinstance(saved, dict):
        return OmegaConf.create(saved)
    output_dir = checkpoint.parent.parent
    files = [output_dir / RECORD_FOLDER / run_id / "files" / "config.yaml"] if run_id else []
    for path in [*files, output_dir / ".hydra" / "config.yaml"]:
        if path.is_file():
            return OmegaConf.load(path)
    return None


def _plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return plain if plain != {} else None


def _check_same_network(cfg: DictConfig, checkpoint: Path, run_id: str | None, given: str) -> None:
    """Refuse to continue a checkpoint with a config that builds another network or trains on other data."""
    recorded = _recorded_config(checkpoint, run_id)
    if recorded is None:
        return
    differing = {key: _plain(recorded, key) for key in NETWORK_KEYS if _plain(recorded, key) != _plain(cfg, key)}
    if not differing:
        return
    output_dir = checkpoint.parent.parent
    overrides_file = output_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    groups = {key.split(".")[0] for key in differing}
    # The run's own command-line choices for those groups, else overrides that set the recorded values.
    fix = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in {*groups, "experiment"}]
    fix = fix or _overrides_for(dict(differing))
    what = "; ".join(f"{key} is {value} there, {_plain(cfg, key)} here" for key, value in differing.items())
    raise ResumeError(
        f"resume={given}: the checkpoint was trained with another network or data ({what}). Resume it with the "
        f"settings it was trained with ({' '.join(fix)} resume={given}), or start a new run without resume=."
    )


def _overrides_for(recorded: dict[str, Any]) -> list[str]:
    """Overrides that give `recorded` values: a model by its option in conf/model (which brings its own kwargs),
    other values key by key."""
    from pipeline.config import CONF_DIR

    fix: list[str] = []
    name = recorded.pop("model.name", None)
    if name is not None:
        options = [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml")) if OmegaConf.load(p).get("name") == name]
        fix.append(f"model={options[0]}" if options else f"model=timm model.name={name}")
        recorded.pop("model.kwargs", None)
    for key, value in recorded.items():
        if isinstance(value, dict):
            fix += [f"{key}.{sub}={_override_value(v)}" for sub, v in value.items()]
        else:
            fix.append(f"{key}={_override_value(value)}")
    return fix


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def check_fits(module: L.LightningModule, checkpoint: str) -> None:
    """Refuse, before anything is written, a checkpoint whose weights do not fit the network built for the run."""
    saved = checkpointing.load(Path(checkpoint))["state_dict"]
    built = module.state_dict()
    wrong = [
        f"{name} {tuple(saved[name].shape) if name in saved else 'missing'} (here {tuple(tensor.shape)})"
        for name, tensor in built.items()
        if name not in saved or tuple(saved[name].shape) != tuple(tensor.shape)
    ] + [f"{name} (not in this network)" for name in saved if name not in built]
    if wrong:
        raise ResumeError(
            f"resume={checkpoint}: its weights do not fit the network this config builds: {', '.join(wrong[:5])}"
            f"{', …' if len(wrong) > 5 else ''}. Resume with the model and data settings the run was trained with, "
            "or start a new run without resume=."
        )


def _remove_leftovers(output_dir: Path) -> None:
    """Temporary files of checkpoint writes a killed process left (checkpointing.write_atomically)."""
    for leftover in (output_dir / "checkpoints").glob(f"*{checkpointing.TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def resolve(cfg: DictConfig, lead: bool = True) -> DictConfig:
    """The config with `resume` turned into a checkpoint path and the run (logger.run_id) and output folder it
    continues; unchanged when there is nothing to resume. Every check is made before anything is written:
    the checkpoint can be resumed (whole, finite), its run is not still training elsewhere, and it was trained with
    the network and data this config builds. `lead`: the first process of the run (the others only follow it)."""
    if cfg.resume is None:
        return cfg
    given = str(cfg.resume)
    path = Path(given).expanduser()
    if path.suffix == ".ckpt" or path.exists():
        if not path.is_file():
            raise ResumeError(f"resume={given}: no such checkpoint file. Give an existing .ckpt or an MLflow run id.")
        checkpoint, run_id = path.resolve(), _run_of_checkpoint(path)
        if run_id is None:  # not one of our runs' folders: a file that is no training checkpoint is named as such
            check_checkpoint(checkpoint, given)
        reason = checkpointing.problem(checkpoint)
        if reason is not None:
            sound, _ = newest_sound(checkpoint.parent.parent)
            instead = f"resume={sound}" if sound else "resume=<MLflow run id> (its newest sound checkpoint)"
            raise ResumeError(f"resume={given}: the training cannot continue from it: {reason}. Give {instead}.")
        if run_id is not None and lead and not cfg.logger.run_id:
            client = MlflowClient(str(cfg.logger.tracking_uri))
            try:
                run = client.get_run(run_id)
            except MlflowException:
                run = None  # not in this store: the run is continued (or refused) where the logger opens it
            if run is not None:
                _check_not_running(client, run, given)
        # A checkpoint of one of our runs continues in its folder; any other continues in this run's new one.
        output_dir = checkpoint.parent.parent if run_id is not None else Path(cfg.paths.output_dir)
    else:
        output_dir, checkpoint = _from_run(cfg, given, lead)
        run_id = given
    check_checkpoint(checkpoint, given)
    _check_same_network(cfg, checkpoint, run_id, given)
    if lead and run_id is not None and not cfg.logger.run_id:  # our run's folder, and no process of it is alive
        _remove_leftovers(output_dir)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg))  # the caller's config stays as it was
    with open_dict(resolved):
        resolved.resume = str(checkpoint)
        resolved.paths.output_dir = str(output_dir)
        if run_id is not None and not cfg.logger.run_id:
            resolved.logger.run_id = run_id
    return resolved


def note_how_to_resume(stop: BaseException, run_id: str, output_dir: Path) -> None:
    """Attach to `stop` (Ctrl-C, SIGTERM) the sentence a user needs once the run has ended KILLED: the command that
    continues it from its newest sound checkpoint, or that there is none. The command line prints it; a sweep trial
    does not (its sweep resumes it)."""
    sound, _ = newest_sound(output_dir)
    kept = how_to_continue(run_id, sound) if sound else "no checkpoint was written before it"
    setattr(stop, RESUME_HINT, f"interrupted: run {run_id} is marked KILLED; {kept}")


def how_to_continue(run_id: str, sound: Path) -> str:
    """The words and the command that continue run `run_id` from its checkpoint `sound`."""
    return f"continue it from {sound.name}: python -m pipeline.train resume={run_id}"


def what_is_kept(output_dir: Path) -> str:
    """A sentence on the newest checkpoint a run stopped by an error can be resumed from, if any."""
    sound, _ = newest_sound(output_dir)
    if sound is None:
        return "No checkpoint was written before it."
    return f"Kept from before it: {sound} (epoch {checkpointing.load(sound).get('epoch')})."


@contextmanager
def disk_full_explained(output_dir: Path, opened: Sequence[RecordedMLFlowLogger]) -> Iterator[None]:
    """A full disk (or quota) becomes one message: what stopped, what is kept, and how to continue once there is
    space again. `opened`: the run, once it is opened (it is ended FAILED before this sees the error)."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        run_id = opened[0].run_id if opened else None
        sound, _ = newest_sound(output_dir)
        stopped = f"run {run_id} stopped and is marked FAILED; " if run_id else ""
        then = how_to_continue(run_id, sound) if run_id and sound else "start it again"
        raise DiskFull(
            f"no space left on the disk of {output_dir} ({error.strerror}"
            f"{f': {error.filename}' if error.filename else ''}): {stopped}no checkpoint was torn. Free space there "
            f"(df -h {output_dir}), then {then}."
        ) from error

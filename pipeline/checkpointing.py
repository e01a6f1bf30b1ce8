"""Checkpoints written whole or not at all, never with NaN weights, and checked before a run is resumed from one.

Lightning's own save writes the file through fsspec, which stages it in the system's temporary folder and moves it
into place: when the output folder is on another filesystem the move is a copy, and a process killed during the copy
leaves a good `last.ckpt` truncated. Here a checkpoint is written to a temporary file beside its target, flushed to
the disk, and renamed over the target, which a filesystem does atomically: whoever reads it — a resumed run, the
test, evaluate — finds the old file or the new one, never a part of one. A disk that fills up mid-write leaves the
old file as it was and no temporary file behind.

A checkpoint whose weights are NaN or infinite is never written: resumed, it could only train more NaN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pipeline.errors import TrainingDiverged

TEMPORARY_SUFFIX = ".tmp"  # <name>.ckpt.<pid>.tmp while a checkpoint is being written
WEIGHTS = ("state_dict", "current_model_state")  # the weights (EMA runs keep the live ones in the second)
RESUMABLE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step")


class NonFiniteWeights(TrainingDiverged):
    """A checkpoint was about to be written with NaN or infinite weights."""


def nonfinite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point weights in `checkpoint` that hold a NaN or an infinity."""
    named = [
        (name, tensor)
        for key in WEIGHTS
        for name, tensor in (checkpoint.get(key) or {}).items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
    ]
    if not named:
        return []
    # One reduction per tensor, read back once: a read per tensor would wait on the GPU a hundred times.
    flags = [torch.isfinite(tensor).all() for _, tensor in named]
    finite = torch.stack([flag.to(flags[0].device) for flag in flags]).cpu().tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


def write_atomically(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Write `checkpoint` to `path` so that `path` is always either its old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with temporary.open("wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())  # on the disk before it takes the name: a power loss cannot leave it empty
        os.replace(temporary, path)
    except BaseException:  # a full disk, Ctrl-C: the target keeps its old content, the part goes
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself on the disk
    finally:
        os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO (given to the Trainer as a plugin) with `write_atomically` and no NaN weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # not a local file: Lightning's own way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        bad = nonfinite_tensors(checkpoint)
        if bad:
            raise NonFiniteWeights(
                f"the weights became NaN or infinite ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}), so "
                f"{Path(path).name} was not written: training diverged. Lower optim.lr, set "
                "trainer.gradient_clip_val, or check the input data for NaN/inf."
            )
        write_atomically(checkpoint, Path(path))


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's content as tensors and plain values only (never arbitrary objects), memory-mapped."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def problem(path: Path) -> str | None:
    """Why a training cannot be resumed from the checkpoint at `path`, or None when it can."""
    try:
        if path.stat().st_size == 0:
            return "it is empty (0 bytes)"
        checkpoint = load(path)
    except Exception as error:  # torch reports a damaged file in many ways; each means the same here
        text = str(error).strip()
        return f"it cannot be read ({text.splitlines()[0][:200] if text else type(error).__name__})"
    if not isinstance(checkpoint, dict):
        return "it is not a training checkpoint"
    missing = [key for key in RESUMABLE_KEYS if key not in checkpoint]
    if missing:
        return f"it is not a training checkpoint (it lacks {', '.join(missing)})"
    bad = nonfinite_tensors(checkpoint)
    if bad:
        return f"its weights are NaN or infinite ({', '.join(bad[:3])})"
    return None

"""Where a run came from: the code version, the command, the host, and what it trained on what."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from pipeline.tracking.processes import PROCESS_TAG, process_tag

SOURCE_ROOT = Path(__file__).resolve().parents[2]
KIND_TAG = "kind"  # what a run of ours is, when it is not a training: evaluation | comparison
SOURCE_TAG = "source_run_id"  # the training run an evaluation evaluated


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def run_tags(
    output_dir: str | Path,
    what: Mapping[str, str],
    parent_run_id: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """The tags of a run: code version, command, host, its output folder, `what` it is (e.g. model, dataset, aug),
    its parent run when it has one, and the user's `extra` tags (logger.tags), which win."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "host": platform.node(),
        PROCESS_TAG: process_tag(),  # a run whose process is gone is ended KILLED by the next command on this host
        "output_dir": str(output_dir),  # where its checkpoints are: resume=<run id> looks there
        **{key: str(value) for key, value in what.items()},
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = str(parent_run_id)
    tags.update({str(k): str(v) for k, v in (extra or {}).items()})
    return tags

"""Where a run came from: the code version, the command, the host, and what it trained on what."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
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


def context_tags(source: str | Path | None = None) -> dict[str, str]:
    """MLflow's standard tags of where a run comes from, as `mlflow.start_run` sets them: the user, the source (the
    command's main file) and its git commit, branch and repository (MLflow's own context resolution). `source`: the
    main file when this process is not the run's command (a sweep trial in a Ray worker, whose main file is Ray's);
    the git tags then come from this code's repository."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    tags = resolve_tags()
    if source is not None:
        tags.update({MLFLOW_SOURCE_NAME: str(source), MLFLOW_SOURCE_TYPE: "LOCAL"})
        for key in (MLFLOW_GIT_COMMIT, MLFLOW_GIT_BRANCH, MLFLOW_GIT_REPO_URL):
            tags.pop(key, None)  # those of the other main file's folder, if it is in a repository
    fallback = {  # where MLflow found no repository around the main file: this code's own
        MLFLOW_GIT_COMMIT: _git("rev-parse", "HEAD"),
        MLFLOW_GIT_BRANCH: _git("rev-parse", "--abbrev-ref", "HEAD"),
        MLFLOW_GIT_REPO_URL: _git("config", "--get", "remote.origin.url"),
    }
    for key, value in fallback.items():
        if value and key not in tags:
            tags[key] = value
    return {str(key): str(value) for key, value in tags.items()}


def module_command(argv: Sequence[str] | None = None) -> str:
    """This process's command as a user types it: `python -m pipeline.train …`, not the interpreter's full path."""
    words = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    if len(words) > 2 and words[1] == "-m":
        words[0] = "python"
    return shlex.join(words)


def run_tags(
    output_dir: str | Path,
    what: Mapping[str, str],
    parent_run_id: str | None = None,
    extra: Mapping[str, object] | None = None,
    command: str | None = None,
    source: str | Path | None = None,
) -> dict[str, str]:
    """The tags of a run: MLflow's context tags (user, source, git; see context_tags), whether the code had
    uncommitted changes, the `command` that reproduces the run (default: this process's), the host, its output folder,
    `what` it is (e.g. model, dataset, aug), its parent run when it has one, and the user's `extra` tags
    (logger.tags), which win."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        **context_tags(source),
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "command": command or module_command(),
        "host": platform.node(),
        PROCESS_TAG: process_tag(),  # a run whose process is gone is ended KILLED by the next command on this host
        "output_dir": str(output_dir),  # where its checkpoints are: resume=<run id> looks there
        **{key: str(value) for key, value in what.items()},
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = str(parent_run_id)
    tags.update({str(k): str(v) for k, v in (extra or {}).items()})
    return tags

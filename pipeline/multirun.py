"""Hydra multirun (`python -m pipeline.train -m key=a,b …`): every job a normal run, a failed job recorded and the
sweep going on, and at the end one table of the jobs and an exit status that says whether any failed.

A job that fails does not raise into Hydra: Hydra's basic sweeper stops a sweep at the first failed job's batch and
skips the end-of-sweep callbacks, and a user error's exit(2) would end the whole process. The job prints its error,
writes its outcome beside its outputs (`job.json`), and returns NaN as its metric — which Optuna (Hydra's Optuna
sweeper) records as a failed trial. `JobOutcomes` reads those files when the sweep ends, so it also works with
launchers that run jobs in other processes or on other machines sharing the output folder.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from pipeline.errors import TrainingDiverged, UserInputError

OUTCOME_FILE = "job.json"
FAILED_STATUS = 1  # of the sweep when any job failed: each job's reason is in the table and its job.json


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


class MultirunError(UserInputError):
    """A configuration that one job of a multirun cannot train."""


def one_process_problem(trainer: DictConfig) -> str | None:
    """Why a job with these trainer settings would start more than one process, or None. Lightning starts the other
    processes of a data-parallel run by running the command line again: in a multirun that is the whole sweep."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(nodes, int) and nodes > 1:
        return f"trainer.num_nodes={nodes}"
    if isinstance(devices, int | str) and str(devices).isdigit() and int(devices) > 1:
        return f"trainer.devices={devices}"
    if not isinstance(devices, int | str) and len(devices) > 1:  # a list of device indices
        return f"trainer.devices={list(devices)}"
    if str(devices) in ("auto", "-1") and str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda"):
        import torch

        if torch.cuda.device_count() > 1:  # Lightning would take every GPU
            return f"trainer.devices={devices} with {torch.cuda.device_count()} GPUs"
    return None


def job(cfg: DictConfig, train: Callable[[DictConfig], Any], report: Callable[[Any], None]) -> float:
    """One job of a multirun: `train(cfg)` → its RunResult, reported; whatever the outcome, the sweep goes on.
    Returns the best value of monitor.metric, or NaN when the job failed or has none."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    folder, number = Path(hydra.runtime.output_dir), hydra.job.num
    with open_dict(cfg):  # a name given to every job gets the job's number; the multirun as a filter
        if cfg.logger.run_name:  # unnamed, each job is named by its own overrides (tracking.naming)
            cfg.logger.run_name = f"{cfg.logger.run_name}-{number}"
        cfg.logger.tags["multirun"] = str(Path(hydra.sweep.dir).resolve())
    outcome: dict[str, Any] = {"job": number, "overrides": list(hydra.overrides.task), "metric": cfg.monitor.metric}
    value = math.nan
    try:
        problem = one_process_problem(cfg.trainer)
        if problem:
            raise MultirunError(
                f"{problem}: a multirun job trains in one process. Set trainer.devices=1, or train data-parallel "
                "without -m (pipeline.train) or in pipeline.sweep (sweep.resources.workers_per_trial)"
            )
        result = train(cfg)
    except (UserInputError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        outcome.update(status="failed", error=str(error))
    except Exception as error:  # a crash: its traceback is for whoever fixes it; the other jobs still run
        traceback.print_exc()
        outcome.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    else:
        if result.run_id:
            report(result)
        value = result.metrics.get(f"best_{cfg.monitor.metric}", math.nan)
        outcome.update(status="finished", value=value, run_id=result.run_id, output_dir=str(result.output_dir))
        if result.unsynced:  # trained and tested, but the tracking server has not got all of it
            print(f"error: {result.unsynced}", file=sys.stderr, flush=True)
            outcome.update(status="unsynced", error=result.unsynced)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTCOME_FILE).write_text(json.dumps(outcome, indent=2))
    return value


class JobOutcomes(Callback):
    """At the end of a multirun: a table of its jobs (overrides, best metric or error) and the process's exit status:
    1 if any job failed, 3 if all trained but MLflow lacks part of some (as for one run), else 0."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir)).resolve()
        # Only this sweep's: a fixed hydra.sweep.dir may hold the files of an earlier one.
        files = [path for path in folder.rglob(OUTCOME_FILE) if path.stat().st_mtime >= self.started - 1]
        outcomes = sorted((json.loads(path.read_text()) for path in files), key=lambda outcome: outcome["job"])
        if not outcomes:
            return
        shared = set.intersection(*(set(outcome["overrides"]) for outcome in outcomes)) if len(outcomes) > 1 else set()
        print(f"\nMultirun: {len(outcomes)} jobs in {folder}" + (f" ({' '.join(sorted(shared))})" if shared else ""))
        for outcome in outcomes:
            swept = " ".join(override for override in outcome["overrides"] if override not in shared)
            print(f"  #{outcome['job']} {swept}: {describe(outcome)}")
        failed = [outcome for outcome in outcomes if outcome["status"] == "failed"]
        unsynced = [outcome for outcome in outcomes if outcome["status"] == "unsynced"]
        if failed:
            jobs = ", ".join(f"#{outcome['job']}" for outcome in failed)
            ran = "the others ran" if len(failed) < len(outcomes) else "none trained"
            print(f"error: {len(failed)} of {len(outcomes)} jobs failed ({jobs}); {ran}", file=sys.stderr)
            sys.exit(FAILED_STATUS)
        if unsynced:
            print(f"error: MLflow lacks part of {len(unsynced)} job(s): see pipeline.sync above", file=sys.stderr)
            sys.exit(3)


def describe(outcome: dict[str, Any]) -> str:
    if outcome["status"] == "failed":
        return "failed: " + " ".join(outcome["error"].split())
    value = outcome.get("value")
    shown = "none" if value is None or math.isnan(value) else f"{value:.4f}"
    return f"best {outcome['metric']} {shown}, run {outcome['run_id']}" + (
        " (not all in MLflow)" if outcome["status"] == "unsynced" else ""
    )

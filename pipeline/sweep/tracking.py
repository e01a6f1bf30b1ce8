"""The sweep's MLflow runs: its parent run (space, settings, the table of trials, the best trial) and each trial's
child run, found again when a trial is retried, caught up and given an honest end when the scheduler stopped it."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException

from pipeline.sweep.state import SweepState
from pipeline.tracking.naming import flatten
from pipeline.tracking.processes import CLOSED_TAG, PROCESS_TAG, process_tag
from pipeline.tracking.record import MAX_PARAM_LENGTH, MAX_PARAMS_PER_CALL, chunks, find_record, send_unsent
from pipeline.tracking.status import recorded_status
from pipeline.tracking.store import artifact_location, ensure_experiment, make_store_folder


def find_child_run(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run of a sweep trial, if an earlier attempt of it created one."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`sweep.trial_id` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def catch_up_trial(client: MlflowClient, run_id: str) -> Run:
    """A trial the scheduler stopped, or that died, never ended its run: send what its record has that MLflow
    lacks (its last epoch may still have been queued), when the record is reachable from here."""
    run = client.get_run(run_id)
    output_dir = run.data.tags.get("output_dir")
    record = find_record(Path(output_dir), run_id) if output_dir else None
    if record is not None:
        send_unsent(client, run, record)
        run = client.get_run(run_id)
    return run


class ParentRun:
    """The sweep's own MLflow run: its space and settings, the table of trials, the best trial."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metric(self, key: str, value: float) -> None:
        self.client.log_metric(self.run_id, key, value)

    def log_files(self, files: Mapping[str, Path]) -> None:
        for folder, path in files.items():
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_best(self, overrides: list[str], score: float, metric: str) -> None:
        self.client.log_metric(self.run_id, f"best/{metric}", float(score))
        for override in overrides:
            key, value = override.split("=", 1)
            self.client.set_tag(self.run_id, f"best.{key}", value)

    def recorded_status(self) -> contextlib.AbstractContextManager[None]:
        return recorded_status(lambda status: self.client.set_terminated(self.run_id, status))


def open_parent_run(state: SweepState, tags: Mapping[str, str], resume: bool) -> ParentRun:
    """Create the experiment and the sweep's run in the driver, before any trial can race to create them (the store
    was checked with tracking.store.prepare before Ray started)."""
    make_store_folder(state.tracking_uri)
    client = MlflowClient(state.tracking_uri)
    if resume and state.parent_run_id:
        client.set_tag(state.parent_run_id, PROCESS_TAG, process_tag())  # this driver now: see tracking.processes
        with contextlib.suppress(MlflowException):  # ended KILLED after its driver died: running again now
            client.delete_tag(state.parent_run_id, CLOSED_TAG)
        client.update_run(state.parent_run_id, status="RUNNING")
        return ParentRun(client, state.parent_run_id)
    artifacts = artifact_location(state.tracking_uri, Path(state.folder).parents[1] / "mlruns" / "artifacts")
    experiment_id = ensure_experiment(client, state.experiment_name, artifacts)
    run = client.create_run(
        experiment_id,
        run_name=state.name,
        tags={**tags, "sweep.name": state.name, "sweep.role": "parent", "sweep.folder": state.folder},
    )
    params = {f"sweep.params.{key}": expression for key, expression in state.params.items()}
    params.update({f"sweep.{key}": value for key, value in flatten(state.settings).items()})
    params["base_overrides"] = " ".join(state.base_overrides)
    entries = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
    for chunk in chunks(entries, MAX_PARAMS_PER_CALL):
        client.log_batch(run.info.run_id, params=chunk)
    return ParentRun(client, run.info.run_id)


def settle_trials(parent: ParentRun, results: Any, state: SweepState, tune_metric: str) -> list[dict[str, Any]]:
    """One row per trial; each child run ends with an honest status (ASHA-stopped trials are tagged, not failed)."""
    client, rows = parent.client, []
    for result in results:
        trial_id = str(result.metrics.get("trial_id", Path(result.path).name))
        child_id = find_child_run(state.tracking_uri, parent.run_id, trial_id)
        child = catch_up_trial(client, child_id) if child_id else None
        if result.error is not None:
            outcome = "failed"
            if child and child.info.status == "RUNNING":
                client.set_terminated(child_id, "FAILED")
        elif child is not None and "test/loss" not in child.data.metrics:
            outcome = "stopped early"  # the scheduler ended it: no final test
            client.set_tag(child_id, "sweep.stopped_early", "true")
            client.set_terminated(child_id, "FINISHED")
        else:
            outcome = "completed"
        history = result.metrics_dataframe
        best = None
        if history is not None and tune_metric in history:
            best = float(history[tune_metric].agg(state.settings["mode"]))
        rows.append(
            {
                "trial_id": trial_id,
                "mlflow_run_id": child_id or "",
                "outcome": outcome,
                "epochs": int(result.metrics.get("training_iteration", 0)),
                "seconds": round(float(result.metrics.get("time_total_s", 0.0)), 2),  # Tune's, to the last report
                **result.config,
                state.settings["metric"]: best,
                "test/acc": child.data.metrics.get("test/acc") if child else None,
            }
        )
    return rows

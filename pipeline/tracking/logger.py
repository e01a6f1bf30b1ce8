"""Lightning's MLFlowLogger that keeps a record of everything it logs on local disk, and outlives its server.

Each param, tag, metric point and artifact is recorded first (pipeline.tracking.record), then sent. Metric points
go through MLflow's asynchronous logging (`log_batch(synchronous=False)`): training never waits on a database
transaction or an HTTP request (10–30 ms of CPU each), and MLflow's queue merges what arrives within
MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS into one call. MLflow's client retries transient errors itself
(logger.http); a call that still fails stops the sending, says so once, and the run goes on:
`python -m pipeline.sync <output folder>` uploads the record afterwards. Ending the run waits until every point
is sent. With `system_metrics` the run is watched by MLflow's own SystemMetricsMonitor (the monitor
`mlflow.start_run(log_system_metrics=True)` starts; this run is not started through MLflow's fluent API, so it is
started here), from the run's opening to its end.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import requests
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from pipeline import internals
from pipeline.tracking.naming import flatten
from pipeline.tracking.processes import CLOSED_TAG, PROCESS_TAG, process_tag
from pipeline.tracking.record import (
    MAX_METRICS_PER_CALL,
    MAX_PARAM_LENGTH,
    MAX_PARAMS_PER_CALL,
    RECORD_FOLDER,
    RunRecord,
    chunks,
    send_unsent,
)

SENT_ERRORS = (MlflowException, requests.RequestException, OSError)  # what a failed call to MLflow raises
ASYNC_SETTINGS = {  # MLflow's own variables for its logging queue, read when the queue starts; a user's win
    # One worker sends the batches one after another, so points arrive in the order they were logged: a continued
    # run relies on it (everything up to the last step the server has arrived). MLflow's default is 10 workers.
    "MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE": "1",
    # What arrives within this time goes in one call: a call costs 10–30 ms of CPU on the tracking side.
    "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "2",
}


SINGLE_VALUE_PREFIXES = ("test/",)  # metrics a run logs once (its test), at step 0


class RecordedMLFlowLogger(MLFlowLogger):
    """See the module's docstring. Opened with `open()`, ended once with `end(status)` (not by Lightning)."""

    def __init__(
        self, output_dir: Path, tracking_uri: str, system_metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(tracking_uri=tracking_uri, **kwargs)
        for name, value in ASYNC_SETTINGS.items():
            os.environ.setdefault(name, value)
        self.output_dir = output_dir
        self.tracking_uri = tracking_uri  # MLFlowLogger keeps it only in a private attribute
        self.record: RunRecord
        self.failure: str | None = None  # set when a call failed for good: nothing more is sent
        self.last_steps: dict[str, int] = {}  # of a continued run: its steps up to these are already logged
        self.in_flight: list[Any] = []  # MLflow's RunOperations of the metric batches not known to be sent
        self.system_metrics = system_metrics if system_metrics and system_metrics.get("enabled") else None
        self.monitor: Any = None  # MLflow's SystemMetricsMonitor while the run is watched

    def open(self, continued: bool) -> None:
        """Create the run (or mark the continued one RUNNING again) and its record."""
        before = os.environ.get("MLFLOW_TRACKING_URI")
        client = self.experiment  # creates the run unless continuing one
        # Lightning calls mlflow.set_tracking_uri, which also exports MLFLOW_TRACKING_URI: the next run composed in
        # this process (conf/logger/mlflow.yaml follows that variable) would log into this run's store.
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        if continued:
            # This process takes the run over: named before the run turns RUNNING, so no other command takes the
            # run for one left RUNNING by the dead process it continues.
            client.set_tag(self.run_id, PROCESS_TAG, process_tag())
            with suppress(MlflowException):  # ended by another command after its process died: running again now
                client.delete_tag(self.run_id, CLOSED_TAG)
            client.update_run(self.run_id, status="RUNNING")
        run = client.get_run(self.run_id)
        folder = self.output_dir / RECORD_FOLDER / self.run_id
        if (folder / "run.json").exists():  # a retried trial continues its own record
            self.record = RunRecord.load(folder)
            self.record.status, self.record.end_time = "RUNNING", None
            self.record.tags[PROCESS_TAG] = run.data.tags.get(PROCESS_TAG, "")
            self.record.tags.pop(CLOSED_TAG, None)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.record = RunRecord(
                folder,
                self.tracking_uri,
                client.get_experiment(run.info.experiment_id).name,
                run.info.run_name,
                self.run_id,
                run.info.start_time,
                tags=dict(run.data.tags),
                params=dict(run.data.params),
            )
        self.record.save()
        if continued:
            self._catch_up(client, run)
        if self.system_metrics is not None:
            self._watch(continued)

    def _watch(self, continued: bool) -> None:
        """Start MLflow's system-metrics monitor on this run: system/* metrics every `interval` seconds (a continued
        run's go on from its last step). It sends from its own thread and stops by itself when the server fails."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=float(self.system_metrics["interval"]),
            resume_logging=continued,
            tracking_uri=self.tracking_uri,
        )
        self.monitor.start()

    def _catch_up(self, client: MlflowClient, run: Run) -> None:
        """Send the points the killed process recorded but had not sent yet, and log no step a second time.

        A run killed after logging an epoch but before checkpointing it repeats that epoch when resumed; MLflow
        cannot delete a metric point, so the repeat is not logged again.
        """
        try:
            self.last_steps = send_unsent(client, run, self.record)
        except SENT_ERRORS as error:
            self._fail(f"logging metrics failed: {str(error)[:500]}")

    def _send(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return None
        try:
            return call(*args, **kwargs)
        except SENT_ERRORS as error:
            self._fail(f"{what} failed: {str(error)[:500]}")
        return None

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return  # said once
        self.failure = self.record.unsynced = reason
        self.record.save()
        print(f"warning: {self.unsynced}\nTraining goes on.", file=sys.stderr, flush=True)

    @property
    def unsynced(self) -> str | None:
        """Why the server lacks part of this run and the command that uploads it; None when it has it all."""
        if self.record.unsynced is None:
            return None
        return (
            f"MLflow at {self.tracking_uri} does not have all of run {self.run_id} ({self.record.unsynced}). "
            f"Everything is kept in {self.output_dir}: when the server is back, upload it with\n"
            f"  python -m pipeline.sync {self.output_dir}"
        )

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        values = {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(dict(params)).items()}
        # MLflow params are write-once: a continued run that changes one (another device count changes
        # optim.lr_scaled) keeps the first value rather than failing the whole run's tracking.
        values = {key: value for key, value in values.items() if self.record.params.get(key, value) == value}
        self.record.params.update(values)
        self.record.save()
        for chunk in chunks([Param(key, value) for key, value in values.items()], MAX_PARAMS_PER_CALL):
            self._send("logging params", self.experiment.log_batch, self.run_id, params=chunk)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Lightning passes the `epoch` with every value a module or callback logs (all ours are epoch values) and
        the batch counter as the step. The epoch is made the step instead, so runs with other batch sizes line up
        on MLflow's charts, and `epoch` itself is not logged (the step says it). A test is one value per run: its
        metrics go at step 0, which MLflow's chart view draws as one bar per run rather than a lone point."""
        if "epoch" in metrics:
            metrics = dict(metrics)
            epoch = int(metrics.pop("epoch"))
            step = 0 if any(key.startswith(SINGLE_VALUE_PREFIXES) for key in metrics) else epoch
        now = int(time.time() * 1000)
        points = [  # named and stamped as MLFlowLogger does
            Metric(re.sub(r"[^a-zA-Z0-9_/. -]+", "", key), float(value), now, step or 0)
            for key, value in metrics.items()
            if not isinstance(value, str)
        ]
        points = [point for point in points if point.step > self.last_steps.get(point.key, -1)]
        if not points:
            return
        self.record.add_metrics(points)
        self._notice_failed_sends()
        if self.failure is not None:
            return
        for chunk in chunks(points, MAX_METRICS_PER_CALL):
            try:
                self.in_flight.append(self.experiment.log_batch(self.run_id, metrics=chunk, synchronous=False))
            except Exception as error:  # queueing itself failed: whatever it was, the points are on disk
                self._fail(f"logging metrics failed: {type(error).__name__}: {str(error)[:500]}")
                return

    def _notice_failed_sends(self, wait: bool = False) -> None:
        """Report the first metric batch that MLflow's queue failed to send, once; forget the ones sent. Without
        `wait`, only batches already done are looked at: training never waits on the queue."""
        still = []
        for operations in self.in_flight:
            if not wait and not internals.async_logging_done(operations):
                still.append(operations)
                continue
            try:
                operations.wait()
            except Exception as error:  # MLflow wraps what the call raised, whatever it was
                self._fail(f"logging metrics failed: {str(error)[:500]}")
        self.in_flight = still

    def flush(self) -> None:
        """Wait until every metric point logged so far is sent (or the sending has failed for good)."""
        self._notice_failed_sends(wait=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not tags:
            return
        self.record.tags.update(tags)
        self.record.save()
        for chunk in chunks([RunTag(key, value) for key, value in tags.items()], MAX_PARAMS_PER_CALL):
            self._send("setting tags", self.experiment.log_batch, self.run_id, tags=chunk)

    def set_tag(self, key: str, value: str) -> None:
        self.record.tags[key] = value
        self.record.save()
        self._send("setting a tag", self.experiment.set_tag, self.run_id, key, value)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        entry = [folder or "", os.path.relpath(path, self.output_dir)]
        if entry not in self.record.artifacts:
            self.record.artifacts.append(entry)
            self.record.save()
        self._send(f"uploading {path.name}", self.experiment.log_artifact, self.run_id, str(path), folder or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self.record.folder / "files" / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        folder = Path(artifact_file).parent.as_posix()
        self.log_artifact(path, None if folder == "." else folder)

    def log_datasets(self, entries: list[dict[str, str]]) -> None:
        """Log dataset inputs (pipeline.tracking.datasets' entries); ones the record has already are not sent again
        (a continued run logged them when it started)."""
        from pipeline.tracking.datasets import dataset_inputs, log_inputs

        new = [entry for entry in entries if entry not in self.record.datasets]
        if not new:
            return
        self.record.datasets += new
        self.record.save()
        self._send("logging dataset inputs", log_inputs, self.experiment, self.run_id, dataset_inputs(new))

    def log_model(self, entry: dict[str, Any], upload: Callable[[MlflowClient, str], str]) -> str | None:
        """Record the MLflow model saved in the output folder (`entry`), then `upload(client, run_id)` it; returns the
        logged model's id, or None when it was not sent (the record keeps it for pipeline.sync)."""
        self.record.model = entry
        self.record.save()
        self.flush()  # the metrics the model is linked to must be in MLflow before it
        model_id = self._send("logging the model", upload, self.experiment, self.run_id)
        if model_id is not None:
            entry["model_id"] = model_id
            self.record.save()
        return model_id

    def end(self, status: str) -> None:
        if self.monitor is not None:  # its last samples are sent before the run ends
            self.monitor.finish()
            self.monitor = None
        self.flush()
        self.record.status, self.record.end_time = status, int(time.time() * 1000)
        try:
            self.record.save()
        except OSError as error:  # a full disk: MLflow must still hear the end, or the run stays RUNNING
            print(f"warning: the run's record was not updated ({error})", file=sys.stderr, flush=True)
        self._send("ending the run", self.experiment.set_terminated, self.run_id, status, self.record.end_time)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Nothing: Lightning would end the run after fit; recorded_status ends it once, after the test."""

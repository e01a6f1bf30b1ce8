"""Everything a run logs to MLflow, kept on local disk too, so a server that fails mid-run loses nothing.

`<output folder>/mlflow/<run id>/` holds run.json (where the run goes, its tags, params, artifact files, dataset
inputs, logged model and status), metrics.csv (every metric point, as logged) and files/ (the texts logged as
artifacts).
`python -m pipeline.sync` uploads it; a continued run sends what its killed process had not.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run

RECORD_FOLDER = "mlflow"  # a run's record: <output folder>/mlflow/<run id>/
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
MAX_PARAMS_PER_CALL = 100  # MLflow's limits for one log_batch: params, tags
MAX_METRICS_PER_CALL = 1000  # and metrics


@dataclass
class RunRecord:
    """A run's record on local disk (see the module's docstring)."""

    folder: Path
    tracking_uri: str
    experiment_name: str
    run_name: str
    run_id: str
    start_time: int  # ms, as MLflow keeps it
    status: str = "RUNNING"
    end_time: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    artifacts: list[list[str]] = field(default_factory=list)  # [artifact folder, file relative to output_dir]
    datasets: list[dict[str, str]] = field(default_factory=list)  # dataset inputs: MLflow's fields and `context`
    model: dict[str, Any] | None = None  # the MLflow model saved in the output folder (pipeline.tracking.model)
    unsynced: str | None = None  # why the server lacks part of the run; None while it has all of it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def output_dir(self) -> Path:
        return self.folder.parents[1]

    def save(self) -> None:
        with self.lock:
            state = {key: getattr(self, key) for key in self.__dataclass_fields__ if key not in ("folder", "lock")}
            partial = self.folder / "run.json.partial"
            try:
                partial.write_text(json.dumps(state, indent=2))
                partial.replace(self.folder / "run.json")  # never half-written
            except OSError:  # e.g. a full disk: run.json keeps its last whole state
                partial.unlink(missing_ok=True)
                raise

    @classmethod
    def load(cls, folder: Path) -> RunRecord:
        return cls(folder=folder, **json.loads((folder / "run.json").read_text()))

    def add_metrics(self, points: Sequence[Metric]) -> None:
        path = self.folder / "metrics.csv"
        rows = io.StringIO(newline="")
        writer = csv.writer(rows)
        if not path.exists():
            writer.writerow(["key", "value", "step", "timestamp"])
        writer.writerows([p.key, repr(p.value), p.step, p.timestamp] for p in points)
        data = memoryview(rows.getvalue().encode())
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(handle).st_size
            try:
                while data:
                    data = data[os.write(handle, data) :]
            except OSError:  # a full disk: no torn row is left for the next reader
                os.ftruncate(handle, size)
                raise
        finally:
            os.close(handle)

    def metrics(self) -> list[Metric]:
        path = self.folder / "metrics.csv"
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        points = []
        for row in rows:
            try:
                points.append(Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"])))
            except (TypeError, ValueError):  # the row a process was killed (or a disk filled up) in the middle of
                continue
        return points


def chunks(items: Sequence[object], size: int) -> list[Sequence[object]]:
    """`items` in slices MLflow takes in one call."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def send_unsent(client: MlflowClient, run: Run, record: RunRecord) -> dict[str, int]:
    """Send the metric points of `record` that MLflow lacks: those after the last step it has of each key (points
    go out in order, so everything up to that step arrived). Returns the last step of each key, now logged."""
    run_id = run.info.run_id
    sent = {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
    unsent = [point for point in record.metrics() if point.step > sent.get(point.key, -1)]
    for chunk in chunks(unsent, MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=chunk)
    for point in unsent:
        sent[point.key] = max(point.step, sent.get(point.key, -1))
    return sent


def find_record(output_dir: Path, run_id: str) -> RunRecord | None:
    """The record of run `run_id` in its output folder, when that folder is on this machine."""
    folder = Path(output_dir) / RECORD_FOLDER / run_id
    return RunRecord.load(folder) if (folder / "run.json").exists() else None

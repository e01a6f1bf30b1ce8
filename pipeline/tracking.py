"""MLflow: where runs go, what each run logs, and how its final status is kept honest.

Runs are created through Lightning's MLFlowLogger so per-epoch metrics flow from the Trainer; everything
else (config, tags, cost, figures, checkpoint) goes through the same logger. Before anything is created the
store is checked (`prepare`): a server that is down, refuses the credentials or has lost its database is a
clear error naming the URI, not a traceback after training. Everything a run logs is also kept on local disk
(`RunRecord`), so a server that fails for good mid-run loses nothing: the run goes on, and
`python -m pipeline.sync <output folder>` uploads the rest later.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserInputError

SOURCE_ROOT = Path(__file__).resolve().parent.parent
SERVER_SCHEMES = ("http://", "https://", "databricks")
HTTP_VARIABLES = {  # logger.http → MLflow's own variables, read by its client at every request
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}
CHECK_TIMEOUT_S = 10  # the check before a run: a server that does not answer in this time is reported
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for metrics in one log_batch
SEND_EVERY_S = 2.0  # metric points are sent at most this often: each call is a transaction costing 10–30 ms of CPU
SENT_ERRORS = (MlflowException, requests.RequestException, OSError)  # what a failed call to MLflow raises


class TrackingError(UserInputError):
    """The tracking store cannot take runs: the message names the URI, what failed, and the fix."""


def is_server(uri: str) -> bool:
    return uri.startswith(SERVER_SCHEMES)


def sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def prepare(uri: str, http: Mapping[str, Any]) -> None:
    """Set how MLflow's client retries (logger.http), then check the store now, before any work."""
    for key, variable in HTTP_VARIABLES.items():
        os.environ[variable] = str(http[key])
    check_store(uri)


def check_store(uri: str) -> None:
    """Raise TrackingError unless runs can be logged to `uri`: a server answers its API, a local store's folder
    is writable. Credentials belong in the environment, never in the URI (it is logged with the config)."""
    if urlsplit(uri).password:
        raise TrackingError(
            "logger.tracking_uri contains a password: it would be logged and printed with the config. Remove it "
            "from the URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
            "(for a database URI: PGPASSWORD or ~/.pgpass)."
        )
    database = sqlite_path(uri)
    if database is not None:
        _check_folder(uri, database)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"))


def _check_folder(uri: str, database: Path) -> None:
    """Nothing is created here: a run that fails before it starts leaves no store behind (open_run creates it)."""
    fix = "choose a writable place: paths.mlflow_dir=<folder> or logger.tracking_uri=sqlite:///<folder>/mlflow.db"
    existing = database if database.exists() else next(p for p in database.parents if p.exists())
    if not existing.is_dir() and existing != database:
        raise TrackingError(f"MLflow store {uri}: cannot create {database.parent}: {existing} is a file; {fix}")
    if not os.access(existing, os.W_OK):
        raise TrackingError(f"MLflow store {uri}: {existing} is not writable; {fix}")


def make_store_folder(uri: str) -> None:
    """MLflow creates a sqlite database, not the folders it lies in."""
    database = sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def _reason(error: Exception) -> str:
    text = str(error)
    for needle, reason in (
        ("refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("No route to host", "no route to host"),
        ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"),
    ):
        if needle in text:
            return reason
    return text[:300]


def _check_server(uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)  # MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, TLS settings: as MLflow reads them
    auth = (creds.username, creds.password) if creds.username and creds.password else None
    headers = {"Authorization": f"Bearer {creds.token}"} if creds.token and not auth else {}

    def fail(what: str, fix: str) -> TrackingError:
        return TrackingError(f"MLflow tracking server {uri} (logger.tracking_uri): {what}. {fix}.")

    unreachable = (
        "Start the server (mlflow server --backend-store-uri ... --host ... --port ...), or point "
        "logger.tracking_uri (or MLFLOW_TRACKING_URI) at a running one"
    )
    try:
        requests.get(f"{uri}/health", timeout=CHECK_TIMEOUT_S, verify=creds.verify)
        api = requests.get(
            f"{uri}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=auth,
            headers=headers,
            timeout=CHECK_TIMEOUT_S,
            verify=creds.verify,
        )
    except requests.exceptions.SSLError as error:
        fix = "Give the server's CA certificate with MLFLOW_TRACKING_SERVER_CERT_PATH"
        raise fail(f"TLS failed ({_reason(error)})", fix) from None
    except requests.exceptions.Timeout:
        raise fail(f"no answer within {CHECK_TIMEOUT_S} s", "Check the host and port, and the server's load") from None
    except requests.exceptions.RequestException as error:
        raise fail(f"cannot connect ({_reason(error)})", unreachable) from None
    if api.status_code == 401:
        who = f"rejected the credentials of user {creds.username!r}" if auth else "asks for credentials"
        fix = "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        raise fail(f"{who} (HTTP 401)", fix)
    if api.status_code == 403 and "Invalid Host header" in api.text:  # MLflow's guard against DNS rebinding
        host = urlsplit(uri).netloc
        fix = (
            f"Start the server with --allowed-hosts listing {host} (by default it allows only localhost and private "
            "IP addresses), or reach it by an address it allows"
        )
        raise fail(f"the server does not accept the host name {host!r} (HTTP 403: Invalid Host header)", fix)
    if api.status_code == 403:
        fix = "Ask the server's administrator for access, or use other credentials (MLFLOW_TRACKING_USERNAME)"
        raise fail(f"user {creds.username!r} may not read experiments (HTTP 403)", fix)
    try:
        answer = api.json()
    except ValueError:
        answer = None
    if api.status_code != 200 or not isinstance(answer, dict):
        detail = answer.get("message", "") if isinstance(answer, dict) else api.text[:200].strip()
        raise fail(
            f"its API answered HTTP {api.status_code} {detail}".rstrip(),
            "Is logger.tracking_uri the server's base URL? If it is, the server's log says why: often its "
            "database (--backend-store-uri) is unreachable",
        )


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if new: safe when several runs start at the same moment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another run created it first


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Where the run came from: code version, command, host, and what it trained on what."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "host": platform.node(),
        "output_dir": str(cfg.paths.output_dir),  # where its checkpoints are: resume=<run id> looks there
        "model": str(cfg.model.name),
        "dataset": str(cfg.data.name),
        "aug": str(cfg.aug.name),
    }
    if cfg.logger.parent_run_id:
        tags["mlflow.parentRunId"] = str(cfg.logger.parent_run_id)
    tags.update({str(k): str(v) for k, v in (cfg.logger.tags or {}).items()})
    return tags


RECORD_FOLDER = "mlflow"  # a run's record: <output folder>/mlflow/<run id>/


@dataclass
class RunRecord:
    """Everything a run logs to MLflow, kept on local disk too, in `<output folder>/mlflow/<run id>/`:
    run.json (where the run goes, its tags, params, artifact files and status), metrics.csv (every metric point,
    as sent) and files/ (the texts logged as artifacts). `python -m pipeline.sync` uploads it."""

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
    unsynced: str | None = None  # why the server lacks part of the run; None while it has all of it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # metrics are sent apart

    @property
    def output_dir(self) -> Path:
        return self.folder.parents[1]

    def save(self) -> None:
        with self.lock:
            state = {key: getattr(self, key) for key in self.__dataclass_fields__ if key not in ("folder", "lock")}
            partial = self.folder / "run.json.partial"
            partial.write_text(json.dumps(state, indent=2))
            partial.replace(self.folder / "run.json")  # never half-written

    @classmethod
    def load(cls, folder: Path) -> RunRecord:
        return cls(folder=folder, **json.loads((folder / "run.json").read_text()))

    def add_metrics(self, points: Sequence[Metric]) -> None:
        path = self.folder / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["key", "value", "step", "timestamp"])
            writer.writerows([p.key, repr(p.value), p.step, p.timestamp] for p in points)

    def metrics(self) -> list[Metric]:
        path = self.folder / "metrics.csv"
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]


class RecordedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that keeps a record of everything it logs on local disk, and outlives its server.

    Each param, tag, metric point and artifact is recorded first, then sent. MLflow's client retries transient
    errors itself (logger.http); a call that still fails stops the sending, says so once, and the run goes on:
    `python -m pipeline.sync <output folder>` uploads the record afterwards. Metric points are sent from a
    background thread, what arrived within SEND_EVERY_S in one call: a call costs 10–30 ms of CPU (a database
    transaction, an HTTP request), which training neither waits for nor pays several times an epoch; ending
    the run waits until every point is sent.
    """

    def __init__(self, output_dir: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.record: RunRecord
        self.failure: str | None = None  # set when a call failed for good: nothing more is sent
        self.last_steps: dict[str, int] = {}  # of a continued run: its steps up to these are already logged
        self.pending: queue.Queue[list[Metric] | None] = queue.Queue()  # None: the run ended, the sender stops
        self.sender: threading.Thread | None = None

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
            client.update_run(self.run_id, status="RUNNING")
        run = client.get_run(self.run_id)
        folder = self.output_dir / RECORD_FOLDER / self.run_id
        if (folder / "run.json").exists():  # a retried trial continues its own record
            self.record = RunRecord.load(folder)
            self.record.status, self.record.end_time = "RUNNING", None
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.record = RunRecord(
                folder,
                self._tracking_uri,
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

    def _catch_up(self, client: MlflowClient, run: Run) -> None:
        """Send the points the killed process recorded but had not sent yet, and log no step a second time.

        A run killed after logging an epoch but before checkpointing it repeats that epoch when resumed; MLflow
        cannot delete a metric point, so the repeat is not logged again.
        """
        try:
            self.last_steps = send_unsent(client, run, self.record)
        except SENT_ERRORS as error:
            self._fail(f"logging metrics failed: {str(error)[:500]}")

    def _send(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.failure is not None:
            return
        try:
            call(*args, **kwargs)
        except SENT_ERRORS as error:
            self._fail(f"{what} failed: {str(error)[:500]}")

    def _fail(self, reason: str) -> None:
        self.failure = self.record.unsynced = reason
        if threading.current_thread() is not self.sender:  # the sender leaves saving to the thread that logs
            self.record.save()
        print(f"warning: {self.unsynced}\nTraining goes on.", file=sys.stderr, flush=True)

    @property
    def unsynced(self) -> str | None:
        """Why the server lacks part of this run and the command that uploads it; None when it has it all."""
        if self.record.unsynced is None:
            return None
        return (
            f"MLflow at {self._tracking_uri} does not have all of run {self.run_id} ({self.record.unsynced}). "
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
        entries = [Param(key, value) for key, value in values.items()]
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params a call
            self._send("logging params", self.experiment.log_batch, self.run_id, params=entries[start : start + 100])

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
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
        if self.sender is None:
            self.sender = threading.Thread(target=self._send_metrics, name="mlflow-metrics", daemon=True)
            self.sender.start()
        self.pending.put(points)

    def _send_metrics(self) -> None:
        stopping = False
        while not stopping:
            batch, taken = self.pending.get(), 1
            stopping = batch is None
            points = list(batch or [])
            deadline = time.monotonic() + SEND_EVERY_S  # what arrives meanwhile goes in the same call
            while len(points) < MAX_METRICS_PER_CALL and not stopping:
                try:
                    more = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                taken += 1
                stopping = more is None
                points += more or []
            try:
                for start in range(0, len(points), MAX_METRICS_PER_CALL):
                    chunk = points[start : start + MAX_METRICS_PER_CALL]
                    self._send("logging metrics", self.experiment.log_batch, self.run_id, metrics=chunk)
            except Exception as error:  # anything else: stop sending, never leave end() waiting
                self._fail(f"logging metrics failed: {type(error).__name__}: {str(error)[:500]}")
            finally:
                for _ in range(taken):
                    self.pending.task_done()

    def flush(self) -> None:
        """Wait until every metric point logged so far is sent (or the sending has failed for good)."""
        self.pending.join()

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

    def end(self, status: str) -> None:
        if self.sender is not None:
            self.pending.put(None)  # after the last points: the sender sends them, then stops
            self.flush()
            self.sender = None
        self.record.status, self.record.end_time = status, int(time.time() * 1000)
        self.record.save()
        self._send("ending the run", self.experiment.set_terminated, self.run_id, status, self.record.end_time)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Nothing: Lightning would end the run after fit; recorded_status ends it once, after the test."""


def send_unsent(client: MlflowClient, run: Run, record: RunRecord) -> dict[str, int]:
    """Send the metric points of `record` that MLflow lacks: those after the last step it has of each key (points
    go out in order, so everything up to that step arrived). Returns the last step of each key, now logged."""
    run_id = run.info.run_id
    sent = {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
    unsent = [point for point in record.metrics() if point.step > sent.get(point.key, -1)]
    for start in range(0, len(unsent), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=unsent[start : start + MAX_METRICS_PER_CALL])
    for point in unsent:
        sent[point.key] = max(point.step, sent.get(point.key, -1))
    return sent


def catch_up_trial(client: MlflowClient, run_id: str) -> Run:
    """A trial the scheduler stopped, or that died, never ended its run: send what its record has that MLflow
    lacks (its last epoch may still have been queued), when the record is reachable from here."""
    run = client.get_run(run_id)
    folder = Path(run.data.tags.get("output_dir", "")) / RECORD_FOLDER / run_id
    if run.data.tags.get("output_dir") and (folder / "run.json").exists():
        send_unsent(client, run, RunRecord.load(folder))
        run = client.get_run(run_id)
    return run


def open_run(cfg: DictConfig, tags: Mapping[str, str]) -> RecordedMLFlowLogger:
    """Create the experiment (if new) and the run now, so a tracking problem shows before training.

    With logger.run_id set, the existing run is continued (marked RUNNING again) instead.
    """
    uri, name = str(cfg.logger.tracking_uri), str(cfg.logger.experiment_name)
    artifacts = None if is_server(uri) else str(cfg.logger.artifact_root)
    make_store_folder(uri)
    try:
        if not cfg.logger.run_id:
            ensure_experiment(MlflowClient(uri), name, artifacts)
        logger = RecordedMLFlowLogger(
            Path(cfg.paths.output_dir),
            experiment_name=name,
            run_name=str(cfg.logger.run_name),
            tracking_uri=uri,
            tags=dict(tags),
            artifact_location=artifacts,
            run_id=cfg.logger.run_id,
        )
        logger.open(continued=bool(cfg.logger.run_id))
    except SENT_ERRORS as error:
        raise TrackingError(f"MLflow at {uri}: cannot create the run in experiment {name!r}: {error}") from error
    return logger


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} → {'optim.lr': 0.1}: the keys a user types as overrides."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_inputs(
    logger: RecordedMLFlowLogger,
    cfg: DictConfig,
    model_cost: Mapping[str, float],
    class_counts: Mapping[str, Any],
    skipped_files: Sequence[tuple[str, str]] = (),
) -> None:
    """The run's config (params and YAML), what it costs, what it trains on, and which files it left out."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = flatten(resolved)
    if cfg.logger.run_id:  # continuing a run: MLflow params are write-once, and step 0 is already logged
        logger.log_hyperparams({key: value for key, value in params.items() if key not in logger.record.params})
        logger.set_tag("resumed_from", str(cfg.resume))
        return
    logger.log_hyperparams(params)
    logger.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
    logger.log_text(json.dumps(dict(class_counts), indent=2), "data/class_counts.json")
    logger.log_metrics({**model_cost, "data/skipped_files": len(skipped_files)}, step=0)
    if skipped_files:
        lines = "".join(f"{path}\t{reason}\n" for path, reason in skipped_files)
        logger.log_text("path\treason\n" + lines, "data/skipped_files.tsv")


def log_files(logger: RecordedMLFlowLogger, files: Mapping[str, Path]) -> None:
    """Upload each file into the run's artifact folder named by its key."""
    for folder, path in files.items():
        logger.log_artifact(Path(path), folder)


@contextmanager
def recorded_status(end: Callable[[str], None]) -> Iterator[None]:
    """End the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any error): never left RUNNING."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        end("KILLED")
        raise
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


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


class ParentRun:
    """The sweep's own MLflow run: its space and settings, the table of trials, the best trial."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metric(self, key: str, value: float) -> None:
        self.client.log_metric(self.run_id, key, value)

    def log_files(self, files: Mapping[str, Path]) -> None:
        for folder, path in files.items():
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def log_best(self, overrides: list[str], score: float, metric: str) -> None:
        self.client.log_metric(self.run_id, f"best/{metric}", float(score))
        for override in overrides:
            key, value = override.split("=", 1)
            self.client.set_tag(self.run_id, f"best.{key}", value)

    def recorded_status(self) -> contextlib.AbstractContextManager[None]:
        return recorded_status(lambda status: self.client.set_terminated(self.run_id, status))


def open_parent_run(state: Any, tags: Mapping[str, str], resume: bool, http: Mapping[str, Any]) -> ParentRun:
    """Check the store, then create the experiment and the sweep's run in the driver, before Ray starts and
    before any trial can race to create them."""
    prepare(state.tracking_uri, http)
    make_store_folder(state.tracking_uri)
    client = MlflowClient(state.tracking_uri)
    if resume and state.parent_run_id:
        client.update_run(state.parent_run_id, status="RUNNING")
        return ParentRun(client, state.parent_run_id)
    artifacts = None if is_server(state.tracking_uri) else str(Path(state.folder).parents[1] / "mlruns" / "artifacts")
    experiment_id = ensure_experiment(client, state.experiment_name, artifacts)
    run = client.create_run(
        experiment_id,
        run_name=state.name,
        tags={**tags, "sweep.name": state.name, "sweep.role": "parent", "sweep.folder": state.folder},
    )
    params = {f"sweep.params.{key}": expression for key, expression in state.params.items()}
    params.update({f"sweep.{key}": value for key, value in flatten(state.settings).items()})
    params["base_overrides"] = " ".join(state.base_overrides)
    client.log_batch(run.info.run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
    return ParentRun(client, run.info.run_id)


def settle_trials(parent: ParentRun, results: Any, state: Any, tune_metric: str) -> list[dict[str, Any]]:
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


def ui_command(uri: str) -> str:
    """How to look at the runs of this store."""
    if is_server(uri):
        return f"open {uri} in a browser"
    mlflow = Path(sys.executable).with_name("mlflow")
    with suppress(ValueError):  # shown relative when it is under the current folder
        mlflow = mlflow.relative_to(Path.cwd())
    return f"{mlflow} ui --backend-store-uri {uri} --port 5000"

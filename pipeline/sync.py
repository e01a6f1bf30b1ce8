"""python -m pipeline.sync FOLDER [--tracking-uri URI]: upload runs kept on local disk to MLflow.
python -m pipeline.sync --close-stale | --close-run RUN_ID: end runs left RUNNING by processes that were killed.

Every run keeps what it logs in `<output folder>/mlflow/<run id>/` as well as sending it (pipeline.tracking.record).
When the tracking server failed for good during a run, the run went on and ended with this command. It uploads
the params, tags, every metric point (its step and time included) and the artifacts into the original run when
the server has it, else into a new run of the same experiment, and sets the run's final status. What the server
already holds is not sent twice, so running it again is harmless. FOLDER may hold many runs (a sweep's folder,
outputs/): each is synced.

A process killed outright cannot end its run. The next command that opens the store on the same host ends it
(tracking.processes); `--close-stale` does the same on demand and lists the RUNNING runs of other hosts, which only
their own host can judge; `--close-run` ends one of those once its user knows its process is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag
from mlflow.exceptions import MlflowException

from pipeline.errors import UserInputError
from pipeline.tracking import processes
from pipeline.tracking.checkpoints import get_run
from pipeline.tracking.datasets import dataset_inputs, log_inputs, missing_inputs
from pipeline.tracking.logger import SENT_ERRORS
from pipeline.tracking.processes import close_stale_runs
from pipeline.tracking.record import (
    MAX_METRICS_PER_CALL,
    MAX_PARAMS_PER_CALL,
    RECORD_FOLDER,
    RunRecord,
    chunks,
)
from pipeline.tracking.store import check_store, ensure_experiment, existing_store_client, sqlite_path

RUN_NAME_TAG = "mlflow.runName"


def find_records(folder: Path) -> list[Path]:
    """The run records under `folder` (itself one, or any folder above them)."""
    found = folder.rglob("run.json") if folder.is_dir() else ()
    return sorted(path.parent for path in found if path.parent.parent.name == RECORD_FOLDER)


def _existing_run(client: MlflowClient, run_id: str) -> Run | None:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def sync(record: RunRecord, uri: str) -> str:
    """Upload what the server lacks of `record` to `uri`; returns a one-line summary."""
    client = MlflowClient(uri)
    run = _existing_run(client, record.run_id)
    if run is None:  # e.g. a new server: the run is created again, with its name, tags and start time
        database = sqlite_path(uri)
        artifacts = str(database.parent / "artifacts") if database else None
        experiment_id = ensure_experiment(client, record.experiment_name, artifacts)
        tags = {key: value for key, value in record.tags.items() if key != RUN_NAME_TAG}
        run = client.create_run(experiment_id, start_time=record.start_time, tags=tags, run_name=record.run_name)
    run_id = run.info.run_id

    params = [Param(k, v) for k, v in record.params.items() if k not in run.data.params]  # params are write-once
    tags = [RunTag(k, v) for k, v in record.tags.items() if run.data.tags.get(k) != v and k != RUN_NAME_TAG]
    points = record.metrics()
    held = {
        (m.key, m.step, m.timestamp, m.value)
        for key in {p.key for p in points}
        for m in client.get_metric_history(run_id, key)
    }
    new = [p for p in points if (p.key, p.step, p.timestamp, p.value) not in held]
    for chunk in chunks(params, MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=chunk)
    for chunk in chunks(tags, MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, tags=chunk)
    for chunk in chunks(new, MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=chunk)

    uploaded, missing = 0, []
    for folder, relative in record.artifacts:
        path = record.output_dir / relative
        if path.is_file():
            client.log_artifact(run_id, str(path), folder or None)
            uploaded += 1
        else:
            missing.append(relative)
    datasets = missing_inputs(run, record.datasets)
    if datasets:
        log_inputs(client, run_id, dataset_inputs(datasets))
    model = _sync_model(client, record, run_id)
    status = record.status
    if status == "RUNNING":  # the record has no end: still training, or killed before it could say
        status = "RUNNING (its record has no end: still training, or killed; status left as it is)"
    else:
        client.set_terminated(run_id, record.status, end_time=record.end_time)

    record.tracking_uri, record.run_id, record.unsynced = uri, run_id, None
    record.save()
    summary = (
        f"{record.output_dir}: run {run_id} at {uri}: {len(params)} params, {len(tags)} tags, {len(new)} metric "
        f"points ({len(points) - len(new)} already there), {uploaded} artifacts, {len(datasets)} dataset inputs"
        f"{model}; status {status}"
    )
    return summary + (f"; missing files, not uploaded: {', '.join(missing)}" if missing else "")


def default_store() -> str:
    """The store pipeline.train logs to when run from this folder (conf/logger/mlflow.yaml)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def close_runs(uri: str, stale: bool, run_ids: list[str]) -> None:
    """--close-stale: end the RUNNING runs of this host whose process is gone, and list those of other hosts;
    --close-run: end these runs, whose process their user knows is gone (refused when it is alive here)."""
    check_store(uri)
    client = existing_store_client(uri, "--tracking-uri")
    if stale:
        notes, unknown = close_stale_runs(client, everywhere=True)
        for note in notes:
            print(note)
        for run in unknown:
            print(
                f"run {run.info.run_id} ({run.info.run_name}) is RUNNING in "
                f"{processes.describe(processes.recorded_process(run))}, which cannot be checked from here. If that "
                f"process is gone: python -m pipeline.sync --close-run {run.info.run_id}"
            )
        print(f"{sum(' marked KILLED' in note for note in notes)} runs ended KILLED; {len(unknown)} left RUNNING")
    for run_id in run_ids:
        run = get_run(client, run_id, f"--close-run {run_id}")
        recorded = processes.recorded_process(run)
        if run.info.status != "RUNNING":
            print(f"run {run_id} is {run.info.status} already")
        elif processes.verdict(recorded) == "alive":
            raise UserInputError(
                f"--close-run {run_id}: its {processes.describe(recorded)} is alive. Stop it (kill -TERM "
                f"{recorded.get('pid') if recorded else '<pid>'}): it ends the run itself."
            )
        else:
            why = f"ended by hand (python -m pipeline.sync --close-run): {processes.describe(recorded)} was gone"
            processes.close(client, run, why)
            print(f"run {run_id} ({run.info.run_name}) marked KILLED")


def _sync_model(client: MlflowClient, record: RunRecord, run_id: str) -> str:
    """Log the MLflow model the record names when this run does not have it yet; a few words on what was done."""
    from pipeline.tracking.model import upload_model

    entry = record.model
    if entry is None:
        return ""
    outputs = client.get_run(run_id).outputs
    held = {output.model_id for output in outputs.model_outputs} if outputs else set()
    if entry.get("model_id") in held:
        return ", its model already there"
    if not (record.output_dir / entry["path"]).is_dir():
        return f", missing model folder, not uploaded: {entry['path']}"
    entry["model_id"] = upload_model(client, run_id, record, entry)
    record.save()
    return f", model {entry['model_id']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sync",
        description="Upload runs kept on local disk (<output folder>/mlflow/<run id>/) to an MLflow tracking store; "
        "end runs left RUNNING by processes that were killed.",
    )
    parser.add_argument(
        "folder", type=Path, nargs="?", help="a run's output folder, or any folder above runs (e.g. a sweep's)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="upload here instead of the store each run was logging to (e.g. the server moved); with --close-*: "
        "the store to look in (default: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)",
    )
    parser.add_argument(
        "--close-stale",
        action="store_true",
        help="end (KILLED) the RUNNING runs started on this host whose process is gone, and list the RUNNING runs "
        "of other hosts",
    )
    parser.add_argument(
        "--close-run",
        action="append",
        default=[],
        metavar="RUN_ID",
        help="end (KILLED) this RUNNING run, whose process is gone (e.g. its host was lost); repeatable",
    )
    args = parser.parse_args(argv)
    if args.folder is None and not (args.close_stale or args.close_run):
        parser.error("give a FOLDER to upload, or --close-stale / --close-run RUN_ID")
    try:
        if args.close_stale or args.close_run:
            close_runs(args.tracking_uri or default_store(), args.close_stale, args.close_run)
        if args.folder is None:
            return
        records = find_records(args.folder)
        if not records:
            raise UserInputError(
                f"{args.folder}: no run records (<output folder>/{RECORD_FOLDER}/<run id>/run.json) in it. "
                "Give the output folder a run printed, e.g. outputs/<date>/<time>."
            )
        checked: set[str] = set()
        for folder in records:
            record = RunRecord.load(folder)
            uri = args.tracking_uri or record.tracking_uri
            if uri not in checked:
                check_store(uri)
                checked.add(uri)
            print(sync(record, uri), flush=True)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SENT_ERRORS as error:
        print(f"error: uploading failed: {error}\nRun the same command again: nothing is sent twice.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

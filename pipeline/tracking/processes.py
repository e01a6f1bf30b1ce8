"""Which process a run belongs to, whether that process still lives, and closing the runs whose process is gone.

A process killed outright (SIGKILL, the out-of-memory killer, a power cut) cannot end its MLflow run, which would
stay RUNNING for ever. So every run records the process that tracks it in its `process` tag — host, machine, boot,
PID namespace, PID and the PID's start time (a PID the system has since given to another process is not taken for
it) — and every command that opens a store (`tracking.store.prepare`) ends the RUNNING runs whose process is
certainly gone: it sends the metric points the dead process had recorded on disk but not sent, and marks the run
KILLED with a `closed_stale` tag saying why.

"Certainly gone" is decided only on the machine the process ran on: in the same boot and PID namespace by looking for
the PID with the same start time, and after a reboot of that machine (same machine id, another boot) always. A run of
another machine or container is never ended by guesswork: `python -m pipeline.sync --close-stale` lists those, and
`--close-run <run id>` ends one whose process its user knows is gone.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.tracking.record import find_record, send_unsent

PROCESS_TAG = "process"  # JSON: host, machine, boot, pidns, pid, start
CLOSED_TAG = "closed_stale"  # why a run that was left RUNNING was ended KILLED
Verdict = Literal["alive", "gone", "unknown"]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22); None when there is none."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 else None


def this_process() -> dict[str, Any]:
    """The identity of this process, as recorded in a run's `process` tag."""
    ns = ""
    with suppress(OSError):  # no /proc (not Linux): the run can then only be ended by hand
        ns = os.readlink("/proc/self/ns/pid")
    return {
        "host": platform.node(),
        "machine": _read("/etc/machine-id"),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": ns,
        "pid": os.getpid(),
        "start": _start_ticks(os.getpid()),
    }


def process_tag() -> str:
    return json.dumps(this_process(), sort_keys=True)


def recorded_process(run: Run) -> dict[str, Any] | None:
    try:
        recorded = json.loads(run.data.tags.get(PROCESS_TAG, ""))
    except ValueError:
        return None
    return recorded if isinstance(recorded, dict) else None


def verdict(recorded: dict[str, Any] | None) -> Verdict:
    """Whether the process a run recorded is alive, certainly gone, or cannot be judged from here."""
    me = this_process()
    if not recorded or recorded.get("host") != me["host"]:
        return "unknown"
    same_machine = bool(me["machine"]) and recorded.get("machine") == me["machine"]
    if same_machine and me["boot"] and recorded.get("boot") not in ("", None, me["boot"]):
        return "gone"  # the machine has rebooted since
    if not me["boot"] or recorded.get("boot") != me["boot"] or recorded.get("pidns") != me["pidns"]:
        return "unknown"  # another machine of the same name, another container, or no /proc to look in
    start = _start_ticks(int(recorded.get("pid", -1)))
    return "alive" if start is not None and start == recorded.get("start") else "gone"


def describe(recorded: dict[str, Any] | None) -> str:
    if not recorded:
        return "a process that recorded no identity"
    return f"process {recorded.get('pid')} on host {recorded.get('host')}"


def close(client: MlflowClient, run: Run, why: str) -> None:
    """End a RUNNING run whose process is gone: KILLED, after sending what its record on disk holds and MLflow
    lacks (when the record is on this machine), with `why` as its `closed_stale` tag."""
    run_id = run.info.run_id
    output_dir = run.data.tags.get("output_dir")
    record = find_record(Path(output_dir), run_id) if output_dir and Path(output_dir).is_dir() else None
    end_time = int(time.time() * 1000)
    if record is not None:
        send_unsent(client, run, record)
    client.set_tag(run_id, CLOSED_TAG, why)
    client.set_terminated(run_id, "KILLED", end_time=end_time)
    if record is not None:
        record.status, record.end_time = "KILLED", end_time
        with suppress(OSError):  # e.g. a full disk: MLflow has the end, which is what mattered
            record.save()


def _running_runs(client: MlflowClient, host: str | None) -> list[Run]:
    """The RUNNING runs of every experiment (of `host` only, unless None)."""
    experiments = [e.experiment_id for e in client.search_experiments(max_results=50000)]
    where = "attributes.status = 'RUNNING'" + (f" and tags.host = '{host}'" if host else "")
    runs: list[Run] = []
    for start in range(0, len(experiments), 100):  # a server takes a bounded list of experiments per search
        runs += client.search_runs(experiments[start : start + 100], where, max_results=50000)
    return runs


def _command() -> str:
    """This command as its user typed it: pipeline.train for .../pipeline/train.py, pipeline.sweep for its
    __main__.py."""
    parts = Path(sys.argv[0] if sys.argv and sys.argv[0] else "python").with_suffix("").parts
    if "pipeline" not in parts:
        return parts[-1] if parts else "python"
    start = len(parts) - 1 - parts[::-1].index("pipeline")
    return ".".join(part for part in parts[start:] if part != "__main__")


def close_stale_runs(client: MlflowClient, everywhere: bool = False) -> tuple[list[str], list[Run]]:
    """End the RUNNING runs of this host whose process is certainly gone. Returns a line on each run it ended (or
    left alone because its record says it ended: only `pipeline.sync` uploads the rest of those), and the RUNNING
    runs it cannot judge: of this host's other containers, and with `everywhere` of every other host too."""
    me = this_process()
    command = _command()
    notes, unknown = [], []
    for run in _running_runs(client, None if everywhere else me["host"]):
        recorded = recorded_process(run)
        judged = verdict(recorded)
        if judged == "unknown":
            unknown.append(run)
            continue
        if judged == "alive":
            continue
        output_dir = run.data.tags.get("output_dir")
        record = find_record(Path(output_dir), run.info.run_id) if output_dir and Path(output_dir).is_dir() else None
        if record is not None and record.status != "RUNNING":  # it ended, but the server missed the end
            notes.append(
                f"run {run.info.run_id} ended {record.status} but MLflow lacks part of it: "
                f"python -m pipeline.sync {record.output_dir}"
            )
            continue
        why = (
            f"{describe(recorded)} is gone: it was killed before it could end the run "
            f"(found by {command}, process {me['pid']}, {time.strftime('%Y-%m-%d %H:%M:%S')})"
        )
        close(client, run, why)
        notes.append(f"run {run.info.run_id} ({run.info.run_name}) was left RUNNING: {why}; marked KILLED")
    return notes, unknown


def close_stale(uri: str) -> None:
    """`close_stale_runs` on the store at `uri`, saying what it did; a store that does not exist yet holds no run,
    and a failure here never stops the command that asked (it is a courtesy to earlier runs)."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    from pipeline.tracking.store import sqlite_path

    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        return
    try:
        notes, _ = close_stale_runs(MlflowClient(uri))
    except (MlflowException, RequestException, OSError) as error:
        print(f"warning: could not look for runs left RUNNING in {uri}: {str(error)[:300]}", file=sys.stderr)
        return
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)

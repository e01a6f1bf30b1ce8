"""A sweep on two hosts against the same sweep on one: wall time and per-trial overhead, with the same trials.

    .venv/bin/python benchmarks/two_hosts.py [--trials 6] [--epochs 5] [extra overrides...]

As root (tests/helpers/hosts.py makes the hosts: network, PID, mount and UTS namespaces joined by a veth pair on
10.77.0.0/24). Both layouts use host A's MLflow server on a fresh PostgreSQL database and the shared storage folder,
as tests/test_two_hosts.py does, and run the same `sweep=lr_wd` trials (same search seed, FIFO, LeNet-5 on the
digits), two at a time:
- two hosts: the Ray head on A (1 CPU), a Ray worker on B (1 CPU): one trial on each host at a time;
- one host: the Ray head on A with 2 CPUs, no worker: both trials on A.
The machine's cores are shared by both hosts, so this measures what spreading a sweep over hosts costs (scheduling,
a trial's start on the other node, its checkpoints and logging across hosts), not more compute.

Per-trial overhead = (sweep wall × 2 − sum of the trials' run times) ÷ trials: the seconds of a trial slot not spent
inside run(cfg) (a trial's run time is its MLflow run's start to end: data, model, training, test, logging).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import QUIET, clean_env  # noqa: E402 - the repository's test helpers, found from its root
from tests.helpers.hosts import start_tracking_server, two_hosts  # noqa: E402
from tests.helpers.postgres import Database, fresh_database  # noqa: E402

BIN = Path(sys.executable).parent
RAY_PORT = 6379


def sweep(layout: str, trials: int, epochs: int, overrides: list[str], database: Database) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as outside, two_hosts(Path(outside) / "shared") as (a, b, shared):
        (Path(outside) / "shared" / "home").mkdir()
        env = clean_env(HOME=str(shared / "home"))
        log = Path(outside) / "hosts.log"
        server = start_tracking_server(a, database.socket_uri, shared, env, log)
        ray = [str(BIN / "ray"), "start", "--disable-usage-stats"]
        head = ["--head", f"--node-ip-address={a.address}", f"--port={RAY_PORT}", "--include-dashboard=false"]
        a.run([*ray, *head, f"--num-cpus={1 if layout == 'two hosts' else 2}"], env)
        if layout == "two hosts":
            b.run([*ray, "--num-cpus=1", f"--address={a.address}:{RAY_PORT}", f"--node-ip-address={b.address}"], env)
        name = layout.replace(" ", "-")
        command = [
            str(BIN / "python"), "-m", "pipeline.sweep", f"paths.root={shared}", *QUIET, "sweep=lr_wd",
            f"sweep.name={name}", f"sweep.num_samples={trials}", "sweep.scheduler=fifo",
            "sweep.max_concurrent_trials=2", f"trainer.max_epochs={epochs}", "logger.log_checkpoint=false",
            "logger.experiment_name=two-hosts-bench",
            f"ray.address={a.address}:{RAY_PORT}", f"logger.tracking_uri={server}",
            f"sweep.storage_path={shared}/sweeps", *overrides,
        ]  # fmt: skip
        done = a.run(command, env, timeout=1800, check=False)
        if done.returncode != 0:
            sys.exit(done.stdout[-4000:] + done.stderr[-4000:])
    client = mlflow.MlflowClient(database.tcp_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("two-hosts-bench").experiment_id], f"tags.`sweep.name` = '{name}'"
    )
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    seconds = [(r.info.end_time - r.info.start_time) / 1000 for r in children]
    wall = parent.data.metrics["sweep/wall_s"]
    return {
        "nodes": len({r.data.tags["sweep.node_id"] for r in children}),
        "startup": parent.data.metrics["sweep/ray_startup_s"],
        "wall": wall,
        "runs": sum(seconds),
        "mean run": sum(seconds) / len(seconds),
        "overhead": (wall * 2 - sum(seconds)) / len(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = {}
    with fresh_database() as database:
        for layout in ("one host", "two hosts"):
            rows[layout] = sweep(layout, args.trials, args.epochs, args.overrides, database)
    print("| layout | hosts the trials ran on | Ray start-up (s) | sweep wall (s) | sum of trial runs (s) "
          "| mean trial run (s) | overhead per trial (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for layout, row in rows.items():
        print(
            f"| {layout} | {row['nodes']} | {row['startup']:.1f} | {row['wall']:.1f} | {row['runs']:.1f} "
            f"| {row['mean run']:.1f} | {row['overhead']:.1f} |"
        )


if __name__ == "__main__":
    main()

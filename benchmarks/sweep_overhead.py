"""Scheduling overhead of a sweep: 8 short trials, 2 at a time, against the time the trials themselves take.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 8] [--concurrent 2] [extra overrides...]

Runs `python -m pipeline.sweep` (as root, inside a private network and PID namespace like the tests) on
the digits with LeNet-5, FIFO scheduling, then reads the sweep's MLflow parent run and child runs:
- Ray start-up (`sweep/ray_startup_s`, reported separately),
- sweep wall time (`sweep/wall_s`: Tuner.fit plus the driver's bookkeeping),
- each trial's time as its MLflow run saw it (start to end of run(cfg): data, model, training, test, logging)
  and as Tune saw it (time_total_s: to the last report).
Target (issue): sweep wall ≤ 1.3 × (sum of trial times ÷ concurrent trials).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
ISOLATE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL",
           "sh", "-c", 'ip link set lo up && exec "$@"', "isolated"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:
        command = [
            sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", "sweep=lr_wd", "sweep.name=bench",
            f"sweep.num_samples={args.trials}", "sweep.scheduler=fifo",
            f"sweep.max_concurrent_trials={args.concurrent}", f"ray.num_cpus={args.concurrent}",
            f"ray.temp_dir={ray_tmp}", "trainer.max_epochs=5", "logger.log_checkpoint=false", *args.overrides,
        ]  # fmt: skip
        done = subprocess.run([*ISOLATE, *command], cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(done.stdout[-4000:] + done.stderr[-4000:])
        client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        run_seconds = [(r.info.end_time - r.info.start_time) / 1000 for r in children]
        with (Path(root) / "sweeps" / "bench" / "trials.csv").open() as handle:
            tune_seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    wall = parent.data.metrics["sweep/wall_s"]
    ideal = sum(run_seconds) / args.concurrent
    header = ["trials", "concurrent", "Ray start-up (s)", "sweep wall (s)", "sum of trial runs (s)",
              f"sum ÷ {args.concurrent} (s)", "wall ÷ ideal", "sum of Tune trial times (s)"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(children)} | {args.concurrent} | {parent.data.metrics['sweep/ray_startup_s']:.1f} | {wall:.1f} "
        f"| {sum(run_seconds):.1f} | {ideal:.1f} | {wall / ideal:.2f} | {sum(tune_seconds):.1f} |"
    )


if __name__ == "__main__":
    main()

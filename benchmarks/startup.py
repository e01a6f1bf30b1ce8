"""Start-up: `pipeline.train --help`, a mistake reported by `pipeline.train` and by `pipeline.sweep`, and the time from
a fresh interpreter to the first training step, against `python -c "import torch"` as the floor.

    .venv/bin/python benchmarks/startup.py [--repeats 5]

Each measurement is a fresh process. The first-step time comes from a callback in the FIRST_STEP script
below (compose + run(cfg), as pipeline.train does); the clock starts just before the process is spawned.
Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_STEP = """
import sys, time
import lightning as L
from lightning.pytorch.callbacks import Callback
from pipeline.config import compose
from pipeline.run import run

class FirstStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            print(f"FIRST_STEP {time.time() - float(sys.argv[1]):.3f}", flush=True)

root = sys.argv[2]
cfg = compose([f"paths.root={root}", f"paths.output_dir={root}/{sys.argv[3]}", "progress=none",
               "trainer.max_epochs=1", "scheduler.warmup_epochs=0", "trainer.limit_train_batches=1",
               "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_model_summary=false"])
run(cfg, callbacks=[FirstStep()])
"""


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    rows: dict[str, list[float]] = {
        "python -c 'import torch'": [],
        "python -c 'import lightning'": [],
        "python -c 'import pipeline.run'": [],
        "pipeline.train --help": [],
        "pipeline.train optim.lr=-1 (the error)": [],
        "pipeline.sweep, a search-space mistake (the error)": [],
        "first step, new MLflow store": [],
        "first step, existing store": [],
    }
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for _ in range(args.repeats):
        for module in ("torch", "lightning", "pipeline.run"):
            rows[f"python -c 'import {module}'"].append(timed([python, "-c", f"import {module}"])[0])
        rows["pipeline.train --help"].append(timed([python, "-m", "pipeline.train", "--help"])[0])
        with tempfile.TemporaryDirectory() as root:  # a value that cannot work: answered before torch loads
            start = time.perf_counter()
            subprocess.run([python, "-m", "pipeline.train", "optim.lr=-1", f"paths.root={root}"], cwd=REPO,
                           capture_output=True)  # fmt: skip
            rows["pipeline.train optim.lr=-1 (the error)"].append(time.perf_counter() - start)
            # The sweep driver composes, checks the search space (with its tracking code imported), and stops there:
            # before Ray starts, so no network namespace is needed.
            start = time.perf_counter()
            subprocess.run([python, "-m", "pipeline.sweep", "sweep.params={optim.lrr: 'interval(0.01, 0.1)'}",
                            f"paths.root={root}"], cwd=REPO, capture_output=True)  # fmt: skip
            rows["pipeline.sweep, a search-space mistake (the error)"].append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as root:
            # The first run in a folder creates the sqlite store (MLflow runs its schema migrations); later ones
            # open it, as every run after a user's first does.
            for name in ("first step, new MLflow store", "first step, existing store"):
                env_start = time.time()
                done = subprocess.run(
                    [python, "-c", FIRST_STEP, str(env_start), root, name.split(",")[1].split()[0]],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    check=True,
                    env=environment,
                )
                line = next(line for line in done.stdout.splitlines() if line.startswith("FIRST_STEP"))
                rows[name].append(float(line.split()[1]))
    floor = statistics.median(rows["python -c 'import torch'"])
    print(f"{args.repeats} fresh processes each; median (min–max)\n")
    print("| what | seconds | × import torch |\n|---|---:|---:|")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} ({min(values):.2f}–{max(values):.2f}) | {median / floor:.2f} |")


if __name__ == "__main__":
    main()

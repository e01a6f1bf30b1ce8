"""A short training beside a busy core, with torch's default threads (one per core) against one thread: what each
training process of the test suite meets, where two test workers share two cores.

    .venv/bin/python benchmarks/threads_beside_busy_core.py [--rounds 3] [overrides of the training...]

A busy process (a Python loop, standing for the other test worker) runs for the whole measurement. Each training is
a fresh `python -m pipeline.train` (default: LeNet-5 on the digits, 6 epochs, no Grad-CAM figure), timed from spawn to
exit; the sides alternate (default threads, one thread, …) so that drift hits both. CPU is user + system of the
training process and its threads. Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from whole_job import spread, timed

DEFAULT = ["trainer.max_epochs=6", "class_activation.images=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training (default: 6 epochs, no figure)")
    args = parser.parse_args()
    overrides = args.overrides or DEFAULT
    sides = {"torch's default (a thread per core)": None, "`OMP_NUM_THREADS=1`": "1"}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "pipeline.train", f"paths.root={folder}", "progress=none", *overrides]
            timed(command)  # creates the store; not counted
            walls: dict[str, list[float]] = {side: [] for side in sides}
            cpus: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, threads in sides.items():
                    os.environ.pop("OMP_NUM_THREADS", None)
                    if threads is not None:
                        os.environ["OMP_NUM_THREADS"] = threads
                    wall, _, cpu = timed(command)
                    walls[side].append(wall)
                    cpus[side].append(cpu)
    finally:
        busy.kill()
        busy.wait()
    print(f"`python -m pipeline.train {' '.join(overrides)}` beside a busy core, {os.cpu_count()} cores, "
          f"{args.rounds} rounds\n")  # fmt: skip
    print("| threads | wall (s) | CPU (s) |\n|---|---:|---:|")
    for side in sides:
        print(f"| {side} | {spread(walls[side])} | {spread(cpus[side])} |")
    default, one = (statistics.median(cpus[side]) for side in sides)
    print(f"\nCPU with the default threads: **{default / one:.2f}×** that with one thread.")


if __name__ == "__main__":
    main()

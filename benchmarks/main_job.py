"""The README's default command, end to end: wall time from start to printed result, and test accuracy.

    .venv/bin/python benchmarks/main_job.py [--seeds 0 1 2] [extra overrides...]

Each run is a fresh process (imports included), writing to a temporary folder; results go to stdout
as a Markdown table to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model=classic_resnet18_cifar")
    args = parser.parse_args()

    print("| seed | wall (s) | test/acc |\n|---:|---:|---:|")
    walls, accuracies = [], []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as root:
            command = [sys.executable, "-m", "pipeline.train", f"paths.root={root}", f"seed={seed}", "progress=none"]
            start = time.perf_counter()
            done = subprocess.run(command + args.overrides, cwd=REPO, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"run failed:\n{done.stderr[-3000:]}")
        accuracy = float(re.search(r"test/acc\s*│\s*([0-9.]+)", done.stdout).group(1))
        walls.append(wall)
        accuracies.append(accuracy)
        print(f"| {seed} | {wall:.1f} | {accuracy:.4f} |", flush=True)
    print(f"| mean | {sum(walls) / len(walls):.1f} | {sum(accuracies) / len(accuracies):.4f} |")


if __name__ == "__main__":
    main()

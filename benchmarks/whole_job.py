"""The default job, whole process, against the same job written by hand in plain PyTorch (benchmarks/bare_job.py);
then `pipeline.predict` on one image and `pipeline.evaluate` of the run, against `python -c "import torch"`.

    .venv/bin/python benchmarks/whole_job.py [--rounds 5] [overrides of the default job...]

Every measurement is a fresh process, timed from spawn to exit. A first pipeline run (not counted) creates the MLflow
store, as a user's first run in a folder does, and gives the run that predict and evaluate read. The sides then
alternate (bare, pipeline, bare, …) so that a busy neighbour hits both; the ratio is that of the medians, and each
round's own ratio shows the drift. Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, str, float]:
    """Wall seconds from spawn to exit, the process's output, and its CPU seconds (every thread, user + system)."""
    start, cpu = time.perf_counter(), cpu_of_children()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout, cpu_of_children() - cpu


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of both sides, e.g. trainer.max_epochs=20")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.config import compose

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        cfg = compose([f"paths.root={root}", *args.overrides])
        pipeline = [sys.executable, "-m", "pipeline.train", f"paths.root={root}", "progress=none", *args.overrides]
        bare = [
            sys.executable, str(REPO / "benchmarks" / "bare_job.py"), f"--epochs={cfg.trainer.max_epochs}",
            f"--batch-size={cfg.data.batch_size}", f"--lr={cfg.optim.lr}", f"--weight-decay={cfg.optim.weight_decay}",
            f"--out={root / 'bare'}",
        ]  # fmt: skip
        first, output, _ = timed(pipeline)
        run_id = re.search(r"MLflow run: (\w+)", output).group(1)
        print(f"first pipeline run (creates the store; not counted): {first:.2f} s\n")
        print(
            "| round | bare PyTorch: wall (s) | pipeline.train: wall (s) | ratio | bare: CPU (s) | pipeline: CPU (s) "
            "| ratio |\n|---:|---:|---:|---:|---:|---:|---:|"
        )
        bares, pipelines, bare_cpus, pipeline_cpus = [], [], [], []
        for round_ in range(args.rounds):
            wall, _, cpu = timed(bare)
            bares.append(wall)
            bare_cpus.append(cpu)
            wall, _, cpu = timed(pipeline)
            pipelines.append(wall)
            pipeline_cpus.append(cpu)
            print(
                f"| {round_ + 1} | {bares[-1]:.2f} | {pipelines[-1]:.2f} | {pipelines[-1] / bares[-1]:.2f} "
                f"| {bare_cpus[-1]:.2f} | {pipeline_cpus[-1]:.2f} | {pipeline_cpus[-1] / bare_cpus[-1]:.2f} |",
                flush=True,
            )
        ratio = statistics.median(pipelines) / statistics.median(bares)
        cpu_ratio = statistics.median(pipeline_cpus) / statistics.median(bare_cpus)
        print(
            f"| median | {spread(bares)} | {spread(pipelines)} | **{ratio:.2f}** | {spread(bare_cpus)} "
            f"| {spread(pipeline_cpus)} | **{cpu_ratio:.2f}** |\n"
        )

        image = root / "seven.png"
        subprocess.run(
            [sys.executable, "-c", "import sys; from PIL import Image; from sklearn.datasets import load_digits; "
             "Image.fromarray((load_digits().images[7] * 16).astype('uint8')).save(sys.argv[1])", str(image)],
            check=True,
        )  # fmt: skip
        commands = {
            "`python -c 'import torch'` (the floor)": [sys.executable, "-c", "import torch"],
            "`pipeline.predict source=<run> input=<one image>`": [
                sys.executable, "-m", "pipeline.predict", f"paths.root={root}", f"source={run_id}", f"input={image}",
            ],
            "`pipeline.evaluate source=<run>` (the test split)": [
                sys.executable, "-m", "pipeline.evaluate", f"paths.root={root}", f"source={run_id}", "progress=none",
            ],
        }  # fmt: skip
        print("| command | seconds |\n|---|---:|")
        for name, command in commands.items():
            print(f"| {name} | {spread([timed(command)[0] for _ in range(args.rounds)])} |", flush=True)


if __name__ == "__main__":
    main()

"""Gradient checkpointing (perf.grad_checkpointing): peak memory and step time of ResNet-50 training steps with and
without it, on the CPU.

    .venv/bin/python benchmarks/grad_checkpointing.py [--models classic_resnet50 resnet50] [--batch 32] [--size 224]
                                                      [--steps 4] [--threads 2]

Each (model, checkpointing) pair runs in a fresh process, so each peak is that configuration's own: the process's
peak resident memory (getrusage ru_maxrss) before the first step (model, optimizer, batch) and after the last,
and the difference, which is what the training steps themselves needed (activations kept for the backward pass,
gradients, optimizer state). One untimed step first (allocator and oneDNN warm-up), then `--steps` timed SGD
steps (forward, cross-entropy, backward, update) on a fixed random batch, each timed by the wall clock and by the
process's CPU time: on a machine shared with other work the wall clock measures the neighbours as much as the
step, the CPU time only this process's work. Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(model_name: str, checkpointing: bool, batch: int, size: int, steps: int, threads: int) -> dict:
    """One configuration, in this process: what `child` prints as JSON."""
    import timm
    import torch

    import pipeline.models  # noqa: F401  (registers ours)
    from pipeline.module import enable_grad_checkpointing

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000, in_chans=3).train()
    if checkpointing:
        enable_grad_checkpointing(model)  # what perf.grad_checkpointing=true does
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    before = peak_mib()
    wall, cpu = [], []
    for step in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if step:  # the first step warms up
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"before": before, "peak": peak_mib(), "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["classic_resnet50", "resnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, checkpointing = args.child[0], args.child[1] == "on"
        print(json.dumps(measure(name, checkpointing, args.batch, args.size, args.steps, args.threads)))
        return
    settings = ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
    settings += ["--threads", str(args.threads)]
    print(f"batch {args.batch} × 3×{args.size}×{args.size}, {args.steps} timed SGD steps, {args.threads} threads;")
    print("step times: median (min–max)\n")
    print("| model | grad checkpointing | peak RSS (MiB) | of which the steps (MiB) | step, wall (s) | step, CPU (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        for mode in ("off", "on"):
            command = [sys.executable, __file__, "--child", name, mode, *settings]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            steps = [f"{statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f})" for t in (result["wall"], result["cpu"])]
            memory = f"{result['peak']:,.0f} | {result['peak'] - result['before']:,.0f}"
            print(f"| {name} | {mode} | {memory} | {' | '.join(steps)} |", flush=True)


if __name__ == "__main__":
    main()

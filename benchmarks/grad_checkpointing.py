"""Gradient checkpointing (perf.grad_checkpointing): peak memory and step time of ResNet-50 training steps with and
without it, on the CPU.

    .venv/bin/python benchmarks/grad_checkpointing.py [--models classic_resnet50 resnet50] [--batch 32] [--size 224]
                                                      [--steps 4] [--threads 2]

Each (model, checkpointing) pair runs in a fresh process, so each peak is that configuration's own: the process's
peak resident memory (getrusage ru_maxrss) before the first step (model, optimizer, batch) and after the last,
and the difference, which is what the training steps themselves needed (activations kept for the backward pass,
gradients, optimizer state). One untimed step first (allocator and oneDNN warm-up), then `--steps` timed SGD
steps (forward, cross-entropy, backward, update) on a fixed random batch. Results go to stdout as Markdown.
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
    model = timm.create_model(model_name, num_classes=1000).train()
    if checkpointing:
        enable_grad_checkpointing(model)  # what perf.grad_checkpointing=true does
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    before = peak_mib()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return {"before": before, "peak": peak_mib(), "times": times}


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
    print(f"batch {args.batch} × 3×{args.size}×{args.size}, {args.steps} timed SGD steps, {args.threads} threads\n")
    print("| model | grad checkpointing | peak RSS (MiB) | of which the steps (MiB) | step (s), median (min–max) |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        for mode in ("off", "on"):
            command = [sys.executable, __file__, "--child", name, mode, *settings]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times = result["times"]
            print(
                f"| {name} | {mode} | {result['peak']:,.0f} | {result['peak'] - result['before']:,.0f} | "
                f"{statistics.median(times):.2f} ({min(times):.2f}–{max(times):.2f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()

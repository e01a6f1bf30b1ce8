"""What MLflow's system metrics cost a training epoch: run(cfg) with logger.system_metrics on and off, side by side.

    .venv/bin/python benchmarks/system_metrics.py [--rounds 4] [--epochs 6] [--interval 10] [--samples 50]

Two measures:
1. Per epoch: the same training (LeNet-5 on the digits, the default config) with the monitor on and off, the sides
   alternating (off, on, off, …) so a noisy neighbour hits both; the first epoch of each run is not counted; median
   over all counted epochs. `--interval` is the sampling interval of the "on" side (default 10 s, MLflow's and ours).
2. Per sample: MLflow's SystemMetricsMonitor collecting and logging one sample into a run of a local store, timed
   directly (wall and this process's CPU time), `--samples` times. A sample is what the monitor's thread does every
   interval; per epoch it costs (epoch seconds / interval) samples.
Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from pipeline.config import compose
from pipeline.run import run


class EpochClock(Callback):
    """Wall time of each epoch: the training pass and the validation after it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seconds.append(time.perf_counter() - self.start)


def epochs(enabled: bool, interval: float, count: int, extra: Sequence[str]) -> list[float]:
    with tempfile.TemporaryDirectory() as root:
        cfg = compose(
            [
                f"paths.root={root}",
                f"paths.output_dir={root}/out",
                "progress=none",
                "trainer.enable_model_summary=false",
                f"trainer.max_epochs={count}",
                f"logger.system_metrics.enabled={str(enabled).lower()}",
                f"logger.system_metrics.interval={interval}",
                *extra,
            ]
        )
        clock = EpochClock()
        run(cfg, callbacks=[clock])
    return clock.seconds[1:]


def per_sample(samples: int) -> tuple[float, float]:
    """Median wall and CPU seconds of one sample: collect every monitor's metrics, then log them."""
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with tempfile.TemporaryDirectory() as root:
        uri = f"sqlite:///{root}/mlflow.db"
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("sample")).info.run_id
        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
        wall, cpu = [], []
        for _ in range(samples):
            start, start_cpu = time.perf_counter(), time.process_time()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        client.set_terminated(run_id)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("overrides", nargs="*", help="train overrides for both sides (e.g. model=nin)")
    args = parser.parse_args(argv)

    off: list[float] = []
    on: list[float] = []
    rounds = []
    for _ in range(args.rounds):
        a = epochs(False, args.interval, args.epochs, args.overrides)
        b = epochs(True, args.interval, args.epochs, args.overrides)
        off += a
        on += b
        rounds.append(statistics.median(b) / statistics.median(a))
    wall, cpu = per_sample(args.samples)
    median_off, median_on = statistics.median(off), statistics.median(on)
    print("| interval | epochs counted per side | off (s/epoch) | on (s/epoch) | ratio | ratio per round |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.interval:g} s | {len(off)} | {median_off:.3f} | {median_on:.3f} | {median_on / median_off:.3f}× | "
        f"{min(rounds):.2f}–{max(rounds):.2f} |"
    )
    print()
    print(
        f"One sample (collect + log, median of {args.samples}): {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms CPU; "
        f"per {median_off:.2f} s epoch at one sample per {args.interval:g} s: "
        f"{cpu * median_off / args.interval * 1000:.2f} ms CPU ({cpu / args.interval:.3%} of a core)."
    )


if __name__ == "__main__":
    main()

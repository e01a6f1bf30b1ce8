"""python -m pipeline.transfer_digits [--draws N] [overrides]: transfer learning, proven offline, in one command.

Runs of run(cfg), each composed from its preset in conf/experiment/ plus the overrides given (they apply to
every stage, e.g. trainer.max_epochs=2 for a quick check):
  pretrain   transfer_digits_pretrain: ResNet-18 from scratch on digits 0–4 (once)
  finetune   transfer_digits_finetune: from the pretrain run's checkpoint (model.weights=runs:/<id>), digits 5–9,
             a few labelled images per class
  scratch    transfer_digits_scratch: the same few images and schedule, from random weights
With a few images per class, which images are drawn moves accuracy by several points, so finetune and scratch
run once per draw (--draws, default 3: data.source.split_seed=0..N-1, each pair on the same images and test
set), and the gain is reported per draw and on average. Then a table of test accuracy and wall time. Every run
lands in one MLflow experiment, tagged transfer_stage=<stage>, transfer_draw=<draw> and
transfer_group=<this invocation>, so the dashboard compares them.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.errors import TrainingDiverged, UserInputError

STAGES = ("pretrain", "finetune", "scratch")
DEFAULT_DRAWS = 3


@dataclass(frozen=True)
class StageRun:
    stage: str
    draw: int | None  # which few-shot draw (data.source.split_seed); None for pretrain
    result: Any  # pipeline.run.RunResult
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.result.metrics["test/acc"]


def stage_overrides(stage: str, group: str, pretrain_run_id: str | None, draw: int | None = None) -> list[str]:
    """What makes one stage of this invocation: its preset, its output folder, its tags, its weights, its draw."""
    folder = stage if draw is None else f"{stage}-draw{draw}"
    overrides = [
        f"experiment=transfer_digits_{stage}",
        f"paths.output_dir=${{paths.root}}/outputs/transfer_digits/{group}/{folder}",
        f"++logger.tags.transfer_group={group}",
    ]
    if draw is not None:
        overrides += [f"data.source.split_seed={draw}", f"++logger.tags.transfer_draw={draw}"]
    if stage == "finetune":
        overrides.append(f"model.weights=runs:/{pretrain_run_id}")
    return overrides


def main(overrides: Sequence[str] = (), draws: int = DEFAULT_DRAWS) -> list[StageRun]:
    """Pretrain once, then fine-tune and train from scratch on each draw of the few labelled images."""
    from pipeline.config import compose
    from pipeline.run import run

    group = datetime.now().strftime("%Y%m%d-%H%M%S")

    def timed(stage: str, pretrain_id: str | None, draw: int | None) -> StageRun:
        cfg = compose([*stage_overrides(stage, group, pretrain_id, draw), *overrides])
        start = time.perf_counter()
        result = run(cfg)
        return StageRun(stage, draw, result, time.perf_counter() - start)

    pretrain = timed("pretrain", None, None)
    runs = [pretrain]
    for draw in range(draws):
        runs += [timed(stage, pretrain.result.run_id, draw) for stage in ("finetune", "scratch")]
    return runs


def gains(runs: Sequence[StageRun]) -> list[float]:
    """Fine-tuned minus scratch test accuracy, per draw."""
    by_draw = {(r.stage, r.draw): r.accuracy for r in runs}
    draws = sorted({r.draw for r in runs if r.draw is not None})
    return [by_draw["finetune", d] - by_draw["scratch", d] for d in draws]


def report(runs: Sequence[StageRun]) -> None:
    from pipeline.tracking.store import ui_command

    table = Table(title="transfer_digits: test set of each run, last checkpoint")
    for column in ("stage", "draw", "test/acc", "wall (s)", "MLflow run"):
        table.add_column(column, justify="left" if column in ("stage", "MLflow run") else "right")
    for r in runs:
        table.add_row(r.stage, "" if r.draw is None else str(r.draw), f"{r.accuracy:.4f}", f"{r.seconds:.1f}",
                      r.result.run_id)  # fmt: skip
    console = Console(soft_wrap=True)
    console.print(table)
    for stage in ("finetune", "scratch"):
        accuracies = [r.accuracy for r in runs if r.stage == stage]
        console.print(f"{stage} on digits 5–9: mean test/acc {statistics.mean(accuracies):.4f} over {len(accuracies)}")
    per_draw = gains(runs)
    console.print(
        f"fine-tuned − scratch on digits 5–9: {statistics.mean(per_draw) * 100:+.1f} points of test accuracy "
        f"(mean of {len(per_draw)} draws; each: {', '.join(f'{g * 100:+.1f}' for g in per_draw)})"
    )
    console.print(f"See the runs: {ui_command(runs[0].result.tracking_uri)}")


def parse(argv: Sequence[str]) -> tuple[int, list[str]]:
    """--draws N (or --draws=N) and the Hydra overrides."""
    draws, overrides, rest = DEFAULT_DRAWS, [], list(argv)
    while rest:
        argument = rest.pop(0)
        if argument == "--draws" or argument.startswith("--draws="):
            value = argument.partition("=")[2] or (rest.pop(0) if rest else "")
            if not value.isdigit() or int(value) < 1:
                raise UserInputError(f"--draws {value!r}: must be an integer >= 1 (e.g. --draws 3)")
            draws = int(value)
        else:
            overrides.append(argument)
    return draws, overrides


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    try:
        draws, overrides = parse(sys.argv[1:])
        outcome = main(overrides, draws)
    except (UserInputError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    report(outcome)

"""python -m pipeline.transfer_digits [overrides]: transfer learning, proven offline, in one command.

Three runs of run(cfg), each composed from its preset in conf/experiment/ plus the overrides given (they apply to
every stage, e.g. trainer.max_epochs=2 for a quick check):
  pretrain   transfer_digits_pretrain: ResNet-18 from scratch on digits 0–4
  finetune   transfer_digits_finetune: from the pretrain run's checkpoint (model.weights=runs:/<id>), digits 5–9,
             a few labelled images per class
  scratch    transfer_digits_scratch: the same few images and schedule, from random weights
then a table of their test accuracy and wall time. All three land in one MLflow experiment, tagged
transfer_stage=<stage> and transfer_group=<this invocation>, so the dashboard compares them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime

from rich.console import Console
from rich.table import Table

from pipeline.errors import TrainingDiverged, UserInputError

STAGES = ("pretrain", "finetune", "scratch")


def stage_overrides(stage: str, group: str, pretrain_run_id: str | None) -> list[str]:
    """What makes one stage of this invocation: its preset, its output folder, its tags, its weights."""
    overrides = [
        f"experiment=transfer_digits_{stage}",
        f"paths.output_dir=${{paths.root}}/outputs/transfer_digits/{group}/{stage}",
        f"++logger.tags.transfer_group={group}",
    ]
    if stage == "finetune":
        overrides.append(f"model.weights=runs:/{pretrain_run_id}")
    return overrides


def main(overrides: Sequence[str] = ()) -> dict[str, object]:
    """Run the three stages in order; returns each stage's RunResult and wall seconds."""
    from pipeline.config import compose
    from pipeline.run import run

    group = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, object] = {}
    for stage in STAGES:
        pretrain_id = results["pretrain"][0].run_id if "pretrain" in results else None
        cfg = compose([*stage_overrides(stage, group, pretrain_id), *overrides])
        start = time.perf_counter()
        results[stage] = (run(cfg), time.perf_counter() - start)
    return results


def report(results: dict[str, object]) -> None:
    from pipeline import tracking

    table = Table(title="transfer_digits: test set of each stage, best checkpoint")
    for column in ("stage", "test/acc", "wall (s)", "MLflow run"):
        table.add_column(column, justify="left" if column in ("stage", "MLflow run") else "right")
    for stage, (result, seconds) in results.items():
        table.add_row(stage, f"{result.metrics['test/acc']:.4f}", f"{seconds:.1f}", result.run_id)
    console = Console(soft_wrap=True)
    console.print(table)
    gain = results["finetune"][0].metrics["test/acc"] - results["scratch"][0].metrics["test/acc"]
    console.print(f"fine-tuned − scratch on digits 5–9: {gain * 100:+.1f} points of test accuracy")
    console.print(f"See the runs: {tracking.ui_command(results['pretrain'][0].tracking_uri)}")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    try:
        outcome = main(sys.argv[1:])
    except (UserInputError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    report(outcome)

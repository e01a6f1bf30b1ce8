"""python -m pipeline.compare experiment=<name> | runs=[id1,id2,…]: training runs side by side.

One row per run — run id and name, key params, final metrics, FLOPs and parameter counts, epochs, duration, and
every param whose value is not the same in all of them — printed and written as `comparison.csv`, with
`learning_curves.png` (metric histories per epoch, one line per run) and `accuracy_vs_flops.png`. All of it is
written to the output folder and logged as a new MLflow run tagged kind=comparison (and compared_runs).

Exit status: 0 compared and logged; 2 an error the message explains (unknown experiment or run, no runs).
"""

from __future__ import annotations

import csv
import fnmatch
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.cli import adopt_output_folder, hydra_command, user_errors
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError

KIND = "comparison"
NOT_TRAININGS = ("evaluation", "comparison")  # kinds of runs an experiment holds besides trainings


@dataclass(frozen=True)
class Comparison:
    rows: list[dict[str, Any]]
    differing: list[str]  # params whose values are not all equal
    files: dict[str, Path]  # table, learning curves, accuracy against FLOPs
    run_id: str  # the comparison's own MLflow run
    tracking_uri: str


def select_runs(client: Any, cfg: DictConfig) -> list[Any]:
    """The runs named by runs=[…], or the training runs of experiment=<name>."""
    from pipeline.tracking.checkpoints import get_run
    from pipeline.tracking.provenance import KIND_TAG

    if cfg.runs:
        ids = [str(run_id) for run_id in cfg.runs]
        return [get_run(client, run_id, "runs=[…]") for run_id in dict.fromkeys(ids)]
    if not cfg.experiment_name:
        raise UserInputError("Say what to compare: experiment=<name> (its training runs) or 'runs=[<id1>,<id2>]'.")
    experiment = client.get_experiment_by_name(str(cfg.experiment_name))
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserInputError(
            f"experiment={cfg.experiment_name}: no such experiment in {client.tracking_uri} (it has: "
            f"{', '.join(names)}). Give one of those, or point logger.tracking_uri at the store that holds it."
        )
    status = f"attributes.status = '{cfg.status}'" if cfg.status else ""
    found = client.search_runs(
        [experiment.experiment_id], filter_string=status, max_results=int(cfg.max_runs), order_by=["start_time DESC"]
    )
    runs = [
        run
        for run in found
        if run.data.tags.get(KIND_TAG) not in NOT_TRAININGS and run.data.tags.get("sweep.role") != "parent"
    ]
    if not runs:
        which = f" with status {cfg.status}" if cfg.status else ""
        raise UserInputError(
            f"experiment={cfg.experiment_name} has no training runs{which} to compare. Train some first, or set "
            "status=null to include unfinished ones."
        )
    return list(reversed(runs))  # oldest first


def differing_params(runs: Sequence[Any], ignore: Sequence[str]) -> list[str]:
    """Param keys whose values are not the same in every run (a missing param counts as a value)."""
    keys = sorted({key for run in runs for key in run.data.params})
    return [
        key
        for key in keys
        if not any(fnmatch.fnmatch(key, pattern) for pattern in ignore)
        and len({run.data.params.get(key) for run in runs}) > 1
    ]


def table(runs: Sequence[Any], cfg: DictConfig, histories: Mapping[str, Mapping[str, list[float]]]) -> list[dict]:
    key_params = [str(key) for key in cfg.params]
    differing = [key for key in differing_params(runs, cfg.ignore_params) if key not in key_params]
    rows = []
    for run in runs:
        info, data = run.info, run.data
        duration = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
        epochs = max((len(points) for points in histories[info.run_id].values()), default=0)
        rows.append(
            {
                "run_id": info.run_id,
                "run_name": info.run_name,
                "status": info.status,
                **{key: data.params.get(key, "") for key in key_params},
                **{metric: data.metrics.get(metric) for metric in cfg.metrics},
                "epochs": epochs,
                "duration_s": round(duration, 1) if duration is not None else None,
                **{key: data.params.get(key, "") for key in differing},
            }
        )
    return rows


def metric_histories(client: Any, runs: Sequence[Any], metrics: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Each run's values of each metric in step order: one per epoch for the per-epoch metrics."""

    def values(run_id: str, metric: str) -> list[float]:
        points = sorted(client.get_metric_history(run_id, metric), key=lambda p: (p.step, p.timestamp))
        return [point.value for point in points]

    return {run.info.run_id: {metric: values(run.info.run_id, metric) for metric in metrics} for run in runs}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves_png(
    runs: Sequence[Any], histories: Mapping[str, Mapping[str, list[float]]], metrics: Sequence[str], path: Path
) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for run in runs:
            values = histories[run.info.run_id][metric]
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=run.info.run_name)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Learning curves of {len(runs)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_flops_png(rows: Sequence[Mapping[str, Any]], accuracy: str, path: Path) -> Path:
    """Each run a point at its cost and accuracy. The run names stand in one column right of the plot, in the order
    of their points' accuracy, at least a line apart, each joined to its point: runs of equal cost (the same model)
    or equal accuracy never print their names over each other."""
    plt = _pyplot()
    points = sorted(
        (row for row in rows if row.get("model/flops") and row.get(accuracy) is not None),
        key=lambda row: -float(row[accuracy]),
    )
    height = max(5.0, 0.17 * len(points) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    fig.subplots_adjust(left=0.08, right=0.64, top=0.92, bottom=0.1)
    if points:
        xs = [float(row["model/flops"]) for row in points]
        ys = [float(row[accuracy]) for row in points]
        colours = {cost: plt.cm.tab10(index % 10) for index, cost in enumerate(sorted(set(xs)))}
        ax.scatter(xs, ys, c=[colours[x] for x in xs], zorder=3)
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
        low, high = min(ys), max(ys)
        margin = (high - low) * 0.08 or 0.01
        ax.set_ylim(low - margin, high + margin)
        line = 0.14 / (height * 0.82)  # one 7-point line, as a fraction of the axes' height
        wanted = [(y - (low - margin)) / (high - low + 2 * margin) for y in ys]
        for row, x, y, at in zip(points, xs, ys, stacked(wanted, line), strict=True):
            ax.annotate(
                row["run_name"],
                (x, y),
                xytext=(1.03, at),
                textcoords="axes fraction",
                fontsize=7,
                va="center",
                arrowprops={"arrowstyle": "-", "color": colours[x], "linewidth": 0.6, "alpha": 0.7, "shrinkB": 3},
            )
    else:
        ax.text(0.5, 0.5, f"no run has both model/flops and {accuracy}", ha="center", transform=ax.transAxes)
    ax.set(xlabel="FLOPs per image (log scale)", ylabel=accuracy, title=f"{accuracy} against cost")
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stacked(wanted: Sequence[float], gap: float) -> list[float]:
    """Heights (fractions of the axes, highest first) moved as little as needed to stand at least `gap` apart and
    not below 0: where the names of runs with close accuracies go."""
    placed: list[float] = []
    for want in wanted:  # top down, each at least a gap below the one above
        placed.append(min(want, placed[-1] - gap) if placed else want)
    for index in range(len(placed) - 1, -1, -1):  # then bottom up, none below the axes
        placed[index] = max(placed[index], gap * (len(placed) - 1 - index))
    return placed


def write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return path


def compare(cfg: DictConfig) -> Comparison:
    from mlflow.entities import Param

    from pipeline.tracking import store
    from pipeline.tracking.provenance import KIND_TAG, run_tags
    from pipeline.tracking.status import recorded_status

    uri = str(cfg.logger.tracking_uri)
    store.prepare(uri, cfg.logger.http)
    client = store.existing_store_client(uri, "logger.tracking_uri", UserInputError)
    runs = select_runs(client, cfg)
    histories = metric_histories(client, runs, [str(metric) for metric in cfg.curves])
    rows = table(runs, cfg, histories)
    differing = differing_params(runs, cfg.ignore_params)

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "": write_table(rows, output_dir / "comparison.csv"),
        "figures": learning_curves_png(runs, histories, list(cfg.curves), output_dir / "learning_curves.png"),
    }
    flops = accuracy_flops_png(rows, str(cfg.accuracy), output_dir / "accuracy_vs_flops.png")

    if cfg.logger.experiment_name:
        artifacts = store.artifact_location(uri, cfg.logger.artifact_root)
        experiment_id = store.ensure_experiment(client, str(cfg.logger.experiment_name), artifacts)
    else:
        experiment_id = runs[0].info.experiment_id
    ids = [run.info.run_id for run in runs]
    what = {
        KIND_TAG: KIND,
        "compared_runs": ",".join(ids)[:5000],
        "differing_params": ",".join(differing)[:5000],
    }
    tags = run_tags(output_dir, what)  # MLflow's context tags (user, source, git) and the command, as every run's
    name = cfg.logger.run_name or f"compare-{len(runs)}-runs-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=str(name), tags=tags)
    run_id = run.info.run_id
    with recorded_status(lambda status: client.set_terminated(run_id, status)):
        params = {"runs": len(runs), "experiment": cfg.experiment_name or "", "curves": ",".join(cfg.curves)}
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
        for folder, path in files.items():
            client.log_artifact(run_id, str(path), folder or None)
        client.log_artifact(run_id, str(flops), "figures")
    return Comparison(rows, differing, {**files, "accuracy": flops}, run_id, uri)


NAME_WIDTH = 44  # the run name's column: wider names fold onto a second line


def terminal_columns(result: Comparison, width: int) -> tuple[list[str], list[str]]:
    """The columns a terminal `width` characters wide shows: the key ones (run, name, key params, metrics, epochs,
    duration), then as many differing params as fit; and the differing params it leaves to the CSV."""
    differing = [key for key in result.differing if key in result.rows[0]]
    columns = [key for key in result.rows[0] if key not in differing and key != "status"]

    def needs(column: str) -> int:  # a column's width: its widest cell or header part, and its borders
        if column == "run_name":
            return NAME_WIDTH + 3
        cells = [len(_cell(row[column])[:8] if column == "run_id" else _cell(row[column])) for row in result.rows]
        parts = column.replace("/", "/.").split(".")
        return max([6, *cells, *(len(part) + 1 for part in parts)]) + 3

    used = sum(needs(column) for column in columns)
    shown = []
    for key in differing:
        if used + needs(key) > width:
            break
        shown.append(key)
        used += needs(key)
    return columns + shown, differing[len(shown) :]


def show(result: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.tracking.store import ui_command

    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets the whole table
    columns, left_out = terminal_columns(result, console.width)
    table_ = Table(title=f"{len(result.rows)} runs (full run ids and every differing param in the CSV)")
    for column in columns:
        if column == "run_name":
            table_.add_column(column, overflow="fold", min_width=20, max_width=NAME_WIDTH)
        else:  # headers fold at "." and "/" rather than squeezing the values
            table_.add_column(column.replace(".", ".\n").replace("/", "/\n"), overflow="fold", min_width=6)
    for row in result.rows:
        table_.add_row(*[row[column][:8] if column == "run_id" else _cell(row[column]) for column in columns])
    console.print(table_)
    console.print(f"Params that differ between the runs: {', '.join(result.differing) or 'none'}")
    if left_out:
        console.print(f"Not in the table above ({len(left_out)}, see comparison.csv): {', '.join(left_out)}")
    for path in result.files.values():
        console.print(f"Wrote {path}")
    console.print(f"Comparison run: {result.run_id}")
    console.print(f"See the runs: {ui_command(result.tracking_uri)}")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


@hydra.main(config_path=str(CONF_DIR), config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    adopt_output_folder(cfg)
    with user_errors():
        result = compare(cfg)
    show(result)


def experiment_as_value(argv: Sequence[str]) -> list[str]:
    """`experiment=<name>` means the experiment's name here; Hydra would read it as the train presets' group
    (conf/experiment/), so it is passed on as experiment_name=<name>."""
    return [f"experiment_name={arg.split('=', 1)[1]}" if arg.startswith("experiment=") else arg for arg in argv]


if __name__ == "__main__":
    sys.argv = experiment_as_value(sys.argv)
    hydra_command(main)

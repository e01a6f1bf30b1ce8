"""Comparing two real runs: a table with the params that differ, two real figures, a comparison run in MLflow;
evaluation and comparison runs are never compared as trainings; mistakes are exit status 2 with the fix."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import mlflow
import pytest

from pipeline.compare import compare
from pipeline.config import compose
from pipeline.errors import UserInputError
from pipeline.run import run
from tests.conftest import REPO, clean_env, compose_in, store_uri
from tests.helpers.commands import run_module

pytestmark = pytest.mark.e2e

QUICK = ("trainer.max_epochs=2", "trainer.limit_train_batches=4", "scheduler.warmup_epochs=0")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        first = run(compose_in(root, [*QUICK, "optim.lr=0.1", f"paths.output_dir={root}/outputs/first"]))
        second = run(
            compose_in(
                root, [*QUICK, "optim.lr=0.02", "loss.label_smoothing=0.1", f"paths.output_dir={root}/outputs/2nd"]
            )
        )
    return root, [first.run_id, second.run_id]


def test_compare_two_runs_writes_the_table_figures_and_a_comparison_run(two_runs: tuple[Path, list[str]]) -> None:
    root, ids = two_runs
    done = run_module(
        "pipeline.compare", [f"paths.root={root}", f"runs=[{ids[0]},{ids[1]}]"], cwd=REPO, env=clean_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    differing = re.search(r"Params that differ between the runs: (.*)", done.stdout).group(1)
    assert {"optim.lr", "loss.label_smoothing"} <= set(differing.split(", "))
    assert not any(key.startswith("paths.") for key in differing.split(", ")), "paths always differ: ignored"

    client = mlflow.MlflowClient(store_uri(root))
    run_id = re.search(r"Comparison run: ([0-9a-f]{32})", done.stdout).group(1)
    comparison = client.get_run(run_id)
    assert comparison.data.tags["kind"] == "comparison" and comparison.info.status == "FINISHED"
    assert comparison.data.tags["compared_runs"] == ",".join(ids)
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=store_uri(root)))
    with (artifacts / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run_id"] for row in rows] == ids
    assert [row["optim.lr"] for row in rows] == ["0.1", "0.02"]
    assert [row["loss.label_smoothing"] for row in rows] == ["0.0", "0.1"], "a differing param has its own column"
    for row in rows:
        assert row["model.name"] == "lenet5" and row["epochs"] == "2"
        assert 0 < float(row["test/acc"]) <= 1 and float(row["model/flops"]) > 0 and float(row["duration_s"]) > 0
        assert row["model/params"] == "61706.0"
    for figure in ("learning_curves.png", "accuracy_vs_flops.png"):
        assert (artifacts / "figures" / figure).read_bytes()[:8] == PNG_MAGIC


def test_an_experiment_compares_only_its_trainings(two_runs: tuple[Path, list[str]], root: Path) -> None:
    train_root, ids = two_runs
    overrides = [f"paths.root={root}", f"paths.output_dir={root}/out", f"logger.tracking_uri={store_uri(train_root)}"]
    first = compare(compose([*overrides, "experiment_name=digits"], config_name="compare"))
    again = compare(compose([*overrides, "experiment_name=digits"], config_name="compare"))
    assert [row["run_id"] for row in first.rows] == [row["run_id"] for row in again.rows]
    assert {row["run_id"] for row in again.rows} == set(ids), "the first comparison is not compared"

    with pytest.raises(UserInputError, match=r"runs=\[…\]: no run 'feed'"):
        compare(compose([*overrides, "runs=[feed]"], config_name="compare"))
    with pytest.raises(UserInputError, match=r"Say what to compare"):
        compare(compose(overrides, config_name="compare"))
    done = run_module("pipeline.compare", [*overrides, "experiment=nonesuch"], cwd=REPO, env=clean_env(), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: experiment=nonesuch: no such experiment" in done.stderr and "digits" in done.stderr


def test_names_of_runs_with_equal_accuracy_stand_a_line_apart_in_accuracy_vs_flops() -> None:
    from itertools import pairwise

    from pipeline.compare import stacked

    wanted = [0.9, 0.9, 0.9, 0.5, 0.02, 0.01, 0.0]  # three runs of equal accuracy, three at the bottom
    placed = stacked(wanted, 0.05)
    assert all(upper - lower >= 0.05 - 1e-9 for upper, lower in pairwise(placed))
    assert min(placed) >= 0 and placed[0] == 0.9 and placed[3] == 0.5, "moved only as far as needed"


def test_the_terminal_table_of_many_runs_keeps_its_key_columns_and_leaves_the_rest_to_the_csv() -> None:
    from pipeline.compare import Comparison, terminal_columns

    differing = [f"model.kwargs.option_{index}" for index in range(30)]
    rows = [
        {"run_id": "f" * 32, "run_name": f"lenet5-digits-affine lr=0.{index} #00{index:02d}", "status": "FINISHED",
         "model.name": "lenet5", "optim.lr": f"0.{index}", "test/acc": 0.9, "epochs": 5, "duration_s": 1.0,
         **dict.fromkeys(differing, "value")}
        for index in range(12)
    ]  # fmt: skip
    shown, left_out = terminal_columns(Comparison(rows, differing, {}, "", ""), width=160)
    assert shown[:7] == ["run_id", "run_name", "model.name", "optim.lr", "test/acc", "epochs", "duration_s"]
    assert 0 < len(shown) - 7 < len(differing) and shown[7:] + left_out == differing, "the first that fit"

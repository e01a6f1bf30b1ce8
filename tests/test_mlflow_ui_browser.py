"""MLflow's UI itself, in headless Chromium, over a real `mlflow server` and runs the pipeline trained: after the
switch to "Model training" the runs table lists the names the pipeline gave, and Compare's "Show diff only" lists the
param that differs and hides those that do not. The walk is the one `make screenshots` takes (docs/screenshots.py),
so a UI change that breaks the screenshots fails here first."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest

from docs.screenshots import (
    CHROMIUM,
    browser_page,
    compare_selected,
    open_training_runs,
    row_ids,
    run_names,
    select_runs,
    show_diff_only,
    store_uri,
)
from tests.conftest import QUIET, REPO, clean_env
from tests.helpers.commands import run_module
from tests.helpers.mlflow_server import mlflow_server
from tests.test_mlflow_ui import TINY

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: `make test` installs Debian's chromium"),
]


def test_runs_table_after_the_mode_switch_shows_the_pipelines_run_names_and_compare_shows_only_what_differs(
    root: Path,
) -> None:
    arguments = ["-m", f"paths.root={root}", *QUIET, *TINY, "optim.lr=0.1,0.03"]
    done = run_module("pipeline.train", arguments, cwd=REPO, env=clean_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = mlflow.MlflowClient(store_uri(root))
    trained = {run.info.run_name for run in client.search_runs([client.get_experiment_by_name("digits").experiment_id])}
    assert len(trained) == 2
    # e.g. `lenet5-digits-affine epochs=2 warmup=0 lr=0.1 +3 #9a2f`: model, data, augmentation, overrides, a tag
    assert all(re.fullmatch(r"lenet5-digits-affine( \S+)+ #[0-9a-f]{4}", name) for name in trained), trained
    assert sorted(part for name in trained for part in name.split() if part.startswith("lr=")) == ["lr=0.03", "lr=0.1"]

    with mlflow_server(store_uri(root), root / "server-artifacts") as url, browser_page() as page:
        open_training_runs(page, url)  # a fresh browser opens in "GenAI", which lists no training runs
        assert sorted(run_names(page)) == sorted(trained)
        select_runs(page, row_ids(page))
        compare_selected(page)
        differing = show_diff_only(page)
    assert "optim.lr" in differing, differing
    assert "aug.name" not in differing and "model.name" not in differing, differing

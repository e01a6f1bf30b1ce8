"""What MLflow's UI shows of our runs, read through the REST API it reads them with (a real `mlflow server` on
PostgreSQL): run names that say what differs, epochs as the step of the curves, only what was trained differently
as params ("Show diff only"), MLflow's context tags on every kind of run, and a command that trains the run again."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.config import compose
from pipeline.tracking.naming import flatten
from tests.conftest import REPO, Served, clean_env, run_cli
from tests.helpers.commands import run_module

pytestmark = pytest.mark.e2e

TINY = (
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "scheduler.warmup_epochs=0",
    "logger.system_metrics.enabled=false",
)
CONTEXT_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit", "command")


def api(server: Served, endpoint: str, **query: Any) -> dict[str, Any]:
    """One call of MLflow's REST API, as the UI makes it."""
    response = requests.post(f"{server.url}/api/2.0/mlflow/{endpoint}", json=query, timeout=30)
    response.raise_for_status()
    return response.json()


def get(server: Served, endpoint: str, **query: Any) -> dict[str, Any]:
    response = requests.get(f"{server.url}/api/2.0/mlflow/{endpoint}", params=query, timeout=30)
    response.raise_for_status()
    return response.json()


def runs_of(server: Served, experiment: str) -> list[dict[str, Any]]:
    experiments = api(server, "experiments/search", max_results=1000)["experiments"]
    (found,) = [e for e in experiments if e["name"] == experiment]
    return api(server, "runs/search", experiment_ids=[found["experiment_id"]], max_results=1000).get("runs", [])


def as_dicts(run: dict[str, Any]) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    data = run["data"]
    return (
        {p["key"]: p["value"] for p in data.get("params", [])},
        {t["key"]: t["value"] for t in data.get("tags", [])},
        {m["key"]: m["value"] for m in data.get("metrics", [])},
    )


def history(server: Served, run_id: str, key: str) -> list[tuple[int, float]]:
    points = get(server, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(point.get("step", 0)), point["value"]) for point in points)


def git_head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def assert_context_tags(tags: dict[str, str], entry: str, kind: str) -> None:
    missing = [key for key in CONTEXT_TAGS if not tags.get(key)]
    assert not missing, f"{kind}: no {missing}"
    assert tags["mlflow.source.name"].endswith(entry), f"{kind}: source {tags['mlflow.source.name']}"
    assert tags["mlflow.source.git.commit"] == git_head(), kind
    assert tags["command"].startswith(f"python -m {entry.removesuffix('.py').replace('/', '.')}"), tags["command"]


def test_runs_compare_at_a_glance_in_the_mlflow_ui(root: Path, tracking_server: Served) -> None:
    env = clean_env(MLFLOW_TRACKING_URI=tracking_server.url)
    experiment = f"ui-{root.name}"
    trainings = {
        "default": (),
        "changed": ("optim.lr=0.1", "data.batch_size=32"),  # another batch size: another number of batches an epoch
    }
    for overrides in trainings.values():
        done = run_cli("pipeline.train", *TINY, f"logger.experiment_name={experiment}", *overrides, root=root, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = {name: run for run in runs_of(tracking_server, experiment) for name in trainings if _is(run, name)}
    assert set(runs) == set(trainings), [run["info"]["run_name"] for run in runs_of(tracking_server, experiment)]

    # Names: what trained, what differs from the defaults (the max_epochs and limits typed here too), a suffix.
    names = {name: run["info"]["run_name"] for name, run in runs.items()}
    assert re.fullmatch(r"lenet5-digits-affine epochs=2 \S.* #[0-9a-f]{4}", names["default"]), names
    assert names["changed"].startswith("lenet5-digits-affine epochs=2 warmup=0 lr=0.1 bs=32 "), names
    assert len(names["changed"]) <= 80, "short enough for the run table"

    # Params: only the two changed keys differ ("Show diff only"); where a run wrote is a tag.
    (params_a, tags_a, metrics_a), (params_b, tags_b, _) = as_dicts(runs["default"]), as_dicts(runs["changed"])
    differing = {key for key in params_a.keys() | params_b.keys() if params_a.get(key) != params_b.get(key)}
    assert differing == {"optim.lr", "data.batch_size"}, differing
    assert not [key for key in params_a if key.startswith(("paths.", "logger."))]
    assert tags_a["paths.output_dir"] == tags_a["output_dir"] != tags_b["paths.output_dir"]

    # Steps: the epoch, whatever the batch size; `epoch` is not logged again as a metric; a test is one bar (step 0).
    for run in runs.values():
        run_id = run["info"]["run_id"]
        for key in ("train/loss", "val/acc", "lr-SGD"):
            assert [step for step, _ in history(tracking_server, run_id, key)] == [0, 1], key
        assert [step for step, _ in history(tracking_server, run_id, "test/acc")] == [0]
    assert "epoch" not in metrics_a and "data/skipped_files" not in metrics_a and tags_a["data.skipped_files"] == "0"

    # MLflow's context tags, and a command that composes the very config the run logged.
    for name, run in runs.items():
        params, tags, _ = as_dicts(run)
        assert_context_tags(tags, "pipeline/train.py", name)
        assert_reproduces(tags["command"], params, "pipeline.train")

    # An evaluation and a comparison are runs of the same experiment, with the same context.
    source = runs["changed"]["info"]["run_id"]
    for module, overrides in (
        ("pipeline.evaluate", [f"source={source}"]),
        ("pipeline.compare", [f"experiment={experiment}"]),
    ):
        arguments = [f"paths.root={root}", *overrides]  # compare has no progress=
        done = run_module(module, arguments, cwd=REPO, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    kinds = {as_dicts(run)[1].get("kind"): run for run in runs_of(tracking_server, experiment)}
    for kind, entry in (("evaluation", "pipeline/evaluate.py"), ("comparison", "pipeline/compare.py")):
        tags = as_dicts(kinds[kind])[1]
        assert_context_tags(tags, entry, kind)


def _is(run: dict[str, Any], name: str) -> bool:
    params, tags, _ = as_dicts(run)
    if "kind" in tags:
        return False
    return (params.get("optim.lr") == "0.1") == (name == "changed")


def assert_reproduces(command: str, params: dict[str, str], module: str) -> None:
    """`command` composes a config whose every key equals the run's param of that name."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", module], command
    composed = {key: str(value) for key, value in flatten(_resolved(words[3:])).items()}
    wrong = {key: (value, composed[key]) for key, value in params.items() if key in composed and composed[key] != value}
    assert not wrong, f"{command} composes another config: {wrong}"
    assert len(set(params) & set(composed)) > 50, "the params are the config's keys"


def _resolved(overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(overrides), resolve=True)  # type: ignore[return-value]

"""Settings that cannot work across a cluster's hosts are refused before a sweep starts anything, naming the fix.
(The checks on a running cluster — the storage every node must see — are in tests/test_sweep_nodes.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.errors import UserInputError
from pipeline.sweep.cluster import store_problem
from pipeline.sweep.driver import asha_stops_early, check_resources, trials_too_short_for_asha
from pipeline.tracking.store import only_this_host
from tests.conftest import run_cli

HERE, OTHER = "10.77.0.1", "10.77.0.2"  # addresses only named, never contacted


@pytest.mark.parametrize(
    ("uri", "reachable_elsewhere"),
    [
        ("sqlite:////srv/mlflow.db", False),
        ("file:///srv/mlruns", False),
        ("/srv/mlruns", False),
        ("http://127.0.0.1:5000", False),
        ("http://localhost:5000", False),
        ("postgresql://mlflow@127.0.0.1/mlflow", False),
        ("postgresql://mlflow@/mlflow?host=/var/run/postgresql", False),
        (f"http://{HERE}:5000", True),
        ("https://mlflow.example.org", True),
        (f"postgresql+psycopg2://mlflow@{HERE}:5432/mlflow", True),
    ],
)
def test_a_store_only_this_host_reaches_is_told_apart(uri: str, reachable_elsewhere: bool) -> None:
    assert (only_this_host(uri) is None) == reachable_elsewhere


def test_a_store_on_this_host_is_refused_only_when_trials_run_on_another() -> None:
    assert store_problem("sqlite:////srv/mlflow.db", HERE, {HERE}) is None, "several nodes of one machine share it"
    problem = store_problem("sqlite:////srv/mlflow.db", HERE, {HERE, OTHER})
    assert problem is not None and OTHER in problem and f"logger.tracking_uri=http://{HERE}:5000" in problem
    assert store_problem(f"http://{HERE}:5000", HERE, {HERE, OTHER}) is None


@pytest.mark.e2e
def test_a_relative_data_root_on_a_cluster_is_refused_before_ray_is_reached(root: Path) -> None:
    done = run_cli("pipeline.sweep", f"ray.address={HERE}:6379", "data=imagefolder", "data.root=images", root=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "data.root=images is a relative path" in done.stderr and "Give an absolute path" in done.stderr
    assert not (root / "sweeps").exists(), "nothing of a sweep was written"


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"workers_per_trial": "two"}, "sweep.resources.workers_per_trial='two': must be an integer >= 1"),
        ({"workers_per_trial": 0}, "sweep.resources.workers_per_trial=0: must be an integer >= 1"),
        ({"cpu": 0}, "sweep.resources.cpu=0: must be a number > 0"),
        ({"gpu": -1}, "sweep.resources.gpu=-1: must be a number >= 0"),
    ],
)
def test_resources_that_cannot_work_are_named(resources: dict[str, object], message: str) -> None:
    cfg = OmegaConf.create({"sweep": {"resources": {"cpu": 1, "gpu": 0, "workers_per_trial": 1, **resources}}})
    with pytest.raises(UserInputError, match=re.escape(message)):
        check_resources(cfg)
    check_resources(OmegaConf.create({"sweep": {"resources": {"cpu": 0.5, "gpu": 0.25, "workers_per_trial": 2}}}))


@pytest.mark.e2e
@pytest.mark.fresh_store
@pytest.mark.parametrize(
    ("overrides", "messages"),
    [
        (["sweep.resources.workers_per_trial=two"], ["error: sweep.resources.workers_per_trial='two': must be an"]),
        (  # each of these failed inside Ray or Tune, after Ray had started and the sweep's run was opened
            ["sweep.num_samples=0", "sweep.mode=maximum", "sweep.grace_period=0", "sweep.max_concurrent_trials=0"],
            [
                "error: Invalid configuration:\n",
                "  sweep.num_samples=0: must be an integer >= 1 (e.g. sweep.num_samples=8)\n",
                "  sweep.mode='maximum': must be one of max, min (e.g. sweep.mode=max)\n",
                "  sweep.grace_period=0: must be an integer >= 1 (epochs)",
                "  sweep.max_concurrent_trials=0: must be an integer >= 1 or null",
            ],
        ),
        (["sweep.storage_path=/proc/sweeps"], ["error: sweep.storage_path=/proc/sweeps: cannot write there ("]),
    ],
)
def test_settings_that_cannot_work_are_refused_before_ray_is_reached(
    root: Path, overrides: list[str], messages: list[str]
) -> None:
    done = run_cli("pipeline.sweep", *overrides, root=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert all(message in done.stderr for message in messages), done.stderr[-3000:]
    assert "Ray" not in done.stdout + done.stderr and not (root / "sweeps").exists(), "nothing of a sweep started"
    assert not (root / "mlruns").exists(), "no run opened"


def test_a_sweep_no_longer_than_ashas_grace_period_runs_every_trial_to_its_test_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A smoke sweep (trainer.max_epochs=1) with the default scheduler: Ray refuses a grace period longer than the
    trials, and ASHA at one as long could stop a trial only at its end, untested. tests/test_sweep_nodes.py runs one."""
    for epochs in (1, 2):
        trials_too_short_for_asha({"scheduler": "asha", "grace_period": 2}, max_epochs=epochs)
        assert capsys.readouterr().err == (
            f"warning: sweep.grace_period=2 is not shorter than trainer.max_epochs={epochs}: ASHA could stop a trial "
            "only at its end, so every trial runs to its end and its test (as with sweep.scheduler=fifo)\n"
        )
        assert not asha_stops_early({"scheduler": "asha", "grace_period": 2}, max_epochs=epochs)
    assert asha_stops_early({"scheduler": "asha", "grace_period": 2}, max_epochs=3)
    for settings, epochs in (
        ({"scheduler": "asha", "grace_period": 2}, 3),
        ({"scheduler": "fifo", "grace_period": 2}, 1),
    ):
        trials_too_short_for_asha(settings, max_epochs=epochs)
        assert capsys.readouterr().err == "", "nothing to say"


def test_a_sweep_saved_before_its_own_result_loggers_resumes_with_tunes_defaults(tmp_path: Path) -> None:
    """Its saved Tune callbacks have no CSV or JSON logger: Tune must add its defaults when it resumes, or the trials'
    results stop being written (a trial's metrics_dataframe reads them). A new sweep has its own."""
    import json

    from pipeline.config import compose
    from pipeline.sweep.state import STATE_FILE, SweepState, new_state

    saved = {
        "name": "s", "folder": str(tmp_path), "base_overrides": [], "params": {}, "settings": {},
        "tracking_uri": "sqlite:///x.db", "experiment_name": "digits", "artifact_root": "a", "parent_run_id": "p",
    }  # fmt: skip
    (tmp_path / STATE_FILE).write_text(json.dumps(saved))
    assert SweepState.load(tmp_path).own_result_loggers is False
    cfg = compose([f"paths.root={tmp_path}"], config_name="sweep")
    assert new_state(cfg, []).own_result_loggers is True


def test_a_local_sweeps_relative_data_root_reaches_its_trials_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune runs each trial in its own working folder: the driver's folder is where a relative data.root starts."""
    from pipeline.config import compose
    from pipeline.sweep.state import new_state

    monkeypatch.chdir(tmp_path)
    typed = ["data=imagefolder", "data.root=images"]
    cfg = compose([f"paths.root={tmp_path}", *typed], config_name="sweep")
    base = new_state(cfg, typed).base_overrides
    assert f"data.root={tmp_path / 'images'}" in base and "data.root=images" not in base

"""Shared helpers: every test writes its runs, outputs and MLflow store into its own temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pipeline.tracking.store import make_store_folder, sqlite_path
from tests.helpers.commands import not_forkable, run_module
from tests.helpers.mlflow_server import Served, mlflow_server
from tests.helpers.postgres import Database, Unavailable, fresh_database

REPO = Path(__file__).resolve().parent.parent
QUIET = ("progress=none", "trainer.enable_model_summary=false")


def store_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlruns/mlflow.db"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user would have: no tracking URI unless a test sets one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def environment_left_as_found() -> Iterator[None]:
    """A test leaves the environment as it found it, as far as the commands are concerned: a variable it left set
    (monkeypatch.delenv of a variable that is not there undoes nothing, for one) would reach every later command of its
    test worker and send each to a new interpreter, seconds of CPU apiece that show nowhere else."""
    before = dict(os.environ)
    yield
    changed = {name for name in before.keys() | os.environ.keys() if before.get(name) != os.environ.get(name)}
    left = not_forkable(changed)
    assert not left, f"the test left {sorted(left)} changed in the environment: set them with monkeypatch"


def run_cli(
    module: str, *overrides: str, root: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <overrides>` as a user types it, writing under `root` (in a process forked with the
    pipeline imported: tests/helpers/commands.py)."""
    return run_module(
        module, [f"paths.root={root}", *QUIET, *overrides], cwd=REPO, env=env or clean_env(), timeout=timeout
    )


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new MLflow sqlite store, made as a first run makes it. A new store runs MLflow's schema migrations, about
    2 s of CPU: paid here once per test session, then copied (milliseconds) into each test's project folder."""
    import mlflow

    uri = store_uri(tmp_path_factory.mktemp("store-template"))
    make_store_folder(uri)
    mlflow.MlflowClient(uri).search_experiments()  # creates and migrates the database
    return sqlite_path(uri)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A project folder for the test's runs, its MLflow store already created (empty) unless the test is marked
    `fresh_store`; MLflow variables of the caller do not leak in."""
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    if request.node.get_closest_marker("fresh_store") is None:
        make_store_folder(store_uri(tmp_path))
        shutil.copyfile(request.getfixturevalue("empty_store"), sqlite_path(store_uri(tmp_path)))
    return tmp_path


def compose_in(root: Path, overrides: Sequence[str] = (), config_name: str = "train") -> object:
    from pipeline.config import compose

    return compose(
        [f"paths.root={root}", f"paths.output_dir={root}/outputs/run", *QUIET, *overrides], config_name=config_name
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Database]:
    """A fresh PostgreSQL database for this test session, dropped at its end."""
    try:
        with fresh_database() as database:
            yield database
    except Unavailable as error:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not available: {error}")


@pytest.fixture(scope="session")
def tracking_server(postgres: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The production set-up, shared by the session: `mlflow server` on PostgreSQL with proxied artifacts."""
    artifacts = tmp_path_factory.mktemp("server") / "artifacts"
    with mlflow_server(postgres.tcp_uri, artifacts) as url:
        yield Served(url, artifacts)


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """Ray's session folder: short (its socket paths must stay under 108 characters) and private."""
    from tests.helpers.sweeps import ray_folder

    with ray_folder() as folder:
        yield folder

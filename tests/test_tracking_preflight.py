"""A tracking store that cannot take runs is a clear error before any work: it names the URI, what failed and the
fix, with no traceback. How the client retries is a config knob that MLflow's own variables override."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.config import ConfigError, validate
from pipeline.tracking import store
from tests.conftest import compose_in, run_cli
from tests.helpers.isolation import isolated
from tests.helpers.mlflow_server import free_port
from tests.helpers.postgres import Database

HTTP_VARIABLES = list(store.HTTP_VARIABLES.values())


@contextmanager
def fake_server(api_status: int, body: object) -> Iterator[str]:
    """An HTTP server whose /health is fine and whose API answers `api_status` with `body`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, payload = (200, "OK") if self.path == "/health" else (api_status, body)
            text = payload if isinstance(payload, str) else json.dumps(payload)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def check_fails(uri: str) -> str:
    with pytest.raises(store.TrackingError) as caught:
        store.check_store(uri)
    return str(caught.value)


def test_nothing_listening_is_connection_refused_with_the_fix(no_credentials: None) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    message = check_fails(uri)
    assert uri in message and "cannot connect (connection refused)" in message
    assert "Start the server" in message and "MLFLOW_TRACKING_URI" in message


def test_a_server_that_never_answers_times_out(no_credentials: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHECK_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        message = check_fails(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert "no answer within 0.5 s" in message


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, "Unauthorized", ["asks for credentials (HTTP 401)", "MLFLOW_TRACKING_USERNAME", "PASSWORD"]),
        (403, {"error_code": "PERMISSION_DENIED"}, ["may not read experiments (HTTP 403)"]),
        (
            403,
            "Invalid Host header - possible DNS rebinding attack detected",
            ["does not accept the host name '127.0.0.1:", "--allowed-hosts"],
        ),
        (
            500,
            {"error_code": "INTERNAL_ERROR", "message": "(psycopg2.OperationalError) connection to server failed"},
            ["HTTP 500 (psycopg2.OperationalError) connection to server failed", "database"],
        ),
        (404, "<html>Not Found</html>", ["HTTP 404 <html>Not Found</html>", "the server's base URL"]),
    ],
    ids=["auth", "forbidden", "host not allowed", "database down", "not mlflow"],
)
def test_a_server_that_refuses_or_fails_names_the_cause(
    no_credentials: None, status: int, body: object, expected: list[str]
) -> None:
    with fake_server(status, body) as uri:
        message = check_fails(uri)
        assert uri in message
        for part in expected:
            assert part in message


@pytest.mark.e2e
def test_rejected_credentials_name_the_user_and_never_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-horse")
    with fake_server(401, "Unauthorized") as uri:
        message = check_fails(uri)
    assert "rejected the credentials of user 'alice' (HTTP 401)" in message and "wrong-horse" not in message


def test_a_password_in_the_uri_is_refused_before_it_is_logged() -> None:
    message = check_fails("http://alice:hunter2@127.0.0.1:5000")
    assert "contains a password" in message and "MLFLOW_TRACKING_PASSWORD" in message and "hunter2" not in message


def test_a_local_store_in_a_folder_that_cannot_exist_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/file/mlruns/mlflow.db"
    message = check_fails(uri)
    assert uri in message and "cannot create" in message and "paths.mlflow_dir=" in message


def test_a_database_uri_whose_driver_is_not_installed_names_the_one_to_use() -> None:
    uri = "postgresql://nobody@127.0.0.1:5432/nope"  # SQLAlchemy 2.1 reads it as psycopg 3, which is not installed
    message = check_fails(uri)
    assert f"MLflow store {uri} (logger.tracking_uri)" in message
    assert "driver psycopg, which is not installed" in message
    assert "logger.tracking_uri=postgresql+psycopg2://nobody@127.0.0.1:5432/nope" in message
    message = check_fails("mysql://nobody@127.0.0.1:3306/nope")
    assert "driver mysqldb, which is not installed" in message and "PyMySQL or mysqlclient" in message


@pytest.mark.e2e
def test_a_database_that_refuses_the_connection_is_named_with_the_reason(postgres: Database) -> None:
    missing = f"postgresql+psycopg2://{postgres.user}@127.0.0.1:5432/{postgres.name}_missing"
    message = check_fails(missing)
    assert f"MLflow store {missing} (logger.tracking_uri): cannot connect to the database" in message
    assert f'database "{postgres.name}_missing" does not exist' in message and "createdb" in message
    assert 'role "nobody" does not exist' in check_fails("postgresql+psycopg2://nobody@127.0.0.1:5432/postgres")
    store.check_store(postgres.tcp_uri)  # the database that exists passes


def test_a_database_server_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHECK_TIMEOUT_S", 2)  # libpq's shortest connect_timeout
    with socket.socket() as silent:  # accepts the connection and never answers the startup message
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        message = check_fails(f"postgresql+psycopg2://nobody@127.0.0.1:{silent.getsockname()[1]}/nope")
    assert "cannot connect to the database" in message and "timeout expired" in message


def test_a_local_store_where_nothing_can_be_written_is_an_error() -> None:
    message = check_fails("sqlite:////proc/x.db")  # /proc is a folder even root cannot create files in
    assert "MLflow store sqlite:////proc/x.db (logger.tracking_uri): cannot write in /proc" in message
    assert "paths.mlflow_dir=" in message


def test_a_local_store_that_is_not_a_database_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_text("notes, not a database\n" * 50)
    message = check_fails(f"sqlite:///{tmp_path}/mlflow.db")
    assert f"{tmp_path}/mlflow.db is not an SQLite database (file is not a database)" in message


def test_a_database_uri_with_a_password_in_its_query_is_refused() -> None:
    message = check_fails("postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow?password=hunter2")
    assert "contains a password" in message and "hunter2" not in message


def test_retry_settings_are_config_knobs_that_mlflow_variables_override(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in HTTP_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # restored after the test: prepare() exports them
    cfg = compose_in(root, ["logger.http.max_retries=3"])
    store.prepare(str(cfg.logger.tracking_uri), cfg.logger.http)
    assert [os.environ[name] for name in HTTP_VARIABLES] == ["3", "2", "30"]

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    assert compose_in(root).logger.http.timeout == 7
    with pytest.raises(ConfigError, match=r"logger.http.max_retries=11: must be an integer in 0..10"):
        validate(compose_in(root, ["logger.http.max_retries=11"]))


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["no driver", "no database", "no folder"])
def test_training_against_a_store_that_cannot_open_stops_before_the_data_load(
    root: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "no database":
        postgres: Database = request.getfixturevalue("postgres")
        uri, what = f"postgresql+psycopg2://{postgres.user}@127.0.0.1:5432/{postgres.name}_missing", "cannot connect"
    else:
        uri, what = {
            "no driver": (
                "postgresql://nobody@127.0.0.1:5432/nope",
                "SQLAlchemy reads postgresql:// with the driver psycopg",
            ),
            "no folder": ("sqlite:////proc/x.db", "cannot write in /proc"),
        }[kind]
    # A data root that does not exist: had the data loaded first, its error would have come instead.
    done = run_cli(
        "pipeline.train", f"logger.tracking_uri={uri}", "data=imagefolder", f"data.root={root}/none", root=root
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: MLflow store {uri} (logger.tracking_uri): {what}" in done.stderr
    assert "Traceback" not in done.stderr and "data.root" not in done.stderr
    assert not list(root.glob("outputs/*/*/checkpoints")) and not list(root.glob("outputs/*/*/mlflow"))


@pytest.mark.e2e
def test_training_against_a_server_that_is_down_stops_before_any_work(root: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    done = run_cli("pipeline.train", f"logger.tracking_uri={uri}", root=root)
    assert done.returncode == 2
    assert f"error: MLflow tracking server {uri} (logger.tracking_uri): cannot connect (connection refused)" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not list(root.glob("outputs/*/*/checkpoints")) and not list(root.glob("outputs/*/*/mlflow"))


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (Ray's isolation) need root")
def test_a_sweep_against_a_server_that_is_down_stops_before_ray_starts(root: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # closed in the sweep's namespace too: nothing listens there
    command = [sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", f"logger.tracking_uri={uri}"]
    process = isolated(command, root / "sweep.log")
    assert process.wait(timeout=120) == 2
    output = (root / "sweep.log").read_text()
    assert f"MLflow tracking server {uri} (logger.tracking_uri): cannot connect (connection refused)" in output
    assert "Traceback" not in output and "Ray" not in output

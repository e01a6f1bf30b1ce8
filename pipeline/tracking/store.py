"""Where runs go: the tracking store (a local sqlite file, a database, or a server), checked before any work starts.

A server that is down, refuses the credentials or has lost its database, a database driver that is not installed
or a database that refuses the connection is a clear error naming the URI, not a traceback after training (MLflow
itself retries a database for about two minutes). This module is the one place that reads a `sqlite:///` URI.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import UserInputError

if TYPE_CHECKING:
    from mlflow import MlflowClient

SERVER_SCHEMES = ("http://", "https://", "databricks")
SQLITE_PREFIX = "sqlite:///"
HTTP_VARIABLES = {  # logger.http → MLflow's own variables, read by its client at every request
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}
CHECK_TIMEOUT_S = 10  # the check before a run: a server that does not answer in this time is reported
DATABASE_DIALECTS = ("postgresql", "mysql", "mssql", "sqlite")  # the stores MLflow keeps through SQLAlchemy
# The drivers SQLAlchemy can use for each database, best first: (its name after `+` in a URI, the module it imports,
# the package that installs it). SQLAlchemy picks one when the URI names none: psycopg 3 for postgresql://.
DRIVERS = {
    "postgresql": (("psycopg2", "psycopg2", "psycopg2-binary"), ("psycopg", "psycopg", "psycopg[binary]")),
    "mysql": (("pymysql", "pymysql", "PyMySQL"), ("mysqldb", "MySQLdb", "mysqlclient")),
    "mssql": (("pyodbc", "pyodbc", "pyodbc"), ("pymssql", "pymssql", "pymssql")),
}
# Each driver's own name for "give up connecting after this many seconds"; without it a host that drops packets
# holds the check for minutes.
CONNECT_TIMEOUTS = {
    "psycopg2": "connect_timeout",
    "psycopg": "connect_timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
    "pyodbc": "timeout",
    "pymssql": "login_timeout",
}


class TrackingError(UserInputError):
    """The tracking store cannot take runs: the message names the URI, what failed, and the fix."""


def is_server(uri: str) -> bool:
    return uri.startswith(SERVER_SCHEMES)


def database_dialect(uri: str) -> str | None:
    """postgresql, mysql, mssql or sqlite for a database store (with or without `+driver`); None otherwise."""
    dialect = urlsplit(uri).scheme.split("+")[0]
    return dialect if dialect in DATABASE_DIALECTS else None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local store; None for any other URI."""
    return Path(uri[len(SQLITE_PREFIX) :]) if uri.startswith(SQLITE_PREFIX) else None


LOOPBACK_HOSTS = ("localhost", "127.", "::1", "[::1]")


def only_this_host(uri: str) -> str | None:
    """Why only processes of this host can reach the store at `uri` (a file on its disk, a database or server on its
    loopback or unix socket), or None when other hosts can too."""
    if sqlite_path(uri) is not None or urlsplit(uri).scheme in ("", "file"):
        return "a store on this host's disk"
    if is_server(uri) or database_dialect(uri) is not None:
        host = urlsplit(uri).hostname or ""
        if not host:
            return "a database reached through this host's unix socket"
        if host.startswith(LOOPBACK_HOSTS):
            return f"{'a server' if is_server(uri) else 'a database'} on this host's loopback ({host})"
    return None


def artifact_location(uri: str, local: str | Path) -> str | None:
    """Where a new experiment keeps its artifacts: `local` on a local store; the server's choice on a server."""
    return None if is_server(uri) else str(local)


def prepare(uri: str, http: Mapping[str, Any]) -> None:
    """Set how MLflow's client retries (logger.http), then check the store now, before any work, and end the runs
    left RUNNING there by processes of this host that were killed (tracking.processes)."""
    from pipeline.tracking.processes import close_stale

    for key, variable in HTTP_VARIABLES.items():
        os.environ[variable] = str(http[key])
    check_store(uri)
    close_stale(uri)


def check_store(uri: str) -> None:
    """Raise TrackingError unless runs can be logged to `uri`: a server answers its API, a database's driver is
    installed and the database takes a connection, a local store's folder is writable. Credentials belong in the
    environment, never in the URI (it is logged with the config)."""
    parts = urlsplit(uri)
    if parts.password or "password" in parse_qs(parts.query):
        raise TrackingError(
            "logger.tracking_uri contains a password: it would be logged and printed with the config. Remove it "
            "from the URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
            "(for a database URI: PGPASSWORD or ~/.pgpass)."
        )
    dialect = database_dialect(uri)
    if dialect is not None:
        _check_driver(uri, dialect)
    database = sqlite_path(uri)
    if database is not None:
        _check_folder(uri, database)
    elif dialect is not None:
        _check_database(uri)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"))


def _store_error(uri: str, what: str, fix: str) -> TrackingError:
    return TrackingError(f"MLflow store {uri} (logger.tracking_uri): {what}. {fix}.")


def _check_driver(uri: str, dialect: str) -> None:
    """The database driver the URI names (or SQLAlchemy's default for it) can be imported."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    scheme = urlsplit(uri).scheme
    installed = [(name, package) for name, module, package in DRIVERS.get(dialect, ()) if find_spec(module)]
    rest = uri[len(scheme) :]
    if installed:
        fix = f"Name an installed driver in the URI: logger.tracking_uri={dialect}+{installed[0][0]}{rest}"
    else:
        packages = " or ".join(package for _, _, package in DRIVERS.get(dialect, ()))
        fix = f"Install a driver ({packages or 'see SQLAlchemy dialects'}) and name it in the URI ({dialect}+<driver>)"
    try:
        loader = make_url(uri).get_dialect()
    except NoSuchModuleError:
        raise _store_error(uri, f"SQLAlchemy has no database driver named by {scheme}://", fix) from None
    except ArgumentError as error:
        raise _store_error(uri, f"not a database URI SQLAlchemy can read ({error})", "Correct it") from None
    try:
        loader.import_dbapi()
    except ImportError as error:
        raise _store_error(
            uri, f"SQLAlchemy reads {scheme}:// with the driver {loader.driver}, which is not installed ({error})", fix
        ) from None


def _check_database(uri: str) -> None:
    """One connection to a database server, given up after CHECK_TIMEOUT_S."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    timeout = CONNECT_TIMEOUTS.get(make_url(uri).get_dialect().driver)
    engine = create_engine(uri, poolclass=NullPool, connect_args={timeout: CHECK_TIMEOUT_S} if timeout else {})
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())[:300]
        raise _store_error(uri, f"cannot connect to the database ({reason})", _database_fix(reason)) from None
    finally:
        engine.dispose()


def _database_fix(reason: str) -> str:
    if "does not exist" in reason or "Unknown database" in reason:
        return (
            "Create it on the database server (for PostgreSQL: createdb, CREATE ROLE), or correct the user and "
            "database in logger.tracking_uri"
        )
    if "password" in reason:
        return "Give the password in the environment (PGPASSWORD or ~/.pgpass for PostgreSQL), never in the URI"
    return (
        "Start the database server, or correct the host and port in logger.tracking_uri (or MLFLOW_TRACKING_URI); "
        f"a server that does not answer within {CHECK_TIMEOUT_S} s is reported as a timeout"
    )


def _check_folder(uri: str, database: Path) -> None:
    """Nothing is left here: a run that fails before it starts leaves no store behind (open_run creates it)."""
    fix = "Choose a writable place: paths.mlflow_dir=<folder> or logger.tracking_uri=sqlite:///<folder>/mlflow.db"
    existing = database if database.exists() else next(p for p in database.parents if p.exists())
    if existing == database:
        if not database.is_file():
            raise _store_error(uri, f"{database} is not a file", fix)
        _check_sqlite_file(uri, database, fix)
        existing = database.parent  # SQLite writes its journal beside the database
    elif not existing.is_dir():
        raise _store_error(uri, f"cannot create {database.parent}: {existing} is a file", fix)
    # os.access answers from permission bits alone: root "may" write to /proc or a read-only mount, and cannot.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise _store_error(uri, f"cannot write in {existing} ({error.strerror})", fix) from None


def _check_sqlite_file(uri: str, database: Path, fix: str) -> None:
    """An existing store must be an SQLite database (read only: a busy one is fine)."""
    try:
        with suppress(sqlite3.OperationalError):  # locked by a run writing to it: it is a database
            connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                connection.close()
    except sqlite3.DatabaseError as error:
        what = f"{database} is not an SQLite database ({error})"
        raise _store_error(uri, what, f"Move that file away, or point elsewhere. {fix}") from None


def make_store_folder(uri: str) -> None:
    """MLflow creates a sqlite database, not the folders it lies in."""
    database = sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def existing_store_client(uri: str, what: str, error: type[UserInputError] = TrackingError) -> MlflowClient:
    """An MlflowClient on a store that holds runs already. A local store that does not exist is an `error` about
    `what` (the key the user gave): MLflow would silently create an empty store and then find nothing in it."""
    from mlflow import MlflowClient

    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise error(
            f"{what}: there is no MLflow store at {uri}. Point logger.tracking_uri at the store that holds the runs "
            "(the training's `paths.root`/mlruns/mlflow.db, or a tracking server), or run from the training's folder."
        )
    return MlflowClient(uri)


def _reason(error: Exception) -> str:
    text = str(error)
    for needle, reason in (
        ("refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("No route to host", "no route to host"),
        ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"),
    ):
        if needle in text:
            return reason
    return text[:300]


def _check_server(uri: str) -> None:
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)  # MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, TLS settings: as MLflow reads them
    auth = (creds.username, creds.password) if creds.username and creds.password else None
    headers = {"Authorization": f"Bearer {creds.token}"} if creds.token and not auth else {}

    def fail(what: str, fix: str) -> TrackingError:
        return TrackingError(f"MLflow tracking server {uri} (logger.tracking_uri): {what}. {fix}.")

    unreachable = (
        "Start the server (mlflow server --backend-store-uri ... --host ... --port ...), or point "
        "logger.tracking_uri (or MLFLOW_TRACKING_URI) at a running one"
    )
    try:
        requests.get(f"{uri}/health", timeout=CHECK_TIMEOUT_S, verify=creds.verify)
        api = requests.get(
            f"{uri}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=auth,
            headers=headers,
            timeout=CHECK_TIMEOUT_S,
            verify=creds.verify,
        )
    except requests.exceptions.SSLError as error:
        fix = "Give the server's CA certificate with MLFLOW_TRACKING_SERVER_CERT_PATH"
        raise fail(f"TLS failed ({_reason(error)})", fix) from None
    except requests.exceptions.Timeout:
        raise fail(f"no answer within {CHECK_TIMEOUT_S} s", "Check the host and port, and the server's load") from None
    except requests.exceptions.RequestException as error:
        raise fail(f"cannot connect ({_reason(error)})", unreachable) from None
    if api.status_code == 401:
        who = f"rejected the credentials of user {creds.username!r}" if auth else "asks for credentials"
        fix = "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        raise fail(f"{who} (HTTP 401)", fix)
    if api.status_code == 403 and "Invalid Host header" in api.text:  # MLflow's guard against DNS rebinding
        host = urlsplit(uri).netloc
        fix = (
            f"Start the server with --allowed-hosts listing {host} (by default it allows only localhost and private "
            "IP addresses), or reach it by an address it allows"
        )
        raise fail(f"the server does not accept the host name {host!r} (HTTP 403: Invalid Host header)", fix)
    if api.status_code == 403:
        fix = "Ask the server's administrator for access, or use other credentials (MLFLOW_TRACKING_USERNAME)"
        raise fail(f"user {creds.username!r} may not read experiments (HTTP 403)", fix)
    try:
        answer = api.json()
    except ValueError:
        answer = None
    if api.status_code != 200 or not isinstance(answer, dict):
        detail = answer.get("message", "") if isinstance(answer, dict) else api.text[:200].strip()
        raise fail(
            f"its API answered HTTP {api.status_code} {detail}".rstrip(),
            "Is logger.tracking_uri the server's base URL? If it is, the server's log says why: often its "
            "database (--backend-store-uri) is unreachable",
        )


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if new: safe when several runs start at the same moment."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another run created it first


def ui_command(uri: str) -> str:
    """How to look at the runs of this store."""
    if is_server(uri):
        return f"open {uri} in a browser"
    mlflow = Path(sys.executable).with_name("mlflow")
    with suppress(ValueError):  # shown relative when it is under the current folder
        mlflow = mlflow.relative_to(Path.cwd())
    return f"{mlflow} ui --backend-store-uri {uri} --port 5000"

"""A fresh PostgreSQL database for a test session (the tracking server's production backend), dropped at the end.

PostgreSQL runs on 127.0.0.1:5432 here with trust authentication. The database is reachable two ways: over TCP
from this network namespace, and through the server's unix socket, a file, from any namespace (Ray's tests run
in a private one, where the host's 127.0.0.1 is not reachable).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2

HOST, PORT = "127.0.0.1", 5432
SOCKET_DIR = Path("/var/run/postgresql")
USERS = ("postgres", "root")
DRIVER = "postgresql+psycopg2"  # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which is not installed


class Unavailable(RuntimeError):
    """No PostgreSQL server could be reached, or started."""


@dataclass(frozen=True)
class Database:
    name: str
    user: str

    @property
    def tcp_uri(self) -> str:
        return f"{DRIVER}://{self.user}@{HOST}:{PORT}/{self.name}"

    @property
    def socket_uri(self) -> str:
        return f"{DRIVER}://{self.user}@/{self.name}?host={SOCKET_DIR}"


def _admin_connection() -> tuple[psycopg2.extensions.connection, str]:
    errors = []
    for user in USERS:
        try:
            connection = psycopg2.connect(host=HOST, port=PORT, user=user, dbname="postgres", connect_timeout=5)
        except psycopg2.OperationalError as error:
            errors.append(f"{user}: {str(error).strip()}")
            continue
        connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        return connection, user
    raise Unavailable("; ".join(errors))


def _start_postgres() -> None:
    """Start the machine's cluster, as its administrator would."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        raise Unavailable("PostgreSQL is not installed (/etc/postgresql is missing)")
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"]
    subprocess.run(command, capture_output=True, timeout=60, check=False)
    time.sleep(1)


@contextmanager
def fresh_database() -> Iterator[Database]:
    """Create a uniquely named database, yield it, drop it (closing whatever still holds it)."""
    try:
        connection, user = _admin_connection()
    except Unavailable:
        _start_postgres()
        connection, user = _admin_connection()
    name = f"test_mlflow_{os.getpid()}_{secrets.token_hex(3)}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Database(name, user)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()

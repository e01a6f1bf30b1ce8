"""A real `mlflow server` on a free loopback port, for tests; stopped by the PID it was started with.

`python -m tests.helpers.mlflow_server BACKEND ARTIFACTS -- COMMAND ...` serves BACKEND while COMMAND runs
with MLFLOW_TRACKING_URI pointing at the server: how a test starts a server inside a private network namespace.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Served:
    """A running server: its URL and the folder its proxied artifacts go to."""

    url: str
    artifacts: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(
    backend_store_uri: str, artifacts: Path, port: int | None = None, startup_timeout: float = 90
) -> tuple[str, subprocess.Popen[bytes]]:
    """Serve `backend_store_uri` with artifacts proxied to `artifacts`; returns the URL and the server process."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    with log.open("a") as output:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri", backend_store_uri,
                "--artifacts-destination", str(artifacts),
                "--host", "127.0.0.1",
                "--port", str(port),
                "--workers", "1",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            # GenAI job runners (several processes) are of no use to these tests
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,  # its worker processes share the group `stop` ends
        )  # fmt: skip
    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url, server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(server: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    """Stop the server and its workers (its process group), by the PID it was started with."""
    if server.poll() is None:
        os.killpg(server.pid, signum)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    with suppress(ProcessLookupError):  # workers the leader left behind
        os.killpg(server.pid, signal.SIGKILL)


def wait_until_closed(port: int, timeout: float = 20) -> None:
    """Until nothing listens on `port` any more (a server restarted on it must not meet the old one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} still open")


@contextmanager
def mlflow_server(
    backend_store_uri: str, artifacts: Path, port: int | None = None, startup_timeout: float = 90
) -> Iterator[str]:
    """Serve `backend_store_uri` with proxied artifacts under `artifacts`; yields the server's URL."""
    url, server = start(backend_store_uri, artifacts, port, startup_timeout)
    try:
        yield url
    finally:
        stop(server)


if __name__ == "__main__":
    backend, artifacts, separator, *command = sys.argv[1:]
    assert separator == "--" and command, __doc__
    with mlflow_server(backend, Path(artifacts)) as url:
        done = subprocess.run(command, env={**os.environ, "MLFLOW_TRACKING_URI": url})
    sys.exit(done.returncode)

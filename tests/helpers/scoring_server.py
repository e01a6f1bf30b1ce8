"""MLflow's real scoring server (`mlflow models serve`) on a free loopback port, for tests and benchmarks; stopped by
the PID it was started with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers.mlflow_server import free_port, stop


@contextmanager
def scoring_server(model_uri: str, tracking_uri: str, log: Path, startup_timeout: float = 180) -> Iterator[str]:
    """Serve `model_uri` (models:/…, runs:/…, a folder) from this environment (--env-manager local); yields its URL."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the server starts uvicorn by name: the venv's bin must be on PATH
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    command = [
        str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with served_by(command, env, port, log, startup_timeout) as url:
        yield url


@contextmanager
def served_by(
    command: list[str], env: dict[str, str], port: int, log: Path, startup_timeout: float = 180
) -> Iterator[str]:
    """Run `command`, a scoring server on 127.0.0.1:`port` (a command line a user was given, say, through `sh -c`),
    until it answers /ping; yields its URL, then stops it and what it started (its process group)."""
    with log.open("ab") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop(server)


def post(url: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
    """POST a JSON payload (or raw bytes) to the server's /invocations: (HTTP status, the decoded JSON answer)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")

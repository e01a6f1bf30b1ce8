"""A real S3 API server — moto's server mode — on a free loopback port, for tests; stopped by the PID it was started
with. Its state lives in memory: a bucket made in one test module is gone when the server stops."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.mlflow_server import free_port

CREDENTIALS = {  # moto accepts any; boto3 needs some to sign requests
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_env(endpoint: str) -> dict[str, str]:
    """What a user's shell would hold to reach the server: credentials and AWS_ENDPOINT_URL."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def s3_server(log: Path, startup_timeout: float = 60) -> Iterator[str]:
    """Serve the S3 API on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CREDENTIALS},
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            assert process.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"moto did not start:\n{log.read_text()}"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_keys()).create_bucket(Bucket=name)


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }

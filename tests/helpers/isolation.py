"""Run a command in its own network and PID namespaces: Ray (and gloo) only ever see loopback, and every
process the command starts — Ray's daemons included — dies with it, so a test stops all it started by the
one PID it holds."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import REPO, clean_env

ISOLATE = [
    "unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL",
    "sh", "-c", 'ip link set lo up && exec "$@"', "isolated",
]  # fmt: skip


def isolated(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` isolated, writing its output to `log`. Kill the returned process to stop everything."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [*ISOLATE, *argv], cwd=REPO, env=env or clean_env(), stdout=output, stderr=subprocess.STDOUT
        )


def run_isolated(argv: Sequence[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run `argv` isolated to completion; returns its output. Fails the test on a non-zero exit."""
    process = isolated(argv, log, env)
    try:
        code = wait_isolated(process, log, timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert code == 0, f"exit {code}:\n{output[-4000:]}"
    return output


def wait_isolated(process: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    """The exit status of an isolated command started with `isolated`; past `timeout`, a failure with its log's tail
    (a bare TimeoutExpired shows nothing of where it stuck)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = log.read_text(errors="replace")
        raise AssertionError(f"still running after {timeout:.0f} s:\n{output[-8000:]}") from None


def processes_beside(pid: int, *markers: bytes) -> list[int]:
    """This machine's PIDs of the processes in the network namespace of process `pid` (an isolated command: its
    processes and no other test's, for a test that kills one) whose command line holds one of `markers`."""
    try:
        network = os.readlink(f"/proc/{pid}/ns/net")
    except FileNotFoundError:  # the command has ended: none of its processes are left
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") != network:
                    continue
                command = (entry / "cmdline").read_bytes()
                if any(marker in command for marker in markers):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return found

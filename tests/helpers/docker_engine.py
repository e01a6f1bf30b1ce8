"""A Docker engine of the tests' own: Debian's `dockerd`, started for a test session and stopped by its PID.

It listens on its own unix socket only (never TCP), keeps its images in a data folder under a cache folder that
outlives the session (so images and their layers are built once per machine, not per run), and touches neither the
host's firewall nor its routing: `--iptables=false --ip-masq=false --ip-forward=false`, and no default bridge
(`--bridge=none`). Compose's networks still work: a user-defined bridge carries the containers' traffic between
them, its embedded DNS answers their service names (the rules it needs live in each container's own network
namespace), and a port published on 127.0.0.1 is forwarded by the engine's userland proxy. Containers reach each
other and this host's side of their bridge, nothing beyond (no forwarding, no NAT); `docker run` without a network
gets loopback only. Builds use the host's network (`--network=host`), to reach Debian's mirror and PyPI.

One engine at a time uses the data folder: a lock file serialises test sessions (CI runs on the same machines), and
an engine a killed session left behind — found by the PID file in the cache folder — is stopped first.

Needs root on Linux; what is missing of Debian's `docker.io`, `docker-compose` and `debootstrap` is installed with
apt (no service is started by the packages: a policy denies it).
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("PIPELINE_DOCKER_CACHE", "/var/cache/cnn-pipeline-docker"))  # kept between runs
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}


class Unavailable(RuntimeError):
    """No engine can run here; the message says why (a test skips with it)."""


def cannot_run() -> str | None:
    """Why this machine cannot run the engine, or None."""
    if not sys.platform.startswith("linux"):
        return f"Docker's engine needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "starting a Docker engine (and installing it) needs root"
    missing = [package for program, package in PACKAGES.items() if shutil.which(program) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install them (Debian's packages)"
    return None


def install_missing() -> None:
    """apt-get install what is missing of the engine, compose and debootstrap; no service is started."""
    missing = sorted({package for program, package in PACKAGES.items() if shutil.which(program) is None})
    if shutil.which("docker") is None:
        missing = sorted({*missing, "docker.io"})
    if not missing:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as policy:
        policy.write("#!/bin/sh\nexit 101\n")  # invoke-rc.d's "not allowed": the package starts no dockerd
    os.chmod(policy.name, 0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "POLICYRCD": policy.name}
    try:
        wait = ["-o", "DPkg::Lock::Timeout=900"]  # another test worker may be installing at this moment
        for command in (
            ["apt-get", *wait, "update", "-q"],
            ["apt-get", *wait, "install", "-y", "-q", "--no-install-recommends"],
        ):
            argv = command + (missing if "install" in command else [])
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise Unavailable(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    finally:
        os.unlink(policy.name)


@dataclass(frozen=True)
class Engine:
    socket: Path
    log: Path
    pid: int

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment with the client pointed at this engine (and nothing at another)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        return {**env, "DOCKER_HOST": self.host, **extra}

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["docker", *args], env=env or self.env(), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done


def _ours(pid: int, data_root: Path) -> bool:
    """Whether `pid` is a dockerd on this data folder (a PID file can outlive its process, and PIDs are reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(command[0].decode()).name == "dockerd" and f"--data-root={data_root}".encode() in command


def _stop(pid: int, grace: float = 60, child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM (dockerd stops its containers and its containerd), then SIGKILL after `grace` seconds. `child`: the
    process when this one started it (it must be waited for: a child that exited lingers until then)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if child is not None:
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    with path.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as busy:
                if time.monotonic() > deadline:
                    message = f"another test session holds {path} (its engine) for over {timeout:.0f} s"
                    raise Unavailable(message) from busy
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dockerd_command(data_root: Path, exec_root: Path, socket: Path, pidfile: Path) -> list[str]:
    return [
        "dockerd",
        f"--host=unix://{socket}",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={pidfile}",
        "--storage-driver=overlay2",
        "--iptables=false",  # the host's firewall is left alone
        "--ip-masq=false",
        "--ip-forward=false",  # nor its routing: containers talk to each other and to loopback-published ports
        "--bridge=none",  # no default bridge: `docker run` gets loopback only, compose its own network
        "--log-level=warn",
    ]


@contextmanager
def engine(cache: Path = CACHE, wait_for_lock: float = 1800) -> Iterator[Engine]:
    """Install what is missing, start dockerd on `cache`'s data folder, yield it, stop it by its PID."""
    reason = cannot_run()
    if reason:
        raise Unavailable(reason)
    install_missing()
    cache.mkdir(parents=True, exist_ok=True)
    data_root, pidfile = cache / "data-root", cache / "dockerd.pid"
    with _locked(cache / "lock", wait_for_lock):
        if pidfile.exists():  # a session killed before it could stop its engine
            leftover = int(pidfile.read_text().strip() or 0)
            if leftover and _ours(leftover, data_root):
                _stop(leftover)
        run = Path(tempfile.mkdtemp(prefix="cnnp-docker-", dir="/run" if os.path.isdir("/run") else None))
        socket, log = run / "docker.sock", cache / "dockerd.log"
        command = dockerd_command(data_root, run / "exec", socket, pidfile)
        with log.open("ab") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        started = Engine(socket, log, process.pid)
        try:
            _wait_until_up(started, process)
            yield started
        finally:
            _stop(process.pid, child=process)
            _unmount_under(run)  # the engine's network namespace handle, when it could not unmount it itself
            shutil.rmtree(run, ignore_errors=True)


def _unmount_under(folder: Path) -> None:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{folder}/")), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def _wait_until_up(started: Engine, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Unavailable(f"dockerd exited {process.returncode}: {_tail(started.log)}")
        if started.socket.exists() and started.docker("version", check=False, timeout=10).returncode == 0:
            return
        time.sleep(0.5)
    raise Unavailable(f"dockerd did not answer within {timeout:.0f} s: {_tail(started.log)}")


def _tail(log: Path, size: int = 2000) -> str:
    return log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"


@functools.cache  # asked once: every compose command of a test (health polls included) would ask again
def compose_command() -> Sequence[str]:
    """Compose as the README types it, `docker compose` (v2) where the plugin exists, else Debian's
    `docker-compose` 1.29 (the Python v1), which reads the same file."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return ["docker", "compose"] if plugin.returncode == 0 else ["docker-compose"]

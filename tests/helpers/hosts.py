"""Two hosts on one machine, for tests of what must work across hosts (a Ray cluster, a sweep, a tracking server).

Each host is a network namespace with its own address on a private test subnet (10.77.0.0/24; the two joined by a
veth pair) and its own loopback, a PID namespace (everything started there dies with it), a UTS namespace (its own
hostname) and a mount namespace with its own empty /tmp. The hosts share what a real cluster shares: one folder
standing for the shared storage, mounted at the same path on both (`SHARED`), and this machine's PostgreSQL through
its unix socket (the database of the team's tracking server). Everything is removed afterwards, even on failure.
Needs root on Linux.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.isolation import processes_beside

SUBNET = "10.77.0"  # the private test subnet: these two addresses and loopback are all the hosts use


@dataclass
class Host:
    name: str
    address: str
    holder: subprocess.Popen[bytes]  # `unshare`, whose child is the host's PID 1: killing it ends the host
    init_pid: int  # that PID 1, as this machine numbers it: what nsenter enters

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run on this host, in this process's working folder (the repository, which every host sees)."""
        entered = ["--net", "--pid", "--mount", "--uts", f"--wd={os.getcwd()}"]
        return ["nsenter", f"--target={self.init_pid}", *entered, "--", *argv]

    def run(
        self, argv: Sequence[str], env: dict[str, str], timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(argv), env=env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"on {self.name}: {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done

    def processes(self, *markers: bytes) -> list[int]:
        """This machine's PIDs of the processes on this host whose command line holds one of `markers` (for a test to
        kill, as a host's failure would)."""
        return processes_beside(self.init_pid, *markers)

    def start(self, argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as output:
            return subprocess.Popen(self.command(argv), env=env, stdout=output, stderr=subprocess.STDOUT)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _child_of(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"the host's init (a child of {pid}) did not start")


@contextmanager
def two_hosts(shared: Path) -> Iterator[tuple[Host, Host, Path]]:
    """Hosts A (10.77.0.1) and B (10.77.0.2); `shared` (a folder of this machine) is mounted on both at the path
    returned, which is where the shared storage is for them."""
    tag = uuid.uuid4().hex[:6]
    mount_point = Path(f"/run/pipeline-hosts-{tag}")  # outside /tmp, which each host replaces with its own
    shared.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        mount_point.mkdir()
        cleanup.callback(shutil.rmtree, mount_point, ignore_errors=True)
        # The code the hosts run (this checkout and its virtual environment) stays in sight when it lies under /tmp
        # (a clone there): held outside /tmp, then mounted back at its path in the host's own /tmp.
        code, held = Path(__file__).resolve().parents[2], Path(f"{mount_point}-code")
        keep_code = restore_code = ""
        if code.is_relative_to("/tmp"):
            held.mkdir()
            cleanup.callback(held.rmdir)  # empty here (the bind mounts are the hosts' own): never a tree to delete
            keep_code = f"mount --bind {code} {held} &&"
            restore_code = f"mkdir -p {code} && mount --bind {held} {code} &&"
        hosts = []
        names = [(f"hosta-{tag}", f"{SUBNET}.1", f"va{tag}"), (f"hostb-{tag}", f"{SUBNET}.2", f"vb{tag}")]
        for namespace, _, _ in names:
            _ip("netns", "add", namespace)
            cleanup.callback(subprocess.run, ["ip", "netns", "del", namespace], capture_output=True)
        _ip("link", "add", names[0][2], "type", "veth", "peer", "name", names[1][2])  # removed with its namespace
        for namespace, address, link in names:
            _ip("link", "set", link, "netns", namespace)
            for step in (
                ["addr", "add", f"{address}/24", "dev", link], ["link", "set", link, "up"], ["link", "set", "lo", "up"]
            ):  # fmt: skip
                _ip("-n", namespace, *step)
            hostname = namespace.split("-")[0].replace("host", "host-")
            script = (
                f"hostname {hostname} && mount --bind {shared} {mount_point} && {keep_code} mount -t tmpfs tmpfs /tmp "
                f"&& {restore_code} exec sleep infinity"
            )
            holder = subprocess.Popen(
                ["ip", "netns", "exec", namespace, "unshare", "--pid", "--fork", "--mount-proc", "--mount", "--uts",
                 "--kill-child=SIGKILL", "sh", "-c", script],
            )  # fmt: skip
            cleanup.callback(_end, holder)
            hosts.append(Host(hostname, address, holder, _child_of(holder.pid)))
        _wait_for_mounts(hosts, mount_point)
        yield hosts[0], hosts[1], mount_point


def _end(holder: subprocess.Popen[bytes]) -> None:
    if holder.poll() is None:
        holder.kill()  # --kill-child: the host's PID 1 gets SIGKILL, and with it every process of the host
        holder.wait()


def _wait_for_mounts(hosts: list[Host], mount_point: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    for host in hosts:
        while subprocess.run(host.command(["mountpoint", "-q", str(mount_point)])).returncode != 0:
            if time.monotonic() > deadline or host.holder.poll() is not None:
                raise RuntimeError(f"{host.name} did not come up")
            time.sleep(0.05)


def can_make_hosts() -> str | None:
    """Why two hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network, PID and mount namespaces need root"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mountpoint") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


MLFLOW_PORT = 5000  # each host has its own ports: nothing else listens there


def start_tracking_server(host: Host, database_uri: str, shared: Path, env: dict[str, str], log: Path) -> str:
    """`mlflow server` on `host` (the team's server: a database behind it, artifacts proxied to the shared storage),
    answering at the host's address; returns its URL once it answers from that host."""
    bin_folder = Path(sys.executable).parent
    url = f"http://{host.address}:{MLFLOW_PORT}"
    host.start(
        [str(bin_folder / "mlflow"), "server", "--backend-store-uri", database_uri, "--artifacts-destination",
         f"{shared}/artifacts", "--host", host.address, "--port", str(MLFLOW_PORT), "--workers", "1"],
        {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log,
    )  # fmt: skip
    wait_for_server(host, url, env)
    return url


def wait_for_server(host: Host, url: str, env: dict[str, str], timeout: float = 90) -> None:
    """Until the MLflow server at `url` answers a request made from `host`."""
    probe = f"import urllib.request; urllib.request.urlopen('{url}/health', timeout=2)"
    deadline = time.monotonic() + timeout
    while host.run([sys.executable, "-c", probe], env, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"the MLflow server on {host.name} did not answer at {url}")
        time.sleep(0.5)

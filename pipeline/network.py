"""The network interface a data-parallel process on CPUs talks to the other hosts through (gloo's GLOO_SOCKET_IFNAME).

torch's gloo backend binds, and tells the other ranks, the address its host's name resolves to. When the name does
not resolve, or resolves to a loopback address (Debian and Ubuntu write `127.0.1.1 <hostname>` into /etc/hosts), gloo
falls back to 127.0.0.1, which a rank on another host cannot reach: the process group never forms, or hangs. So,
unless the user has set GLOO_SOCKET_IFNAME, a process of a run spread over hosts sets it to the interface that carries
its route to the run's main address (torchrun's MASTER_ADDR; on a Ray cluster, the node's own address, the one Ray
reaches it by). Nothing is set when that address is a loopback one: on one host the default works.

Only the standard library and psutil, so that Ray's worker processes can run `use_ray_node_interface` as they start
without importing torch.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import psutil

GLOO_INTERFACE = "GLOO_SOCKET_IFNAME"


def interface_towards(address: str) -> str | None:
    """The name of this host's interface whose IPv4 address is the source of its route to `address`; None when
    `address` does not resolve, has no route, or is a loopback address."""
    try:
        resolved = socket.gethostbyname(address)
        if ipaddress.ip_address(resolved).is_loopback:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((resolved, 9))  # a UDP "connect" sends nothing: the kernel only picks the route and source
            source = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.family == socket.AF_INET and entry.address == source for entry in addresses):
            return name
    return None


def use_interface_towards(address: str | None) -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface towards `address` unless it is set already; the interface set, if
    any."""
    if not address or os.environ.get(GLOO_INTERFACE):
        return None
    name = interface_towards(address)
    if name is not None:
        os.environ[GLOO_INTERFACE] = name
    return name


def use_launcher_interface() -> str | None:
    """In a process started by a launcher of several hosts (torchrun, SLURM…): the interface towards MASTER_ADDR."""
    return use_interface_towards(os.environ.get("MASTER_ADDR"))


def use_ray_node_interface() -> None:
    """Ray's worker_process_setup_hook for a sweep on a cluster: runs as each worker process of the sweep starts,
    before Ray Train forms a trial's process group in it; the interface carrying the node's own address."""
    import ray

    use_interface_towards(ray.util.get_node_ip_address())

"""The interface gloo's process groups use across hosts: the one carrying the route to the run's main address."""

from __future__ import annotations

import os
import socket

import psutil
import pytest

from pipeline import network


def own_addresses() -> dict[str, str]:
    """This host's non-loopback IPv4 addresses → their interface."""
    return {
        entry.address: name
        for name, entries in psutil.net_if_addrs().items()
        for entry in entries
        if entry.family == socket.AF_INET and not entry.address.startswith("127.")
    }


def test_the_interface_is_the_one_carrying_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    addresses = own_addresses()
    if not addresses:
        pytest.skip("this host has no non-loopback IPv4 address")
    monkeypatch.setenv(network.GLOO_INTERFACE, "")  # noted as absent before, so what the function sets is undone
    monkeypatch.delenv(network.GLOO_INTERFACE)
    address, name = next(iter(addresses.items()))
    assert network.interface_towards(address) == name
    assert network.use_interface_towards(address) == name
    assert os.environ[network.GLOO_INTERFACE] == name


def test_nothing_is_set_for_one_host_or_over_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(network.GLOO_INTERFACE, "")  # noted as absent before, so what the function might set is undone
    monkeypatch.delenv(network.GLOO_INTERFACE)
    assert network.use_interface_towards("127.0.0.1") is None, "one host: gloo's default works"
    assert network.use_interface_towards("no-such-host.invalid") is None
    assert network.use_interface_towards(None) is None
    assert network.GLOO_INTERFACE not in os.environ
    monkeypatch.setenv(network.GLOO_INTERFACE, "eth7")
    addresses = own_addresses()
    assert network.use_interface_towards(next(iter(addresses), "10.0.0.1")) is None
    assert os.environ[network.GLOO_INTERFACE] == "eth7", "the user's choice is kept"

"""What a sweep on a cluster of several hosts needs, checked once Ray is up and before the sweep's run is opened or
any trial starts: every host can reach the tracking store, sees the sweep's storage folder, and reads the data from
the same absolute path. Each refusal names the setting and the fix (exit status 2)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import relative_data_root
from pipeline.errors import UserInputError
from pipeline.tracking.store import only_this_host

MARKER_PREFIX = ".cluster-check-"  # a file the driver writes into the storage folder for the other hosts to find


class ClusterError(UserInputError):
    """A setting that cannot work across the cluster's hosts."""


def check_data_root(cfg: DictConfig) -> None:
    """A relative data.root means a different folder in every trial process (Ray runs each in its own working
    folder, on any host): refused on a cluster before Ray is even reached."""
    if cfg.ray.address is not None and (resolved := relative_data_root(cfg)) is not None:
        raise ClusterError(
            f"data.root={OmegaConf.select(cfg, 'data.root')} is a relative path: each trial, on any host of the "
            f"cluster, would read it from its own working folder. Give an absolute path that every host sees, e.g. "
            f"data.root={resolved} on storage all hosts mount."
        )


def alive_nodes() -> list[dict[str, object]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def check_cluster(cfg: DictConfig, storage: Path) -> None:
    """On a cluster of more than one node: the tracking store must be reachable from every host, and `storage` (the
    sweep folder's parent) must be the same folder on every node. Nothing to check on a single node."""
    import ray

    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    addresses = {str(node["NodeManagerAddress"]) for node in nodes}
    problem = store_problem(str(cfg.logger.tracking_uri), ray.util.get_node_ip_address(), addresses)
    if problem is not None:
        raise ClusterError(problem)
    blind = nodes_not_seeing(storage, nodes)
    if blind:
        raise ClusterError(
            f"sweep.storage_path={storage} is not shared: node(s) {', '.join(blind)} do not see it (a file written "
            "there by the driver is not there). Trials' checkpoints and the sweep's state must be on storage every "
            "host mounts at the same path (NFS, a cluster file system): sweep.storage_path=<that folder>."
        )


def store_problem(uri: str, here: str, addresses: set[str]) -> str | None:
    """Why trials on the hosts at `addresses` other than `here` (the driver's) cannot reach the store at `uri`; None
    when they can, or when every node is on this host (several Ray nodes of one machine share its disk and
    loopback)."""
    elsewhere = sorted(addresses - {here})
    reason = only_this_host(uri)
    if not elsewhere or reason is None:
        return None
    return (
        f"logger.tracking_uri={uri} is {reason}, which trials on the cluster's other host(s) ({', '.join(elsewhere)}) "
        "cannot reach. Run an MLflow server every host can reach and give its address: "
        f"logger.tracking_uri=http://{here}:5000 (or set MLFLOW_TRACKING_URI)."
    )


def _exists(path: str) -> bool:
    return os.path.exists(path)


def nodes_not_seeing(storage: Path, nodes: list[dict[str, object]]) -> list[str]:
    """The `nodes` (address and id) on which a file written into `storage` here is not found."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    marker.write_text(str(os.getpid()))
    try:
        # Runs on the one node it names, asking for no CPU: trials may already fill every core.
        sees = ray.remote(num_cpus=0)(_exists)
        answers = {
            f"{node['NodeManagerAddress']} (node {str(node['NodeID'])[:8]})": sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=str(node["NodeID"]), soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        return [address for address, seen in zip(answers, ray.get(list(answers.values())), strict=True) if not seen]
    finally:
        marker.unlink(missing_ok=True)

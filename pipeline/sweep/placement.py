"""The resources of a trial spread over Ray Train workers, given back when the trial's process dies.

Ray Train's controller, an actor the trial's process starts, reserves the workers' CPUs and GPUs in a placement group.
Ray keeps a placement group until both the actor and the job that made it are gone: when the trial's process dies
(killed, out of memory, its node lost) the controller dies with it, but the sweep's job lives on, and so does the group.
Ray Train watches for this through Ray's State API, which comes only with the dashboard of `ray[default]`; without it
the group stays reserved until Ray stops, and the trial's retry, or the next trial, waits for resources forever. So
the sweep driver removes, every few seconds, the placement groups of its job whose making actor is dead.

Which actor made a placement group is in Ray's GCS table but not in `ray.util.placement_group_table()`: this module is
the one place that reads Ray's private table (tests/test_sweep_placement.py fails if an upgrade changes it).
"""

from __future__ import annotations

import time
from typing import Any

from ray import tune


def orphaned_placement_groups() -> list[Any]:
    """This job's placement groups, not yet removed, whose making actor is dead (those a driver makes have none)."""
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    nil_actor = ray.ActorID.nil().binary()
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(raw)
        made_by_an_actor = group.creator_actor_id not in (b"", nil_actor)
        if (
            group.creator_job_id.hex() == job
            and made_by_an_actor
            and group.creator_actor_dead
            and not group.is_detached
            and group.state != PlacementGroupTableData.REMOVED
        ):
            orphans.append(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
    return orphans


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups orphaned_placement_groups() finds; how many."""
    import ray.util

    orphans = orphaned_placement_groups()
    for group in orphans:
        ray.util.remove_placement_group(group)
    return len(orphans)


class ReleaseOrphanedWorkers(tune.Callback):
    """Sweep driver side: every few seconds of the sweep, the placement groups of trials whose process died are
    removed, so their retry or the next trial gets the resources. (Not only when Tune reports the failure: the
    controller dies a moment after the trial, as Ray notices its owner is gone.)"""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._failed = False

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if self._failed or now - self._last < self.every_s:
            return
        self._last = now
        try:
            released = release_orphaned_placement_groups()
        except Exception as error:  # a clean-up must never stop the sweep (through Ray Client there is no GCS table)
            self._failed = True
            warning = f"warning: cannot look for the resources of dead trials' workers from here ({error!r}); a trial"
            print(f"{warning} spread over workers whose process dies may wait for CPUs until Ray stops.", flush=True)
            return
        if released:
            print(f"Released the CPUs and GPUs Ray kept for {released} worker group(s) whose trial died.", flush=True)

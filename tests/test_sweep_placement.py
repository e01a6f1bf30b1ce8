"""The placement groups of trials whose process died are found and removed (pipeline.sweep.placement), on a real Ray
runtime in its own network namespace: only those whose making actor is dead, not the driver's own nor a living
actor's. It reads Ray's private placement-group table, so this fails if an upgrade of Ray changes it. (A whole sweep
whose trial is killed while its workers start: test_sweep_nodes.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.isolation import run_isolated
from tests.helpers.sweeps import ROOT_ONLY

SCRIPT = """
import sys, time
import ray
from ray.util.placement_group import placement_group, placement_group_table
from pipeline.sweep.placement import orphaned_placement_groups, release_orphaned_placement_groups

ray.init(num_cpus=4, include_dashboard=False, _temp_dir=sys.argv[1])
own = placement_group([{"CPU": 0.5}])  # the driver's own: no actor made it (as Tune's trials' groups)
ray.get(own.ready())

@ray.remote(num_cpus=0)
class Maker:  # as Ray Train's controller does for a trial's workers
    def make(self):
        group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
        ray.get(group.ready())
        return group

living, dying = Maker.remote(), Maker.remote()
kept, lost = ray.get(living.make.remote()), ray.get(dying.make.remote())
ray.kill(dying)
deadline = time.monotonic() + 30
while not orphaned_placement_groups() and time.monotonic() < deadline:
    time.sleep(0.2)
print("orphans:", [group.id == lost.id for group in orphaned_placement_groups()])
print("released:", release_orphaned_placement_groups())
print("states:", [placement_group_table(group)["state"] for group in (own, kept, lost)])
print("left:", orphaned_placement_groups())
print("fits again:", ray.get(placement_group([{"CPU": 1}, {"CPU": 1}]).ready(), timeout=30) is not None)
"""


PRIVATE_TABLE = """
from ray._private.state import GlobalState, state
from ray.core.generated.gcs_pb2 import PlacementGroupTableData

assert isinstance(state, GlobalState) and callable(GlobalState._connect_and_get_accessor)
fields = {field.name for field in PlacementGroupTableData.DESCRIPTOR.fields}
read = {"placement_group_id", "creator_job_id", "creator_actor_id", "creator_actor_dead", "is_detached", "state"}
assert read <= fields, f"Ray's placement-group table lost {read - fields}"
assert hasattr(PlacementGroupTableData, "REMOVED")
"""


def test_the_private_table_it_reads_is_still_there() -> None:
    """What pipeline.sweep.placement takes from Ray's internals, checked without a Ray runtime (in the fast loop; in
    a process of its own: importing Ray changes the environment of the process that imports it)."""
    done = subprocess.run([sys.executable, "-c", PRIVATE_TABLE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.e2e
@ROOT_ONLY
def test_only_the_groups_of_dead_actors_are_released(root: Path, ray_tmp: str) -> None:
    output = run_isolated([sys.executable, "-c", SCRIPT, ray_tmp], root / "ray.log", timeout=120)
    assert "orphans: [True]" in output, output[-3000:]
    assert "released: 1" in output
    assert "states: ['CREATED', 'CREATED', 'REMOVED']" in output
    assert "left: []" in output
    assert "fits again: True" in output

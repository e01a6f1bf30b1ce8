"""Whether the process a run recorded is alive, gone, or cannot be judged here: judged on real processes of this
machine; a PID the system gave to another process since is not taken for the run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tracking.processes import this_process, verdict

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="processes are looked up in /proc")


@pytest.mark.e2e
def test_a_live_process_is_alive_and_a_dead_one_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        recorded = {**this_process(), "pid": child.pid, "start": int(stat.rpartition(")")[2].split()[19])}
        assert verdict(recorded) == "alive"
    finally:
        child.kill()
        child.wait()
    assert verdict(recorded) == "gone"


def test_a_reused_pid_a_reboot_and_another_host_or_container() -> None:
    me = this_process()
    assert verdict(me) == "alive"
    assert verdict({**me, "start": me["start"] + 1}) == "gone", "the PID now belongs to another process"
    if me["machine"]:
        assert verdict({**me, "boot": "an earlier boot"}) == "gone", "the machine rebooted since"
    assert verdict({**me, "host": "elsewhere"}) == "unknown"
    assert verdict({**me, "pidns": "pid:[1]"}) == "unknown", "another container on this machine"
    assert verdict(None) == "unknown"

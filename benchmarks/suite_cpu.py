"""Where a command's CPU goes, by kind of process: run it (default: the test suite, `pytest -q`; or `-- make test`) and
sample every process on the machine twice a second; at the end, CPU seconds (user + system) per kind.

    .venv/bin/python benchmarks/suite_cpu.py [--top 30] [-- command ...]

Every process counts, not only the command's descendants: Ray's daemons, the Docker engine and containers, servers
in network namespaces. Run it on a machine otherwise idle. A process's CPU is read while it lives, so what a process
spends in its last half second (or a process shorter than that) is missed: the totals are a little low. Processes
are sorted into kinds by their command line (Ray renames its workers once they run a task; a worker is sorted by
what it was first seen as, within its first second and a half). Results go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
KINDS = [  # first match wins
    (r"ray::ImplicitFunc|train_trial|ray::IDLE|default_worker\.py|setup_worker\.py", "Ray worker processes (trials)"),
    (r"ray::", "Ray actors (Train controllers and workers, Ray's own)"),
    (r"gcs_server|raylet|dashboard|log_monitor|monitor\.py|runtime_env|ray start|ray status", "Ray's daemons and CLI"),
    (r"pipeline\.sweep", "sweep drivers"),
    (r"mlflow server|mlflow\.server|uvicorn|gunicorn|huey", "MLflow servers"),
    (r"dockerd|containerd|docker-untar|runc|docker-compose|/docker ", "Docker engine and CLI"),
    (r"pipeline\.|torchrun", "commands (new interpreters, forked or in namespaces)"),
    (r"multiprocessing|forkserver", "forked commands and loader workers"),
    (r"exec\(eval\(sys\.stdin|pytest", "the test workers (in-process tests)"),
    (r"postgres", "PostgreSQL"),
    (r"chrom", "Chromium"),
]


@dataclass
class Process:
    start: int  # clock ticks after boot: with the PID, tells a reused PID apart
    first_cpu: float
    cpu: float
    command: str
    looks: int = 0  # how many times its command line was read


def command_line(pid: str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def kind(command: str) -> str:
    for pattern, name in KINDS:
        if re.search(pattern, command):
            return name
    return "other"


def sample(seen: dict[int, Process], ended: list[Process], first: bool) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu, start = (int(fields[11]) + int(fields[12])) / TICK, int(fields[19])
            known = seen.get(int(pid))
            if known is not None and known.start == start:
                known.cpu = cpu
                if known.looks < 3:  # Ray's workers take their task's name a moment after they start
                    known.command = command_line(pid) or known.command
                    known.looks += 1
                continue
            if known is not None:
                ended.append(seen.pop(int(pid)))
            seen[int(pid)] = Process(start, cpu if first else 0.0, cpu, command_line(pid))
        except (OSError, IndexError, ValueError):
            continue  # ended while being read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=20, help="also list the processes that took the most CPU")
    parser.add_argument("command", nargs="*", help="default: .venv/bin/python -m pytest")
    args = parser.parse_args()
    command = args.command or [sys.executable, "-m", "pytest", "-q"]
    seen: dict[int, Process] = {}
    ended: list[Process] = []
    sample(seen, ended, first=True)
    started = time.perf_counter()
    running = subprocess.Popen(command, cwd=REPO)
    while running.poll() is None:
        time.sleep(0.5)
        sample(seen, ended, first=False)
    wall = time.perf_counter() - started
    spent: Counter[str] = Counter()
    count: Counter[str] = Counter()
    everything = [*seen.values(), *ended]
    for process in everything:
        spent[kind(process.command)] += process.cpu - process.first_cpu
        count[kind(process.command)] += 1
    total = sum(spent.values())
    print(f"\n`{' '.join(command)}`: exit {running.returncode}, {wall:.0f} s wall, {total:.0f} s of CPU "
          f"({total / wall:.2f} of {os.cpu_count()} cores busy on average)\n")  # fmt: skip
    print("| kind | processes | CPU (s) | share |\n|---|---:|---:|---:|")
    for name, seconds in spent.most_common():
        if seconds >= 0.5:
            print(f"| {name} | {count[name]} | {seconds:.0f} | {seconds / total:.0%} |")
    print("\n| CPU (s) | process |\n|---:|---|")
    for process in sorted(everything, key=lambda p: p.first_cpu - p.cpu)[: args.top]:
        print(f"| {process.cpu - process.first_cpu:.1f} | `{process.command[:110]}` |")
    sys.exit(running.returncode)


if __name__ == "__main__":
    main()

"""docker/: image sizes, build times (cold, warm, after a code change) and the compose stack's start-up to healthy.

Runs the tests' own engine (tests/helpers/docker_engine.py: root on Linux, Debian's packages, the engine's data in
PIPELINE_DOCKER_CACHE) and the commands of docker/README.md, with the settings tests/test_docker_stack.py gives:

    .venv/bin/python benchmarks/docker_stack.py [--cold] [--rounds N]

--cold rebuilds the pipeline's image without the engine's layer cache (`build --no-cache`: every package downloaded
and installed again, gigabytes); without it, the warm builds and the start-up only. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.docker_base import base_image
from tests.helpers.docker_engine import CACHE, compose_command, engine

REPO = Path(__file__).resolve().parent.parent
HEALTHY = ("postgres", "mlflow", "ray-head")


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True, timeout=7200)
    return time.perf_counter() - started


def health(env: dict[str, str], compose: list[str]) -> dict[str, str]:
    ids = subprocess.run([*compose, "ps", "-q"], cwd=REPO, env=env, capture_output=True, text=True).stdout.split()
    found = {}
    for container in json.loads(subprocess.check_output(["docker", "inspect", *ids], env=env)) if ids else []:
        service = container["Config"]["Labels"]["com.docker.compose.service"]
        found[service] = container["State"].get("Health", {}).get("Status", container["State"]["Status"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="also rebuild without the layer cache (downloads GBs)")
    parser.add_argument("--rounds", type=int, default=3, help="stack start-ups to time")
    args = parser.parse_args()
    with engine() as started:
        base = base_image(started, CACHE)
        env = started.env(
            COMPOSE_PROJECT_NAME="cnn-pipeline-bench",
            POSTGRES_PASSWORD="bench",
            POSTGRES_IMAGE="cnn-pipeline-postgres",
            PIPELINE_BASE=base,
            PIPELINE_BUILD_NETWORK="host",
            RAY_WORKER_CPUS="1",
            MLFLOW_PORT="15399",
        )
        compose = [*compose_command(), "-f", "docker/compose.yaml"]
        build = ["docker", "build", "--network=host", f"--build-arg=BASE={base}"]
        postgres = [*build, "-f", "docker/postgres.Dockerfile", "-t", "cnn-pipeline-postgres", "."]
        print(f"engine: dockerd {started.docker('version', '--format={{.Server.Version}}').stdout.strip()}, "
              f"compose: {' '.join(compose_command())}, base: {base}")  # fmt: skip
        if args.cold:
            print(f"cold build, pipeline (build --no-cache): {timed([*compose, 'build', '--no-cache'], env):.0f} s")
            cold = [*postgres[:2], "--no-cache", *postgres[2:]]
            print(f"cold build, postgres (--no-cache): {timed(cold, env):.0f} s")
        timed(postgres, env)  # both images as the checkout has them: what the figures below start from
        timed([*compose, "build"], env)
        print(f"warm build, nothing changed (compose build): {timed([*compose, 'build'], env):.1f} s")
        marker = REPO / "pipeline" / "_benchmark_change.py"
        marker.write_text(f"# {time.time()}\n")
        try:
            print(f"warm build, a code change (compose build): {timed([*compose, 'build'], env):.1f} s")
        finally:
            marker.unlink()
        timed([*compose, "build"], env)  # back to the checkout's image
        for image in ("cnn-pipeline", "cnn-pipeline-postgres", base):
            size = int(started.docker("image", "inspect", "--format={{.Size}}", image).stdout)
            print(f"image size, {image}: {size / 1e9:.2f} GB")
        history = started.docker("history", "--human=false", "--no-trunc", "--format={{.Size}}\t{{.CreatedBy}}",
                                 "cnn-pipeline").stdout.splitlines()  # fmt: skip
        layers = sorted((line.split("\t", 1) for line in history), key=lambda layer: -int(layer[0]))
        largest = (f"{int(size) / 1e9:.2f} GB  {command[:100]}" for size, command in layers[:3])
        print("largest layers of cnn-pipeline:", *largest, sep="\n  ")

        for _ in range(args.rounds):
            subprocess.run([*compose, "down", "--volumes"], cwd=REPO, env=env, check=True, capture_output=True)
            started_at = time.perf_counter()
            up = subprocess.Popen([*compose, "up", "-d", "--scale", "ray-worker=2"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            deadline = time.monotonic() + 900
            while True:
                states = health(env, compose)
                if all(states.get(s) == "healthy" for s in HEALTHY) and up.poll() is not None:
                    break
                if up.poll() not in (None, 0) or time.monotonic() > deadline:
                    sys.exit(f"the stack did not come up healthy (up exited {up.poll()}; health: {states})")
                time.sleep(0.25)
            print(f"stack start-up to healthy (up -d --scale ray-worker=2, fresh volumes): "
                  f"{time.perf_counter() - started_at:.1f} s")  # fmt: skip
        subprocess.run([*compose, "down", "--volumes"], cwd=REPO, env=env, check=True, capture_output=True)
        if os.environ.get("KEEP_IMAGES") is None:
            started.docker("image", "prune", "--force")


if __name__ == "__main__":
    main()

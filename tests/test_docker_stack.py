"""docker/ for real: the images build on a Debian base made here (no registry), the compose stack comes up healthy,
a 4-trial sweep runs on two Ray worker containers — one killed mid-sweep, its trial retried from its checkpoint on
the shared volume — with every trial a nested MLflow run on the tracking server and its PostgreSQL, then the train
job; the image's own command trains as a user without privileges, and the image holds no secret. Every command is
the one docker/README.md gives (tests/helpers/docker_engine.py says what the engine is allowed to touch).

One stack serves the whole file (the images are built once per machine: the engine's data folder is a cache)."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO
from tests.helpers.docker_base import base_image
from tests.helpers.docker_engine import CACHE, Engine, Unavailable, cannot_run, compose_command, engine
from tests.helpers.mlflow_server import free_port
from tests.helpers.sweeps import parent_and_trials, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.skipif(bool(cannot_run()), reason=str(cannot_run()))]

README = (REPO / "docker" / "README.md").read_text()
PROJECT = "cnn-pipeline-test"  # not the users' project name (docker/.env.example): the tests' own containers
SWEEP = "docker"
QUICK = (  # small and quick: an epoch of a trial takes a second or two on one core
    "progress=none", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "data.batch_size=32", "scheduler.warmup_epochs=0", "logger.log_checkpoint=false",
    "class_activation.images=0",
)  # fmt: skip
EPOCHS = 12  # a trial trains for 12 epochs of the whole training split (a second or more each, however idle the
# machine): time to see it past its first epoch and kill its worker before its last
SWEEP_QUICK = (
    *QUICK, "trainer.limit_train_batches=null", f"trainer.max_epochs={EPOCHS}", f"sweep.name={SWEEP}",
    "logger.experiment_name=docker-sweep",
)  # fmt: skip
TRAIN_QUICK = (*QUICK, "logger.experiment_name=docker-train")


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, without its comment."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def readme(start: str) -> list[str]:
    """The README's one command that begins with `start`, as the shell splits it."""
    (line,) = [line for line in readme_commands() if line.startswith(start)]
    return shlex.split(line)


COMPOSE = "docker compose -f docker/compose.yaml"
HEALTHY = ("postgres", "mlflow", "ray-head")  # the services with a health check


@dataclass
class Stack:
    engine: Engine
    env: dict[str, str]
    url: str  # the tracking server, as published on this host's loopback
    logs: Path

    def run(self, argv: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A README command: `docker compose` is Debian's `docker-compose` 1.29 where there is no v2 plugin."""
        if argv[:2] == ["docker", "compose"]:
            argv = [*compose_command(), *argv[2:]]
        done = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr}")
        return done

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        argv = [*compose_command(), *argv[2:]] if argv[:2] == ["docker", "compose"] else argv
        with log.open("wb") as output:
            return subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=output, stderr=subprocess.STDOUT)

    def containers(self, service: str) -> list[str]:
        """The IDs of the service's containers, in the order compose numbers them."""
        ids = self.run([*COMPOSE.split(), "ps", "-q", service]).stdout.split()
        numbers = {i: self.inspect(i)["Config"]["Labels"]["com.docker.compose.container-number"] for i in ids}
        return sorted(ids, key=lambda i: int(numbers[i]))

    def inspect(self, what: str) -> dict:
        return json.loads(self.engine.docker("inspect", what).stdout)[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Engine, base, images, then the README's `up`: PostgreSQL, the tracking server, the Ray head and 2 workers."""
    with ExitStack() as stop:
        try:
            started = stop.enter_context(engine())
            base = base_image(started, CACHE)
        except Unavailable as error:
            pytest.skip(f"no Docker engine here: {error}")
        port = free_port()
        env = started.env(
            COMPOSE_PROJECT_NAME=PROJECT,
            POSTGRES_PASSWORD=secrets.token_hex(12),
            POSTGRES_IMAGE="cnn-pipeline-postgres",
            PIPELINE_BASE=base,
            PIPELINE_BUILD_NETWORK="host",  # the engine has no bridge of its own: builds download on the host's
            RAY_WORKER_CPUS="1",  # one trial at a time on each worker
            MLFLOW_WORKERS="2",  # a laptop's server: the stack shares 2 cores with the other tests
            MLFLOW_PORT=str(port),
            MLFLOW_ADDRESS="127.0.0.1",
            COLUMNS="400",  # docker-compose 1.29 wraps `ps`'s table at COLUMNS, which pytest-xdist's workers set to 80
        )
        stack = Stack(started, env, f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("docker"))
        postgres = readme("docker build -f docker/postgres.Dockerfile")
        stack.run([*postgres[:2], "--network=host", f"--build-arg=BASE={base}", *postgres[2:]], timeout=1800)
        stack.run(readme(f"{COMPOSE} build"), timeout=3600)
        stack.engine.docker("image", "prune", "--force")  # layers of former builds no image uses: the cache stays small
        down = readme(f"{COMPOSE} down")
        stack.run(down)  # what a killed session may have left
        stop.callback(stack.run, down, check=False)
        stack.run(readme(f"{COMPOSE} up"), timeout=600)
        try:  # minutes on a busy machine: each health check is a process started in its container
            wait_for(lambda: healthy_services(stack) >= set(HEALTHY), 600, "postgres, mlflow and ray-head healthy")
        except AssertionError as error:
            listed = stack.run(readme(f"{COMPOSE} ps"), check=False).stdout
            logs = stack.run([*readme(f"{COMPOSE} ps")[:-1], "logs", "--tail=40", *HEALTHY], check=False).stdout
            raise AssertionError(f"{error}\n{listed}\n{logs[-6000:]}") from None
        yield stack


def healthy_services(stack: Stack) -> set[str]:
    """The services whose container the engine reports healthy. Polled while the stack starts: one call of the engine's
    own client, where the README's `ps` (docker-compose 1.29 is a Python program) takes a second of CPU each time."""
    listed = stack.engine.docker(
        "ps", f"--filter=label=com.docker.compose.project={PROJECT}", "--filter=health=healthy",
        "--format={{.Label \"com.docker.compose.service\"}}",
    ).stdout  # fmt: skip
    return set(listed.split())


def health(stack: Stack) -> dict[str, bool]:
    """Whether `ps`, as the README types it, reports each service with a health check healthy."""
    listed = stack.run(readme(f"{COMPOSE} ps")).stdout.splitlines()
    lines = {s: [line for line in listed if f"{PROJECT}_{s}_" in line or f"{PROJECT}-{s}-" in line] for s in HEALTHY}
    return {service: len(found) == 1 and "(healthy)" in found[0] for service, found in lines.items()}


def test_stack_comes_up_healthy_with_two_workers_and_the_server_published_on_loopback_only(stack: Stack) -> None:
    assert all(health(stack).values())
    assert len(stack.containers("ray-worker")) == 2
    (mlflow_container,) = stack.containers("mlflow")
    bindings = stack.inspect(mlflow_container)["HostConfig"]["PortBindings"]["5000/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    for service in ("postgres", "ray-head", "ray-worker"):
        for container in stack.containers(service):
            assert not stack.inspect(container)["HostConfig"]["PortBindings"], f"{service} publishes nothing"
    with urllib.request.urlopen(f"{stack.url}/health", timeout=10) as answer:
        assert answer.read() == b"OK"


def children(client: mlflow.MlflowClient) -> tuple[mlflow.entities.Run | None, list[mlflow.entities.Run]]:
    experiment = client.get_experiment_by_name("docker-sweep")
    if experiment is None:
        return None, []
    runs = client.search_runs([experiment.experiment_id])
    if not any(r.data.tags.get("sweep.role") == "parent" for r in runs):
        return None, []
    return parent_and_trials(runs)


def test_sweep_spreads_over_both_workers_and_finishes_when_one_is_killed(stack: Stack) -> None:
    client = mlflow.MlflowClient(stack.url)
    workers = stack.containers("ray-worker")
    killed = workers[-1]
    hostname = stack.inspect(killed)["Config"]["Hostname"]  # a trial's `host` tag: the container it runs in
    sweep = stack.start([*readme(f"{COMPOSE} run --rm sweep"), *SWEEP_QUICK], stack.logs / "sweep.log")
    first: dict[str, dict[str, str]] = {}
    try:

        def both_training() -> bool:  # a trial on each worker, the killed one's past its first epoch, not its half
            _, kids = children(client)
            running = {r.info.run_id: r.data.tags for r in kids if r.info.status == "RUNNING"}
            cut = [run_id for run_id, tags in running.items() if tags.get("host") == hostname]
            if len(running) < 2 or not cut:
                return False
            first.clear()
            first.update(running)  # the trials running at the moment of the kill
            return 1 <= len(client.get_metric_history(cut[0], "val/acc")) <= EPOCHS // 2

        wait_for(both_training, 420, "a trial past its first epoch on each worker")
        stack.engine.docker("kill", killed)  # the worker's machine fails: every process of it dies at once
        assert sweep.wait(timeout=600) == 0, (stack.logs / "sweep.log").read_text()[-5000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    output = (stack.logs / "sweep.log").read_text()

    hosts = {stack.inspect(worker)["Config"]["Hostname"] for worker in workers}
    assert {tags["host"] for tags in first.values()} == hosts, "trials ran on both workers at once"
    assert len({tags["sweep.node_id"] for tags in first.values()}) == 2
    parent, kids = children(client)
    assert parent is not None and parent.info.status == "FINISHED"
    assert len(kids) == 4 and all(r.info.status == "FINISHED" for r in kids), [r.info.status for r in kids]
    (cut,) = [r for r in kids if first.get(r.info.run_id, {}).get("host") == hostname]
    (errored,) = re.findall(r"Trial \S+ errored after (\d+) iterations", output)
    assert 1 <= int(errored) < EPOCHS, "its worker was killed in the middle of the trial"
    steps = [m.step for m in client.get_metric_history(cut.info.run_id, "val/acc")]
    assert steps == sorted(set(steps)) and len(steps) == EPOCHS, "resumed from its checkpoint: each epoch once"
    assert "test/acc" in cut.data.metrics
    finished_in = json.loads(cut.data.tags["process"])["host"]  # the process that ended the run
    assert finished_in in hosts - {hostname}, "retried on the other worker"
    assert re.search(rf"/{SWEEP}/\S+/checkpoint_\d+/", cut.data.tags["resumed_from"]), "from its Tune checkpoint"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.csv", "best"}

    (head,) = stack.containers("ray-head")  # the checkpoints and the best config lie on the shared volume
    listed = stack.engine.docker("exec", head, "find", f"/work/sweeps/{SWEEP}", "-name", "checkpoint_*").stdout
    assert len(listed.split()) >= 4, listed
    assert stack.engine.docker("exec", head, "test", "-f", f"/work/sweeps/{SWEEP}/best_config.yaml").returncode == 0


def test_train_job_logs_its_run_and_model_to_the_server(stack: Stack) -> None:
    done = stack.run([*readme(f"{COMPOSE} run --rm train"), *TRAIN_QUICK], timeout=600)
    client = mlflow.MlflowClient(stack.url)
    (run,) = client.search_runs([client.get_experiment_by_name("docker-train").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_epochs"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 3
    assert f"MLflow run: {run.info.run_id}" in done.stdout
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server to its volume"
    assert client.list_artifacts(run.info.run_id), "the server stored the run's files"


def test_image_trains_as_a_user_without_privileges_and_holds_no_secret(stack: Stack) -> None:
    image = stack.inspect("cnn-pipeline")
    assert image["Config"]["User"] == "10001:10001"
    assert image["Config"]["Cmd"] == ["python", "-m", "pipeline.train"]
    assert not [v for v in image["Config"]["Env"] if re.search(r"PASSWORD|SECRET|TOKEN", v.split("=")[0])]
    history = stack.engine.docker("history", "--no-trunc", "cnn-pipeline").stdout
    assert stack.env["POSTGRES_PASSWORD"] not in history + json.dumps(image)
    shipped = stack.engine.docker("run", "--rm", "--entrypoint", "ls", "cnn-pipeline", "-A", "/app").stdout.split()
    assert sorted(shipped) == ["README.md", "conf", "pipeline", "pyproject.toml"], "the code and configs, nothing else"

    # The README's command with the image's command (checked above) given again, shortened: the default job's 20
    # epochs are the same code, proved elsewhere; here what matters is that the image trains as its user.
    done = stack.run(
        [*readme("docker run --rm cnn-pipeline"), *image["Config"]["Cmd"], *QUICK, "trainer.max_epochs=2"], timeout=900
    )
    assert "Test set, best checkpoint" in done.stdout and "MLflow run:" in done.stdout, done.stdout[-3000:]

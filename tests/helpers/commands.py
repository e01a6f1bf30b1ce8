"""`python -m pipeline.<command> …` for the tests, each in a new process forked from one that has already imported the
pipeline, instead of a new interpreter that imports it again.

Importing the pipeline (torch, Lightning, timm, MLflow) takes ~6 s of CPU, and the suite runs a command in a new
process more than a hundred times: most of its CPU went on importing the same modules again. Python's forkserver does
the imports once per test worker (`set_forkserver_preload`) and forks a process per command from there; the process
runs the command's module as `python -m` does (`runpy`, `__main__`, its own arguments, folder, environment, standard
streams and exit status) and its exit handlers, and is otherwise a fresh process: its own PID, signals and children.

What a fork cannot give is an environment read at import time: huggingface_hub reads `HF_*` when it is imported, for
instance. A command whose environment differs from the test session's in anything but MLflow's variables (which
MLflow reads when it uses them) therefore runs in a new interpreter, as does every command when
PIPELINE_TESTS_FRESH_PROCESSES=1 (to check that both ways give the same results).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the forked commands import before they start (what `import pipeline.run` and the sweep driver load).
PRELOAD = ["pipeline.run", "pipeline.sweep.driver", "mlflow.pytorch", "sklearn.datasets", "sklearn.model_selection"]
# Read when used, not when imported (pytest's PYTEST_CURRENT_TEST names the test): a command may change them and fork.
FORKED_VARIABLES = ("MLFLOW_", "PYTEST_CURRENT_TEST")
FRESH = "PIPELINE_TESTS_FRESH_PROCESSES"

# The environment the preloading process imports with: the session's as it started, before any test changed it.
SESSION_ENV = {k: v for k, v in os.environ.items() if not k.startswith(FORKED_VARIABLES)}
_started = False


def run_module(
    module: str, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -m module *args` in `cwd` with `env`: its exit status and its output, like subprocess.run with
    capture_output=True and text=True (and subprocess.TimeoutExpired after `timeout` seconds, the process killed)."""
    command = [sys.executable, "-m", module, *args]
    if not _forkable(env):
        return subprocess.run(command, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    context = _forkserver()
    with tempfile.TemporaryDirectory(prefix="command-") as folder:
        stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
        arguments = (module, list(args), str(cwd), dict(env), str(stdout), str(stderr))
        process = context.Process(target=_main, args=arguments)
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, _read(stdout), _read(stderr))
        return subprocess.CompletedProcess(command, process.exitcode, _read(stdout), _read(stderr))


def _forkable(env: Mapping[str, str]) -> bool:
    if os.environ.get(FRESH) == "1":
        return False
    changed = set(env.items()) ^ set(SESSION_ENV.items())
    return all(name.startswith(FORKED_VARIABLES) for name, _ in changed)


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """Python's forkserver for this test process, started (once) with the session's environment and the pipeline
    imported."""
    global _started
    context = multiprocessing.get_context("forkserver")
    if not _started:
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(SESSION_ENV)  # a test may have changed the environment by now: the server keeps its own
        try:
            warm = context.Process(target=int)  # starts the server, which imports PRELOAD
            warm.start()
            warm.join()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _started = True
    return context


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _main(module: str, args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked process: become `python -m module *args` and exit as it would."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
        opened = os.open(path, flags | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.path.insert(0, cwd)  # as `python -m` puts the current folder first
    sys.argv = [module, *args]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()  # a process started by multiprocessing ends without running them; `python -m` runs them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

"""`python -m pipeline.<command> …` for the tests, each in a new process forked from one that has already imported the
pipeline, instead of a new interpreter that imports it again.

Importing the pipeline (torch, Lightning, timm, MLflow) takes ~6 s of CPU, and the suite runs a command in a new
process more than a hundred times: most of its CPU went on importing the same modules again. Python's forkserver does
the imports once per test worker (`set_forkserver_preload`) and forks a process per command from there; the process
runs the command's module as `python -m` does (`runpy`, `__main__`, its own arguments, folder, environment, standard
streams and exit status) and its exit handlers, and is otherwise a fresh process: its own PID, signals and children.

What a fork cannot give is an environment read at import time: huggingface_hub reads `HF_*` when it is imported, for
instance. A command whose environment differs from the test session's in anything but variables read when used
(FORKED_VARIABLES) and those the preloaded imports set themselves therefore runs in a new interpreter, as does every
command when PIPELINE_TESTS_FRESH_PROCESSES=1 (to check that both ways give the same results).

`run_module` runs a command to its end, like subprocess.run; `start_module` starts one in the background, for a test
that signals or kills it, with what such a test uses of subprocess.Popen. Either way the command starts as a
terminal's foreground job would: no signal blocked, Ctrl-C raising KeyboardInterrupt. A process inherits ignored
signals and its signal mask, and what ran before in a test worker may have left either changed (Lightning ignores
SIGINT once it has caught a KeyboardInterrupt in its process).
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the forked commands import before they start, as their own processes would (see the module).
PRELOAD = ["tests.helpers.preload"]
# Read when used, not when imported: a command may change them and fork. PYTEST_CURRENT_TEST names the test; MLflow's
# own _MLFLOW_* note what a process of it has started (a telemetry session); Lightning's seed_everything notes its seed
# for loader workers (PL_GLOBAL_SEED, PL_SEED_WORKERS), and torch's inductor its cache folder and private notes
# (_TORCHINDUCTOR_*) when it first compiles. AWS_* are read when an S3 client is made (boto3, which nothing preloaded
# imports). PYTHONPATH is read when an interpreter starts: the forked command puts it on sys.path as one would. Ray
# sets RAY_CLIENT_MODE=0 when it is imported (a test that imports Tune), as a command that imports it would.
FORKED_VARIABLES = (
    "MLFLOW_", "_MLFLOW_", "PYTEST_CURRENT_TEST", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "TORCHINDUCTOR_CACHE_DIR",
    "_TORCHINDUCTOR_", "AWS_", "PYTHONPATH", "RAY_CLIENT_MODE",
)  # fmt: skip
FRESH = "PIPELINE_TESTS_FRESH_PROCESSES"

# The environment the preloading process imports with: the session's as it started, before any test changed it.
SESSION_ENV = {k: v for k, v in os.environ.items() if not k.startswith(FORKED_VARIABLES)}
_set_by_imports: set[str] | None = None  # what importing PRELOAD itself set in the server's environment, once started


def run_module(
    module: str, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -m module *args` in `cwd` with `env`: its exit status and its output, like subprocess.run with
    capture_output=True and text=True (and subprocess.TimeoutExpired after `timeout` seconds, the process killed)."""
    with tempfile.TemporaryDirectory(prefix="command-") as folder:
        stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
        process = start_module(module, args, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise subprocess.TimeoutExpired(process.args, timeout, _read(stdout), _read(stderr)) from None
        return subprocess.CompletedProcess(process.args, status, _read(stdout), _read(stderr))


class Forked:
    """A forked command, with what the tests use of subprocess.Popen: `returncode` (None while it runs, then its exit
    status, or -N after signal N), poll, wait, send_signal, kill."""

    def __init__(self, args: list[str], process: multiprocessing.process.BaseProcess) -> None:
        self.args = args
        self._process = process
        self.pid: int = process.pid  # type: ignore[assignment]  # set once started

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; subprocess.TimeoutExpired if it still runs after `timeout` seconds."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# A command start_module started: a new interpreter's Popen, or a forked process that behaves as one.
Started = subprocess.Popen[bytes] | Forked


def start_module(
    module: str, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdout: Path, stderr: Path | None = None
) -> Started:
    """`python -m module *args` in `cwd` with `env`, started in the background: its output goes to the file `stdout`,
    its errors to the file `stderr` (or to `stdout` too); its standard input is empty."""
    command = [sys.executable, "-m", module, *args]
    if not forked(env):
        with stdout.open("wb") as out, stderr.open("wb") if stderr else out as err:
            process = subprocess.Popen(
                command, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                preexec_fn=as_from_a_terminal,
            )  # fmt: skip
        return process
    arguments = (module, list(args), str(cwd), dict(env), str(stdout), str(stderr or stdout))
    child = _forkserver().Process(target=_main, args=arguments)
    child.start()
    return Forked(command, child)


def as_from_a_terminal() -> None:
    """In a command's process before it starts: every signal delivered, Ctrl-C raising KeyboardInterrupt."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.default_int_handler)


def forked(env: Mapping[str, str]) -> bool:
    """Whether a command with `env` is forked from the preloaded process (else it runs in a new interpreter): its
    environment is the session's, but for variables read when used and those the imports set themselves (Lightning
    sets PYTORCH_NVML_BASED_CUDA_CHECK when it is imported: in the server, and in a test process that imports it)."""
    if os.environ.get(FRESH) == "1":
        return False
    _forkserver()
    return not_forkable({name for name, _ in set(env.items()) ^ set(SESSION_ENV.items())}) == set()


def not_forkable(changed: set[str]) -> set[str]:
    """Of the environment variables `changed` from the session's, those that send a command to a new interpreter."""
    left = {name for name in changed if not name.startswith(FORKED_VARIABLES)}
    if left:
        _forkserver()  # learns what the imports set themselves (scikit-learn's KMP_*), if no command has started it yet
    return left - (_set_by_imports or set())


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """Python's forkserver for this test process, started (once) with the session's environment and the pipeline
    imported."""
    global _set_by_imports
    context = multiprocessing.get_context("forkserver")
    if _set_by_imports is None:
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(SESSION_ENV)  # a test may have changed the environment by now: the server keeps its own
        receive, send = context.Pipe(duplex=False)
        try:
            warm = context.Process(target=_send_environment, args=(send,))  # starts the server, which imports PRELOAD
            warm.start()
            send.close()  # the child holds its own end now: if it dies before it sends, recv ends instead of waiting
            try:
                server = receive.recv()
            except EOFError:
                warm.join()
                raise RuntimeError(f"the preloaded process died before it reported (exit {warm.exitcode})") from None
            warm.join()
        finally:
            os.environ.clear()
            os.environ.update(saved)
            receive.close()
        _set_by_imports = {name for name in {*server, *SESSION_ENV} if server.get(name) != SESSION_ENV.get(name)}
    return context


def _send_environment(connection: multiprocessing.connection.Connection) -> None:
    """In a process forked from the server: its environment, as the imports left it."""
    connection.send(dict(os.environ))
    connection.close()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _main(module: str, args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked process: become `python -m module *args` and exit as it would."""
    as_from_a_terminal()
    # A process the forkserver starts inherits its start method (forkserver); a new interpreter has none chosen, so
    # its DataLoader workers and other multiprocessing children are forked from it. Without this, each loader worker
    # of a forked command was started through the test's preloaded server: seconds each, and not what users run.
    multiprocessing.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    outputs = {stdout: os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)}
    if stderr not in outputs:
        outputs[stderr] = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    empty = os.open(os.devnull, os.O_RDONLY)
    for fd, opened in ((0, empty), (1, outputs[stdout]), (2, outputs[stderr])):
        os.dup2(opened, fd)
    for opened in {empty, *outputs.values()}:
        os.close(opened)
    # As `python -m` starts sys.path: the current folder, then PYTHONPATH's folders.
    sys.path[:0] = [cwd, *(folder for folder in env.get("PYTHONPATH", "").split(os.pathsep) if folder)]
    sys.argv = [module, *args]
    sys.orig_argv = [sys.executable, "-m", module, *args]  # what the interpreter was started with
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

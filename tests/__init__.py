"""The test suite. Imported before any test module or conftest, so what is set here holds for every process."""

import os

# Nothing a test starts may talk to anything but loopback and its own test hosts. MLflow's usage telemetry is on by
# default and would try to reach its collector from the test process and every command; it also sets
# _MLFLOW_TELEMETRY_SESSION_ID in the environment. DO_NOT_TRACK turns it off, and unlike MLFLOW_DISABLE_TELEMETRY it
# is kept by clean_env (which drops MLFLOW_* variables), so the commands the tests start inherit it too.
os.environ["DO_NOT_TRACK"] = "true"

# One torch thread per process. The suite runs a test worker per core (pytest -n 2 on two), each starting trainings;
# a torch process with a thread for every core spins for the core the other worker holds (OpenMP's threads wait
# busily): the same short training took 1.5 times the CPU with two threads as with one beside a busy core, 2.7 times
# beside the Docker tests (benchmarks/RESULTS.md, "One torch thread per process"). Set before torch is imported
# anywhere in the suite: the test workers, the preloaded process the commands fork from, and every command they start
# inherit it. A developer's own value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

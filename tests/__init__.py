"""The test suite. Imported before any test module or conftest, so what is set here holds for every process."""

import os

# Nothing a test starts may talk to anything but loopback and its own test hosts. MLflow's usage telemetry is on by
# default and would try to reach its collector from the test process and every command; it also sets
# _MLFLOW_TELEMETRY_SESSION_ID in the environment. DO_NOT_TRACK turns it off, and unlike MLFLOW_DISABLE_TELEMETRY it
# is kept by clean_env (which drops MLFLOW_* variables), so the commands the tests start inherit it too.
os.environ["DO_NOT_TRACK"] = "true"

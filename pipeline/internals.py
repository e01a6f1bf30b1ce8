"""Every use of Lightning's, timm's and MLflow's private internals, in one place: each is something no public API does.

An upgrade of Lightning or MLflow may rename or change any of these without notice; tests/test_internals.py checks
each one and says what changed and where it is used.

  dump_checkpoint         CheckpointOnException: the checkpoint, without trainer.save_checkpoint's barrier
  remake_train_iterator   RandomStateCheckpoint (pipeline/resume.py): the first epoch's loader iterator, made again
  WatchedDDPStrategy      ReportingDDPStrategy (pipeline/distributed.py): a hook before Lightning's DDP launcher
                          kills every process because one rank died
  auto_group_layers       ParameterGroups (pipeline/recipes.py): timm's layer numbering for a model without
                          group_matcher, as timm's own layer-decay helper numbers it
  async_logging_done      RecordedMLFlowLogger (pipeline/tracking/logger.py): whether MLflow's asynchronous
                          logging has finished a batch, without waiting for it
  process_tracking_uri    pipeline.register: MLflow's process-wide tracking URI set for a block, then restored

timm's `feature_take_indices` (how a model reads the levels asked of `forward_intermediates`) is held by
pipeline/models/features.py instead: the models must not import Lightning, which this module does. Likewise Ray's
placement-group table (which actor made each group) is read by pipeline/sweep/placement.py, for the sweep driver,
which imports no Lightning; tests/test_sweep_placement.py checks it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def dump_checkpoint(trainer: L.Trainer) -> dict[str, Any]:
    """The checkpoint `trainer.save_checkpoint` would write, as a dict to hand to `trainer.strategy.save_checkpoint`.

    Private: `Trainer._checkpoint_connector.dump_checkpoint`. The public `trainer.save_checkpoint` dumps, saves and
    then waits at a barrier for every rank; after an exception under DDP a rank may be dead, and the barrier would
    hang. No public method returns the checkpoint dict without that barrier.
    """
    return trainer._checkpoint_connector.dump_checkpoint()


def remake_train_iterator(trainer: L.Trainer) -> None:
    """Make the training loader's iterator again, from the current random state, as the start of an epoch would.

    Private: `trainer.fit_loop._data_fetcher`. Lightning makes the first epoch's iterator while setting up fit
    (its shuffle order and worker seeds drawn then) and, when resuming, uses that one instead of making it at the
    epoch's start. Nothing public re-makes it: `trainer.train_dataloader` is the loader, and a new iterator of it
    is not the one the fit loop reads from.
    """
    iter(trainer.fit_loop._data_fetcher)


DeadRanks = list[tuple[int, "subprocess.Popen[bytes]"]]  # (local rank, process) of each launched rank that failed


class _RankObserver(_ChildProcessObserver):
    """Lightning's watch over the launched ranks (a thread in the first process), which SIGKILLs every process, the
    first one included, as soon as one rank exits with an error; `before_kill` is told which ranks died first.

    Private: the observer class, its `_terminate_all` (the step that kills, called from its polling loop) and its
    `_child_processes`. Lightning offers no hook or callback on a rank's death: the first process is killed from
    this thread without an exception or a Callback hook being run in it."""

    def __init__(
        self, main_pid: int, child_processes: list[subprocess.Popen[bytes]], before_kill: Callable[[DeadRanks], None]
    ) -> None:
        super().__init__(main_pid, child_processes)
        self.before_kill = before_kill

    def _terminate_all(self) -> None:
        try:
            self.before_kill([(rank, p) for rank, p in enumerate(self._child_processes, start=1) if p.returncode])
        finally:
            super()._terminate_all()


class _WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher for DDP by re-running the command (start_method="popen"), with `_RankObserver` in place
    of Lightning's own observer.

    Private: the launcher class, `_call_children_scripts` and `_set_num_threads_if_needed`. Lightning's `launch`
    starts its observer from a module-level function with no way to pass another, so `launch` is Lightning's,
    copied: tests/test_internals.py fails when Lightning's changes."""

    def __init__(self, *args: Any, before_kill: Callable[[DeadRanks], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_kill = before_kill

    def launch(self, function: Callable[..., Any], *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _RankObserver(os.getpid(), self.procs, self.before_kill).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class WatchedDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy (every argument the same) that calls `before_ranks_killed` when a rank it launched
    dies, before Lightning kills every process of the run.

    Private: `_configure_launcher` (the strategy's step that makes its launcher, called by the Trainer) and
    `_launcher`. The public `launcher` property is read-only, and the strategy has no argument for a launcher."""

    def before_ranks_killed(self, dead: DeadRanks) -> None:
        """Override: runs in the first process, which is SIGKILLed right after it returns (or raises)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            # A bound method: a subclass's before_ranks_killed, and anything it reads, is looked up at the death.
            self._launcher = _WatchedLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, before_kill=self.before_ranks_killed
            )


def async_logging_done(operations: Any) -> bool:
    """Whether MLflow's asynchronous logging has finished every batch of `operations` (what `log_batch(...,
    synchronous=False)` returns), successfully or not; `operations.wait()` then returns or raises at once.

    Private: `RunOperations._operation_futures`. Its one public method, `wait()`, blocks until the batches are
    sent: with a tracking server that is down, for as long as MLflow's client retries (a minute by default). The
    logger looks for failed batches at every epoch without ever making training wait.
    """
    return all(future.done() for future in operations._operation_futures)


@contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI is `uri` while the block runs; then it, and MLFLOW_TRACKING_URI, are as
    they were.

    Private: `mlflow.tracking._tracking_service.utils._use_tracking_uri`. Registering a logged model (a `models:/m-…`
    source) in a local store looks the model up through the process-wide URI, not the client's (MLflow's own TODO in
    SqlAlchemyStore.create_model_version), so a client on another store fails with "Logged model … not found". The
    public set_tracking_uri cannot give back an unset URI: reading it falls back to the variable or the default.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def auto_group_layers(model: Any) -> Any:
    """timm's fallback layer groups for a model without `group_matcher` (each top-level child a layer), the numbering
    `param_groups_layer_decay` uses for such models.

    Private: `timm.optim._param_groups.auto_group_layers`. timm exports the helpers that take a model
    (`param_groups_layer_decay`), not this one, which the pipeline needs to tell which layer a parameter is in.
    """
    from timm.optim._param_groups import auto_group_layers as timm_auto_group_layers

    return timm_auto_group_layers(model)

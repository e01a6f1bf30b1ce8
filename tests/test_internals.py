"""What the pipeline takes from Lightning's, torch's and MLflow's internals is still there and does what we rely on.

pipeline/internals.py holds every private Lightning and MLflow name the pipeline uses (no public way does those
things); the other tests here guard the public roads that replaced private names, where they rest on how Lightning
or torch behaves. After an upgrade, a failure here names what changed and the code that depends on it. Seconds,
no training beyond one step of a two-weight model.
"""

from __future__ import annotations

import ast
import inspect
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.fabric.utilities import distributed as fabric_distributed
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from torch import nn

from pipeline import internals
from pipeline.distributed import ReportingDDPStrategy
from pipeline.ema import ModelEma, _ema_update
from pipeline.finetune import BATCH_NORMS

VERSIONS = f"lightning {L.__version__}, torch {torch.__version__}"


def changed(what: str, used_by: str) -> str:
    return f"{VERSIONS}: {what}. Used by {used_by}; update it there (and its docstring), then this test."


def require(condition: bool, what: str, used_by: str) -> None:
    if not condition:
        pytest.fail(changed(what, used_by), pytrace=False)


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def statements(function: Callable[..., Any]) -> list[str]:
    """The function's body, statement by statement, without its docstring and independent of formatting."""
    (definition,) = ast.parse(textwrap.dedent(inspect.getsource(function))).body
    assert isinstance(definition, ast.FunctionDef)
    body = definition.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [ast.unparse(statement) for statement in body]


# --- kept: the checkpoint without the barrier, and the remade loader iterator (one step of a tiny fit) ----------


class Tagged:
    """A training loader whose batches say which of its iterators made them (1 for the first)."""

    def __init__(self) -> None:
        self.iterators = 0

    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.iterators += 1
        return iter([torch.full((2, 2), float(self.iterators)) for _ in range(len(self))])


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(float(batch[0, 0]))
        return self.layer(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UseInternals(L.Callback):
    def __init__(self, loader: Tagged) -> None:
        self.loader = loader
        self.made_before = 0
        self.dumped: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.made_before = self.loader.iterators
        internals.remake_train_iterator(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.dumped = internals.dump_checkpoint(trainer)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_trainer_has_the_private_checkpoint_dump_and_train_data_fetcher() -> None:
    trainer = quiet_trainer()
    connector = getattr(trainer, "_checkpoint_connector", None)
    require(
        callable(getattr(connector, "dump_checkpoint", None)),
        "Trainer._checkpoint_connector.dump_checkpoint is gone",
        "internals.dump_checkpoint (CheckpointOnException saves a crashed run's state with it)",
    )
    try:
        inspect.signature(connector.dump_checkpoint).bind()
    except TypeError as error:
        pytest.fail(changed(f"dump_checkpoint() now needs arguments ({error})", "internals.dump_checkpoint"))
    require(
        hasattr(trainer.fit_loop, "_data_fetcher"),
        "trainer.fit_loop._data_fetcher is gone",
        "internals.remake_train_iterator (RandomStateCheckpoint, so a resumed run shuffles as an uninterrupted one)",
    )


@pytest.mark.slow
def test_the_remade_iterator_is_the_one_training_reads_and_the_dump_is_a_full_checkpoint() -> None:
    module, loader = Tiny(), Tagged()
    use = UseInternals(loader)
    quiet_trainer(max_steps=1, callbacks=[use]).fit(module, train_dataloaders=loader)
    ours = use.made_before + 1  # Lightning's set-up made the ones before (it also calls iter() to check the loader)
    require(
        loader.iterators == ours and module.seen == [float(ours)],
        f"on_train_start remade the fetcher's iterator as number {ours}, but {loader.iterators} were made and "
        f"training read its first batch from number {module.seen}",
        "internals.remake_train_iterator (RandomStateCheckpoint.on_train_start)",
    )
    missing = {"state_dict", "optimizer_states", "callbacks", "loops", "epoch", "global_step"} - set(use.dumped)
    require(
        not missing,
        f"dump_checkpoint() no longer returns the keys {sorted(missing)}",
        "internals.dump_checkpoint (CheckpointOnException: interrupted.ckpt must resume like last.ckpt)",
    )


# --- kept: Lightning's DDP launcher and the observer that kills every process when a rank dies ------------------

USED_BY_DDP = "internals.WatchedDDPStrategy (ReportingDDPStrategy marks a run FAILED when a rank dies)"


def test_the_ddp_launcher_internals_have_the_names_and_parameters_we_use() -> None:
    observer = getattr(fabric_launcher, "_ChildProcessObserver", None)
    launcher = getattr(pytorch_launcher, "_SubprocessScriptLauncher", None)
    threads = getattr(fabric_distributed, "_set_num_threads_if_needed", None)
    require(observer is not None, "lightning.fabric…subprocess_script._ChildProcessObserver is gone", USED_BY_DDP)
    require(launcher is not None, "lightning.pytorch…subprocess_script._SubprocessScriptLauncher is gone", USED_BY_DDP)
    require(
        threads is not None, "lightning.fabric.utilities.distributed._set_num_threads_if_needed is gone", USED_BY_DDP
    )
    require(
        parameters(observer.__init__)[:3] == ["self", "main_pid", "child_processes"],
        f"_ChildProcessObserver.__init__ takes {parameters(observer.__init__)}, not (main_pid, child_processes)",
        USED_BY_DDP,
    )
    require(
        "self._terminate_all()" in inspect.getsource(observer),
        "_ChildProcessObserver no longer calls self._terminate_all() when a rank dies: our override is never run",
        USED_BY_DDP,
    )
    require(
        parameters(launcher.__init__)[:4] == ["self", "cluster_environment", "num_processes", "num_nodes"],
        f"_SubprocessScriptLauncher.__init__ takes {parameters(launcher.__init__)}",
        USED_BY_DDP,
    )
    require(
        callable(getattr(launcher, "_call_children_scripts", None))
        and parameters(launcher._call_children_scripts) == ["self"],
        "_SubprocessScriptLauncher._call_children_scripts() is gone or takes arguments",
        USED_BY_DDP,
    )
    require("num_processes" in parameters(threads), "_set_num_threads_if_needed has no num_processes", USED_BY_DDP)
    require(
        "_configure_launcher" in vars(DDPStrategy)
        and "self.strategy._configure_launcher()" in inspect.getsource(_AcceleratorConnector),
        "DDPStrategy._configure_launcher is gone or no longer called by the Trainer: our launcher is never made",
        USED_BY_DDP,
    )


@pytest.mark.e2e
def test_our_launch_is_lightnings_with_our_observer() -> None:
    """internals._WatchedLauncher.launch is a copy of Lightning's: Lightning's, changed, must be copied again."""
    theirs = statements(pytorch_launcher._SubprocessScriptLauncher.launch)
    ours = [
        statement.replace(
            "_RankObserver(os.getpid(), self.procs, self.before_kill).start()", "_launch_process_observer(self.procs)"
        )
        for statement in statements(internals._WatchedLauncher.launch)
    ]
    require(
        theirs == ours,
        "_SubprocessScriptLauncher.launch changed; ours copies it. Lightning's is now:\n" + "\n".join(theirs),
        "internals._WatchedLauncher.launch",
    )
    started = statements(fabric_launcher._launch_process_observer)
    require(
        started == ["_ChildProcessObserver(child_processes=child_processes, main_pid=os.getpid()).start()"],
        f"Lightning starts its rank observer differently now: {started}",
        "internals._WatchedLauncher.launch (which starts internals._RankObserver in its place)",
    )


def test_the_strategy_the_trainer_makes_launches_with_our_launcher() -> None:
    strategy = ReportingDDPStrategy()
    quiet_trainer(strategy=strategy, devices=2)  # the Trainer configures the strategy's launcher; nothing starts
    require(
        isinstance(strategy.launcher, internals._WatchedLauncher),
        f"the strategy's launcher is {type(strategy.launcher).__name__}: DDPStrategy._configure_launcher or "
        "_launcher, which the public `launcher` property reads, changed",
        USED_BY_DDP,
    )


def python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.e2e
def test_a_dead_rank_is_reported_before_lightning_kills_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fabric_launcher.time, "sleep", lambda seconds: None)  # the observer polls every 5 s
    main, healthy, dead = python("import time; time.sleep(60)"), python("pass"), python("raise SystemExit(3)")
    try:
        healthy.wait(timeout=30)
        dead.wait(timeout=30)
        messages: list[str] = []
        strategy = ReportingDDPStrategy()
        strategy.on_rank_death = messages.append
        observer = internals._RankObserver(main.pid, [healthy, dead], strategy.before_ranks_killed)
        observer.run()  # the thread's loop, here in the test's thread: polls once, finds rank 2 dead
        require(
            messages
            == [
                f"a data-parallel process died: rank 2 (PID {dead.pid}) exited with code 3. Every process "
                "of the run is stopped."
            ],
            f"the observer reported {messages}: _ChildProcessObserver's _terminate_all or _child_processes changed",
            USED_BY_DDP,
        )
        require(
            main.wait(timeout=10) == -signal.SIGKILL,
            "Lightning's observer no longer kills the main process when a rank dies",
            USED_BY_DDP + ": the report assumes the run is then stopped",
        )
    finally:
        main.kill()
        main.wait()


# --- removed: public roads that rest on how Lightning and torch behave ---------------------------------------------


def weight(module: nn.Module) -> float:
    return float(next(module.parameters()).detach().flatten()[0])


def test_weight_averaging_swaps_its_average_in_for_validation_exactly_after_fits_setup() -> None:
    """ModelEma.swapped (was: `_average_model is not None`) assumes WeightAveraging makes its average in
    setup("fit") and from then on swaps it in and out around every validation epoch."""
    trainer, module, ema = quiet_trainer(), Tiny(), ModelEma(decay=0.5, warmup=False)
    used_by = "ModelEma.averaging / swapped (pipeline/ema.py: checkpoints saved mid-validation)"
    for stage in ("validate", "test"):
        ema.setup(trainer, module, stage)
        before = weight(module)
        ema.on_validation_epoch_start(trainer, module)
        require(
            weight(module) == before and not ema.swapped,
            f"WeightAveraging swapped weights in after setup({stage!r}) only",
            used_by,
        )
        ema.on_validation_epoch_end(trainer, module)
    ema.setup(trainer, module, "fit")
    average = weight(module)
    with torch.no_grad():
        next(module.parameters()).add_(1.0)
    live = weight(module)
    ema.on_validation_epoch_start(trainer, module)
    require(
        weight(module) == average and ema.swapped,
        "after setup('fit') WeightAveraging no longer swaps its average in at a validation epoch's start",
        used_by,
    )
    ema.on_validation_epoch_end(trainer, module)
    require(
        weight(module) == live and not ema.swapped,
        "WeightAveraging no longer swaps the live weights back at a validation epoch's end",
        used_by,
    )
    require("setup" in vars(WeightAveraging), "WeightAveraging no longer makes its average in setup()", used_by)


def test_the_ema_update_is_torchs_multi_tensor_ema_with_this_steps_decay() -> None:
    """_ema_update (was: torch._foreach_lerp_) calls torch.optim.swa_utils.get_ema_multi_avg_fn."""
    floats, integers = [torch.tensor([1.0, 2.0])], [torch.tensor([4])]
    _ema_update(floats, [torch.tensor([3.0, 6.0])], torch.tensor(5), decay=0.75, warmup=False)
    _ema_update(integers, [torch.tensor([8])], torch.tensor(5), decay=0.5, warmup=False)
    require(
        torch.equal(floats[0], torch.tensor([1.5, 3.0])) and torch.equal(integers[0], torch.tensor([6])),
        f"get_ema_multi_avg_fn(decay) no longer computes decay × average + (1 - decay) × current: {floats, integers}",
        "pipeline/ema.py _ema_update (ModelEma)",
    )


# Lightning's DDP teardown (with sync_batchnorm) turns SyncBatchNorm back into this after fit has ended: after every
# hook of BackboneFreeze, and a later fit turns it into SyncBatchNorm again first.
MADE_AFTER_FIT = {"lightning.pytorch.plugins.layer_sync._BatchNormXd"}


def test_the_public_batchnorm_classes_cover_every_batchnorm() -> None:
    """finetune.BATCH_NORMS (was: torch's private _BatchNorm) must include every BatchNorm a model can hold:
    torch's, timm's, torchvision's and ours."""
    import timm.layers  # noqa: F401  (their BatchNorm subclasses exist once imported)
    import torchvision.models  # noqa: F401

    import pipeline.models  # noqa: F401

    base = nn.BatchNorm2d.__base__  # torch's private BatchNorm base, reached without naming it

    def descendants(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from descendants(sub)

    missed = sorted(
        name
        for cls in descendants(base)
        if not issubclass(cls, BATCH_NORMS)
        and not cls.__module__.startswith("torch.ao.")  # quantized modules: inference only, never fine-tuned
        and (name := f"{cls.__module__}.{cls.__qualname__}") not in MADE_AFTER_FIT
    )
    require(
        not missed,
        f"BatchNorm classes outside finetune.BATCH_NORMS: {missed}",
        "BackboneFreeze (pipeline/finetune.py: a frozen backbone's BatchNorm is put in eval mode); add them there",
    )


def test_mlflow_async_logging_tells_a_finished_batch_from_a_pending_one_without_waiting(tmp_path: Any) -> None:
    import concurrent.futures
    import threading

    import mlflow
    from mlflow.entities import Metric

    used_by = "RecordedMLFlowLogger._notice_failed_sends (pipeline/tracking/logger.py)"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("internals"))
    gate = threading.Event()
    store = client._tracking_client.store
    original = store.log_batch

    def held(*args: Any, **kwargs: Any) -> Any:  # the batch is sent only once the test lets it
        gate.wait(30)
        return original(*args, **kwargs)

    store._async_logging_queue._logging_func = held
    operations = client.log_batch(run.info.run_id, metrics=[Metric("m", 1.0, 0, 0)], synchronous=False)
    futures = getattr(operations, "_operation_futures", None)
    require(
        isinstance(futures, list) and all(isinstance(f, concurrent.futures.Future) for f in futures),
        f"mlflow {mlflow.__version__}: RunOperations no longer keeps its futures in _operation_futures",
        used_by,
    )
    require(not internals.async_logging_done(operations), "a batch still being sent reads as done", used_by)
    gate.set()
    operations.wait()
    require(internals.async_logging_done(operations), "a sent batch does not read as done", used_by)
    client.set_terminated(run.info.run_id)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [1.0]


def test_the_process_tracking_uri_is_set_for_a_block_and_given_back(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking._tracking_service import utils

    used_by = "pipeline.register (a models:/m-… version in a local store)"
    monkeypatch.setattr(utils, "_tracking_uri", None)  # as a fresh process has it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    inside = f"sqlite:///{tmp_path}/mlflow.db"
    with internals.process_tracking_uri(inside):
        require(mlflow.get_tracking_uri() == inside, "the URI is not the one set", used_by)
        require(mlflow.MlflowClient()._tracking_client.tracking_uri == inside, "a new client does not use it", used_by)
    require(utils._tracking_uri is None, "the process-wide URI is not given back unset", used_by)
    require(mlflow.get_tracking_uri() == "sqlite:///elsewhere.db", "the variable is not given back", used_by)


def test_timm_numbers_the_layers_of_a_model_without_a_group_matcher() -> None:
    import timm

    used_by = "ParameterGroups layer decay (pipeline/recipes.py layer_ids)"
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    try:
        layers = internals.auto_group_layers(model)
    except (ImportError, AttributeError, TypeError) as error:
        message = f"timm {timm.__version__}: timm.optim._param_groups.auto_group_layers changed ({error})"
        pytest.fail(f"{message}. Used by {used_by}.", pytrace=False)
    numbers = [layers.get(name) for name, _ in model.named_parameters()]
    require(all(isinstance(n, int) for n in numbers), "auto_group_layers no longer maps every parameter", used_by)


def test_timm_reads_feature_indices_as_our_models_expect() -> None:
    """pipeline/models/features.py holds timm's private `feature_take_indices` (the models must not import
    pipeline.internals, which imports Lightning)."""
    import timm

    used_by = "forward_intermediates and prune_intermediate_layers of LeNet-5, NiN, ResNet, GoogLeNet"
    try:
        from timm.models._features import feature_take_indices as private
    except ImportError as error:
        pytest.fail(f"timm {timm.__version__}: timm.models._features.feature_take_indices moved ({error}). "
                    f"Used by {used_by}.", pytrace=False)  # fmt: skip
    from pipeline.models.features import feature_take_indices

    require(feature_take_indices is private, "pipeline.models.features does not hold timm's function", used_by)
    require(private(4, None) == ([0, 1, 2, 3], 3), "None no longer means every level", used_by)
    require(private(4, 2) == ([2, 3], 3), "an int n no longer means the last n levels", used_by)
    require(private(4, [0, -1]) == ([0, 3], 3), "a list no longer counts negative indices from the end", used_by)

"""Lightning callbacks declared in YAML (conf/callbacks, `+callbacks.<name>…`) join the pipeline's own, which stay."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import mlflow
import pytest
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    StochasticWeightAveraging,
    Timer,
)

from pipeline.config import CONF_DIR, ConfigError, validate
from pipeline.finetune import BackboneFreeze
from pipeline.recipes import LearningRates
from pipeline.resume import RandomStateCheckpoint
from pipeline.run import CheckpointOnException, declared_callbacks, run
from tests.conftest import compose_in, run_cli, store_uri

TINY = (
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "logger.log_checkpoint=false",
)
SWA = (  # as a user types it
    "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
    "+callbacks.swa.swa_lrs=0.01",
)


class CallbackKinds(Callback):
    """Notes which callbacks the Trainer holds when fitting starts."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.kinds = {type(callback) for callback in trainer.callbacks}


@pytest.mark.slow
def test_swa_from_the_command_line_trains_beside_the_pipelines_own_callbacks(root: Path) -> None:
    kinds = CallbackKinds()
    # SWA from the second of 3 epochs, its learning rate reached after one epoch of annealing
    overrides = [*TINY, *SWA, "+callbacks.swa.swa_epoch_start=2", "+callbacks.swa.annealing_epochs=1"]
    result = run(compose_in(root, [*overrides, "trainer.max_epochs=3", "optim.lr=0.05"]), callbacks=[kinds])

    assert StochasticWeightAveraging in kinds.kinds
    own = {ModelCheckpoint, CheckpointOnException, RandomStateCheckpoint, LearningRates, BackboneFreeze}
    assert own <= kinds.kinds, "the pipeline's callbacks are all still there"
    client = mlflow.MlflowClient(store_uri(root))
    lrs = [point.value for point in client.get_metric_history(result.run_id, "lr-SGD")]
    assert lrs[-1] == pytest.approx(0.01), f"SWA took the schedule over and holds its learning rate: {lrs}"
    assert all(lr != pytest.approx(0.01) for lr in lrs[:-1]), "the configured schedule ran before"
    params = client.get_run(result.run_id).data.params
    assert params["callbacks.swa._target_"] == "lightning.pytorch.callbacks.StochasticWeightAveraging"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "callbacks").glob("*.yaml")))
def test_every_preset_builds_its_callbacks(root: Path, preset: str) -> None:
    cfg = compose_in(root, [f"callbacks={preset}"])
    validate(cfg)
    built = {type(callback) for callback in declared_callbacks(cfg)}
    assert built == {"none": set(), "swa": {StochasticWeightAveraging}, "time_limit": {Timer}}[preset]


def test_an_entry_set_to_null_is_left_out(root: Path) -> None:
    cfg = compose_in(
        root, ["callbacks=swa", "callbacks.swa=null", "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer"]
    )
    assert [type(callback) for callback in declared_callbacks(cfg)] == [Timer]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveragin"],
            "callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveragin: lightning.pytorch.callbacks "
            "has no StochasticWeightAveragin. Close matches: StochasticWeightAveraging",
        ),
        (["+callbacks.x._target_=lightning.pytorch.Nope.Timer"], "callbacks.x._target_=lightning.pytorch.Nope.Timer: "),
        ([*SWA, "+callbacks.swa.swa_lr=0.1"], "unexpected keyword argument 'swa_lr'"),
        (["+callbacks.x._target_=collections.OrderedDict"], "is not a Lightning callback"),
        (["+callbacks.bar._target_=lightning.pytorch.callbacks.RichProgressBar"], "progress=rich|tqdm|none"),
    ],
    ids=["misspelt class", "missing module", "wrong argument", "not a callback", "a progress bar"],
)
def test_a_callback_that_cannot_be_built_names_its_key(root: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        declared_callbacks(compose_in(root, overrides))
    assert message in str(error.value)
    assert "\n" not in str(error.value), "one line"


def test_an_entry_without_a_target_is_a_config_error(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"callbacks.swa=0.01: must be a Lightning callback's _target_"):
        validate(compose_in(root, ["+callbacks.swa=0.01"]))


@pytest.mark.e2e
@pytest.mark.fresh_store
def test_a_bad_target_stops_the_cli_with_exit_2_before_anything_is_tracked(root: Path) -> None:
    done = run_cli("pipeline.train", "+callbacks.swa._target_=lightning.pytorch.callbacks.Swa", root=root)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: callbacks.swa._target_=lightning.pytorch.callbacks.Swa: " in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"

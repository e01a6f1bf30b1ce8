"""Every option of every config group composes, validates and builds its objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from pipeline.config import CONF_DIR, ConfigError, check_arguments, validate
from pipeline.data.transforms import InputSpec, train_transform
from pipeline.recipes import optimizer_factory
from tests.conftest import compose_in

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
REQUIRED = {"data=shards": ["data.url=/data/shards"]}
OPTIONS = [(group, option.stem) for group in GROUPS for option in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_train_config_composes_every_group() -> None:
    assert {"data", "model", "aug", "optim", "scheduler", "trainer", "logger", "paths", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(root: Path, group: str, option: str) -> None:
    config_name = "sweep" if group == "sweep" else "train"  # sweep presets belong to the sweep config
    needed = REQUIRED.get(f"{group}={option}", [])  # what the option leaves to the user (`???`)
    cfg = compose_in(root, [f"{group}={option}", *needed], config_name=config_name)
    validate(cfg)
    check_arguments(cfg)  # every key of every shipped option is one its optimizer, trainer, source… takes


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "optim").glob("*.yaml")))
def test_every_optimizer_and_schedule_builds_and_steps(root: Path, option: str) -> None:
    for schedule in sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml")):
        cfg = compose_in(root, [f"optim={option}", f"scheduler={schedule}"])
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = optimizer_factory(cfg.optim)([weight])  # the optimizer, without optim.lr_base/lr_scale
        scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=10, max_epochs=cfg.trainer.max_epochs)
        for _ in range(5):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] > 0


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "aug").glob("*.yaml")))
def test_every_augmentation_builds(root: Path, option: str) -> None:
    cfg = compose_in(root, [f"aug={option}"])
    spec = InputSpec(size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
    assert train_transform(cfg.aug.train, spec, seed=0) is not None


def test_mlflow_tracking_uri_variable_is_followed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compose_in(root).logger.tracking_uri == f"sqlite:///{root}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert compose_in(root).logger.tracking_uri == "http://127.0.0.1:5999"
    assert compose_in(root, ["logger.tracking_uri=http://tracking:80"]).logger.tracking_uri == "http://tracking:80"


def test_mlflow_experiment_name_variable_is_followed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compose_in(root, ["data=mnist"]).logger.experiment_name == "mnist", "default: the data set's name"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team/baselines")
    assert compose_in(root, ["data=mnist"]).logger.experiment_name == "team/baselines"
    assert compose_in(root, ["logger.experiment_name=mine"]).logger.experiment_name == "mine", "the key still wins"


def test_a_warmup_as_long_as_the_run_is_not_refused(root: Path) -> None:
    validate(compose_in(root, ["trainer.max_epochs=1", "scheduler=onecycle"]))  # run(cfg) shortens it


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr=-1", "optim.lr=-1: must be a number > 0"),
        ("optim.lr=0", "optim.lr=0: must be a number > 0"),
        ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("optim.momentum=1.5", "optim.momentum=1.5: must be a number in [0, 1)"),
        ("loss.label_smoothing=1", "loss.label_smoothing=1"),
        ("monitor.metric=val/accuracy", "one of val/acc, val/loss"),
        ("progress=fancy", "progress='fancy': must be one of rich, tqdm, none"),
        ("data.source.test_fraction=0.9", "leaves no training images"),
        ("checkpoint.save_top_k=0", "checkpoint.save_top_k=0: must be an integer >= 1, or -1 for every epoch"),
        ("checkpoint.save_top_k=-2", "checkpoint.save_top_k=-2: must be an integer >= 1, or -1"),
        ("trainer.precision=8-mixed", "trainer.precision='8-mixed'"),
        ("seed=-1", "seed=-1: must be an integer in 0..4294967295 or null"),  # NumPy refused it after 10 s
        ("seed=4294967296", "seed=4294967296: must be an integer in 0..4294967295 or null"),
    ],
)
def test_wrong_values_name_the_key_and_allowed_values(root: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_in(root, [override]))
    assert named in str(error.value)
    assert "(e.g. " in str(error.value), "every message shows an override that fixes it"


def test_all_problems_are_reported_together(root: Path) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_in(root, ["optim.lr=-1", "data.batch_size=0"]))
    assert "optim.lr" in str(error.value) and "data.batch_size" in str(error.value)


def test_a_value_the_config_leaves_to_the_user_is_named_when_it_is_not_given(root: Path) -> None:
    """data=shards' url is `???`: the run is refused naming it, not with OmegaConf's error about data.source.url."""
    with pytest.raises(ConfigError, match=r"^Invalid configuration: data\.url is not set: .*\(data\.url=…\)$"):
        validate(compose_in(root, ["data=shards"]))
    validate(compose_in(root, ["data=shards", "data.url=/data/shards"]))


@pytest.mark.parametrize("output", ["", " "])
def test_an_empty_shard_output_is_refused_not_written_into_the_folder_the_command_runs_in(output: str) -> None:
    from pipeline.config import compose
    from pipeline.shard import _check

    with pytest.raises(ConfigError, match="output is not set"):
        _check(compose(["data=digits", f"output='{output}'"], config_name="shard"))

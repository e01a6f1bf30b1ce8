"""Debug presets run end to end through `python -m pipeline.train`, and every experiment preset composes."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline.config import CONF_DIR, validate
from tests.conftest import compose_in, run_cli, store_uri

EXPERIMENTS = ("cifar_resnet18", "imagenet_resnet50_a3", "digits_resnet18_strong")


def only_run(root: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(store_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED"
    return run


def test_every_debug_preset_composes(root: Path) -> None:
    presets = sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml"))
    assert presets == ["fast", "limit", "overfit", "profile"]
    for preset in presets:
        cfg = compose_in(root, [f"debug={preset}"])
        validate(cfg)
        assert cfg.progress == "none" and cfg.data.num_workers == 0 and not cfg.trainer.enable_model_summary


@pytest.mark.e2e
def test_fast_runs_one_batch_of_each_split_without_a_best_checkpoint(root: Path) -> None:
    done = run_cli("pipeline.train", "debug=fast", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Checkpoint: None" in done.stdout
    run = only_run(root)
    assert run.data.metrics["test/samples"] == 64, "one test batch"
    assert run.data.tags["debug"] == "fast"


@pytest.mark.e2e
def test_limit_trains_on_a_fraction_and_tests(root: Path) -> None:
    done = run_cli("pipeline.train", "debug=limit", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(root)
    client = mlflow.MlflowClient(store_uri(root))
    assert len(client.get_metric_history(run.info.run_id, "train/acc")) == 2, "2 epochs"
    assert run.data.metrics["test/samples"] == 64, "a quarter of the 5 test batches: 1"


@pytest.mark.e2e
def test_overfit_memorises_a_few_batches(root: Path) -> None:
    done = run_cli("pipeline.train", "debug=overfit", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(root)
    assert run.data.metrics["train/acc"] >= 0.99
    assert run.data.params["aug.name"] == "none" and run.data.params["early_stopping.patience"] == "None"


@pytest.mark.e2e
def test_profile_logs_the_profiler_report(root: Path) -> None:
    done = run_cli("pipeline.train", "debug=profile", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(root)
    client = mlflow.MlflowClient(store_uri(root))
    reports = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "profile")}
    assert reports == {"fit-profile.txt", "test-profile.txt"}
    text = Path(client.download_artifacts(run.info.run_id, "profile/fit-profile.txt")).read_text()
    assert "run_training_epoch" in text


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_compose_and_validate(root: Path, experiment: str) -> None:
    cfg = compose_in(root, [f"experiment={experiment}"])
    validate(cfg)
    assert cfg.logger.tags.preset == experiment
    assert cfg.mixup.cutmix_alpha > 0, "each is a Mixup/CutMix recipe"
    assert cfg.scheduler.warmup_epochs > 0


def test_imagenet_a3_preset_is_the_recipe(root: Path) -> None:
    cfg = compose_in(root, ["experiment=imagenet_resnet50_a3"])
    assert cfg.model.name == "resnet50" and cfg.data.image_size == [160, 160]
    assert cfg.optim._target_ == "timm.optim.Lamb" and cfg.optim.lr_base == pytest.approx(1e-3)
    assert (cfg.mixup.mixup_alpha, cfg.mixup.cutmix_alpha, cfg.trainer.max_epochs) == (0.1, 1.0, 100)


@pytest.mark.e2e
def test_cifar_resnet18_recipe_runs_reduced_on_digits(root: Path) -> None:
    """The CIFAR recipe as is (model, heavy aug, Mixup/CutMix, EMA, SGD + warm-up) for one short epoch; digits stand
    in for CIFAR-10, which this machine does not have."""
    done = run_cli(
        "pipeline.train",
        "experiment=cifar_resnet18",
        "data=digits",
        "data.image_size=[16,16]",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "scheduler.warmup_epochs=0.5",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        root=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(root)
    assert run.data.params["model.name"] == "classic_resnet18_cifar" and run.data.params["aug.name"] == "heavy"
    assert run.data.tags["checkpoint.weights"] == "ema"

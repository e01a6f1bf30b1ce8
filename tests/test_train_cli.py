"""`python -m pipeline.train` end to end: it trains, prints the result, and MLflow holds exactly that run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, clean_env, run_cli, store_uri
from tests.helpers.commands import FRESH, forked, run_module

pytestmark = pytest.mark.e2e

EPOCHS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("cli")
    done = run_cli("pipeline.train", f"trainer.max_epochs={EPOCHS}", "optim.lr=0.1", root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done.stdout


def test_cli_prints_metrics_run_id_and_ui_command(trained: tuple[Path, str]) -> None:
    root, stdout = trained
    accuracy = float(re.search(r"test/acc\s*│\s*([0-9.]+)", stdout).group(1))
    assert accuracy >= 0.85, f"{EPOCHS} epochs of LeNet-5 on digits should be well past chance: {accuracy}"
    assert re.search(r"MLflow run: [0-9a-f]{32}", stdout)
    assert re.search(r"MLflow model: models:/m-[0-9a-f]{32} \(also runs:/[0-9a-f]{32}/model\)", stdout)
    assert f"ui --backend-store-uri {store_uri(root)}" in stdout


def test_mlflow_holds_exactly_that_run_with_everything_logged(trained: tuple[Path, str]) -> None:
    root, stdout = trained
    client = mlflow.MlflowClient(store_uri(root))
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == re.search(r"MLflow run: ([0-9a-f]{32})", stdout).group(1)
    assert run.info.status == "FINISHED"
    # what it trains, what differs from the defaults (optim.lr), and a suffix that keeps equal configs apart
    assert re.fullmatch(r"lenet5-digits-affine epochs=6 lr=0\.1 #[0-9a-f]{4}", run.info.run_name), run.info.run_name

    params = run.data.params
    assert params["model.name"] == "lenet5"
    assert params["optim.lr"] == "0.1"
    assert params["trainer.max_epochs"] == str(EPOCHS)
    assert params["optim._target_"] == "torch.optim.SGD"

    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["mlflow.source.git.commit"])
    assert tags["git.dirty"] in {"true", "false", "unknown"}
    assert tags["command"] == f"python -m pipeline.train paths.root={root} progress=none " + (
        f"trainer.enable_model_summary=false trainer.max_epochs={EPOCHS} optim.lr=0.1"
    ), "the overrides typed, as a user would type them again"
    assert tags["mlflow.source.name"].endswith("pipeline/train.py") and tags["mlflow.user"]
    assert tags["model"] == "lenet5" and tags["dataset"] == "digits" and tags["host"]

    for metric in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "val/acc_top5", "lr-SGD"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == list(range(EPOCHS)), f"{metric}: one point per epoch, the epoch its step"
    assert "epoch" not in run.data.metrics, "the step is the epoch"
    val_acc = [m.value for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert max(val_acc) > val_acc[0], "validation accuracy improves with training"
    metrics = run.data.metrics
    assert metrics["test/acc"] >= 0.85 and 0 < metrics["test/f1"] <= 1
    assert metrics["model/params"] == 61706  # LeNet-5 with one input channel and ten classes
    assert metrics["model/flops"] > 0

    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=store_uri(root)))
    assert "model:\n  name: lenet5" in (artifacts / "config.yaml").read_text()
    with Image.open(artifacts / "figures" / "confusion_matrix.png") as figure:
        assert figure.format == "PNG" and figure.width > 100
    assert not (artifacts / "checkpoints").exists(), "the best weights are in the run's MLflow model"
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).source_run_id == run.info.run_id
    assert "train" in (artifacts / "data" / "class_counts.json").read_text()


def test_checkpoints_and_hydra_output_stay_in_one_folder(trained: tuple[Path, str]) -> None:
    root, _ = trained
    (output,) = list((root / "outputs").glob("*/*"))
    assert (output / ".hydra" / "config.yaml").exists()
    assert {p.name for p in (output / "checkpoints").iterdir()} >= {"last.ckpt"}
    assert any(p.name.startswith("best-") for p in (output / "checkpoints").iterdir())


def test_help_lists_groups_and_options(root: Path) -> None:
    done = run_cli("pipeline.train", "--help", root=root)
    assert done.returncode == 0
    for expected in ("optim: adam, adamw, lamb, sgd", "model:", "scheduler:", "Examples:"):
        assert expected in done.stdout


@pytest.mark.fresh_store
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim=rmsprop", "Could not find 'optim/rmsprop'. Available options in 'optim': adam, adamw, lamb, sgd"),
        ("optim.lr=-1", "optim.lr=-1: must be a number > 0"),
        ("model.name=lenet", "model.name='lenet' is not a known model. Close matches: lenet5"),
        ("+aug.train.HorizontalFlipp={p:0.5}", "unknown Albumentations transform 'HorizontalFlipp'"),
    ],
)
def test_bad_overrides_fail_before_training_with_a_clear_message(root: Path, override: str, message: str) -> None:
    done = run_cli("pipeline.train", override, root=root)
    assert done.returncode == 2
    assert "error: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"


@pytest.mark.fresh_store
@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Hydra's "not in struct" gets the close match; its "+optim.lrr" advice would fail in the optimizer.
        ("optim.lrr=0.1", "error: optim.lrr=0.1: optim has no key 'lrr'. Did you mean optim.lr?"),
        ("+optim.lrr=0.1", "optim.lrr: torch.optim.SGD takes no argument 'lrr'. Did you mean optim.lr?"),
        ("+trainer.max_epoch=3", "trainer.max_epoch: lightning.pytorch.Trainer takes no argument 'max_epoch'"),
        (
            "+model.kwargs.actt=relu",
            "model.kwargs.actt: lenet5 takes no argument 'actt'. Did you mean model.kwargs.act?",
        ),
        ("model.name=lenet", "model.name='lenet' is not a known model. Close matches: lenet5"),
        ("trainer.fast_dev_run=true", "lightning.pytorch.Trainer takes it: add it with +trainer.fast_dev_run=true"),
        (  # a callback is added by a name of the user's: the group lists none
            "callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
            "callbacks has no key 'swa'. To add a key it does not list: +callbacks.swa._target_=lightning.pytorch.",
        ),
        (
            "aug.train.HorizontalFlipp={}",
            "error: aug.train.HorizontalFlipp: unknown Albumentations transform 'HorizontalFlipp'. "
            "Did you mean HorizontalFlip?",
        ),
        ("+aug.train.Affine.rotat=5", "aug.train.Affine: Affine has no argument(s) ['rotat']"),
        ("seed=-1", "error: Invalid configuration: seed=-1: must be an integer in 0..4294967295 or null"),
        ("optim.lr=[", "error: optim.lr=[: no viable alternative at input '['"),
        (  # Lightning's own refusals came once the run was open, as tracebacks
            "trainer.accelerator=abacus",
            "error: trainer.accelerator='abacus': not an accelerator Lightning knows. Give one of auto, cpu, cuda,",
        ),
        ("trainer.devices=0", "error: Invalid configuration: trainer.devices=0: must be auto, -1 (every device), a"),
        ("trainer.accelerator=tpu", "error: trainer.accelerator=tpu: this machine has no TPU (torch_xla) that torch"),
        pytest.param(
            "trainer=gpu",
            "error: trainer.accelerator=gpu: this machine has no GPU (CUDA or MPS) that torch can use. Train on what",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
    ],
)
def test_mistakes_in_keys_and_values_stop_before_the_data_load(root: Path, override: str, message: str) -> None:
    # A data root that does not exist: had the data loaded first, its error would have come instead.
    done = run_cli("pipeline.train", override, "data=imagefolder", f"data.root={root}/none", root=root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, "one line: the problem and the fix"
    assert "To append to your config" not in done.stderr and "data.root" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"


@pytest.mark.fresh_store
@pytest.mark.parametrize("where", ["/proc/x", "under a file"])
def test_an_output_folder_that_cannot_be_written_names_the_key(root: Path, where: str) -> None:
    if where == "under a file":
        (root / "taken").write_text("a file where the folder would go")
        where = str(root / "taken" / "out")
    done = run_cli("pipeline.train", f"paths.output_dir={where}", root=root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: paths.output_dir={where}: cannot write there" in done.stderr
    assert "paths.root=<folder>" in done.stderr and "Traceback" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked for a run that cannot start"


def _as_lines(text: str, root: Path) -> set[str]:
    """The lines of a run's output with what differs between two runs (folder, ids, times, figures) masked."""
    text = re.sub(r"outputs/[^/\s]+/[^/\s]+", "outputs/<run>", text.replace(str(root), "<root>"))
    return {re.sub(r"[0-9a-f]{32}|\d+", "#", line).rstrip() for line in text.splitlines()}


def test_a_forked_training_prints_and_logs_what_a_new_interpreter_does(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's messages included: they reach the console and the run's log file as in a new interpreter (the
    preloaded process imports Lightning as a command does: tests/helpers/preload.py)."""
    short = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    said = {}
    for way in ("forked", "fresh"):
        if way == "fresh":
            monkeypatch.setenv(FRESH, "1")
        done = run_cli("pipeline.train", *short, "trainer.limit_test_batches=1", root=root / way)
        assert done.returncode == 0, done.stderr[-3000:]
        (log,) = (root / way).glob("outputs/*/*/train.log")
        said[way] = [_as_lines(text, root / way) for text in (done.stdout, done.stderr, log.read_text())]
    assert said["forked"] == said["fresh"]
    assert any(line.startswith("INFO: Restoring states from the checkpoint") for line in said["forked"][1])


def test_commands_stay_forked_after_the_test_process_has_used_the_libraries(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the libraries note in the environment for their own use must not send every later command to a new
    interpreter, which costs ~6 s of CPU a command and shows nowhere else (it did, unnoticed: after any test that
    imported Lightning, every command of that test worker started a new interpreter)."""
    import lightning  # sets PYTORCH_NVML_BASED_CUDA_CHECK=1 in this process's environment

    client = mlflow.MlflowClient(store_uri(root))
    client.create_run(client.create_experiment("used"))
    monkeypatch.setenv("_MLFLOW_TELEMETRY_SESSION_ID", "0123abcd")  # where MLflow's telemetry is on
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))  # once torch.compile has run here
    monkeypatch.setenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "1")
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # as a test that trains in its own process leaves them
        monkeypatch.setenv(name, "")
    lightning.seed_everything(3, workers=True, verbose=False)
    assert forked(clean_env()), "a command of the tests' usual environment is forked"
    assert forked(clean_env(AWS_ENDPOINT_URL="http://127.0.0.1:9", PYTHONPATH=str(root))), "read when used, or applied"
    assert not forked(clean_env(HF_HOME=str(root))), "one read at import time is not"


def test_a_forked_command_starts_as_a_new_interpreter_does(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a command's process starts with, beyond its output: its arguments as the interpreter saw them, where it
    runs, what signals it gets, and how it starts processes of its own (a forked command had inherited the
    forkserver's start method, so its DataLoader workers went through the test's preloaded server)."""
    arguments, env = ["paths.root=x", "--flag"], clean_env(PYTHONPATH=str(REPO))  # run elsewhere than the checkout
    forked = run_module("tests.helpers.process_facts", arguments, cwd=root, env=env, timeout=60)
    monkeypatch.setenv(FRESH, "1")
    fresh = run_module("tests.helpers.process_facts", arguments, cwd=root, env=env, timeout=60)
    assert forked.returncode == fresh.returncode == 0, forked.stderr[-3000:] + fresh.stderr[-3000:]
    assert json.loads(forked.stdout) == json.loads(fresh.stdout)
    assert json.loads(fresh.stdout)["multiprocessing start method"] is None, "Linux then forks"


@pytest.mark.parametrize(
    "arguments",
    [["optim.lr=-1"], ["model.name=lenet"], ["--help"], ["resume=nothing-of-the-sort"]],
    ids=["bad value", "unknown model", "help", "bad resume"],
)
def test_a_command_forked_from_the_preloaded_process_answers_as_a_new_interpreter_does(
    root: Path, monkeypatch: pytest.MonkeyPatch, arguments: list[str]
) -> None:
    """The suite forks its commands from a process that has imported the pipeline (tests/helpers/commands.py): that
    must change nothing a user sees: the output, the error and the exit status."""
    forked = run_cli("pipeline.train", *arguments, root=root)
    monkeypatch.setenv(FRESH, "1")
    fresh = run_cli("pipeline.train", *arguments, root=root)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.stdout + forked.stderr, "it said something"

"""Pretrained weights: every source loads offline into a new head and input layer, and every bad source stops the run
before training with a message that says what to do.

Sources: a .safetensors file, a torch state dict, a Lightning checkpoint of ours, an earlier run (runs:/<id>), and
timm's published weights from the local Hugging Face cache. Nothing here touches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import safetensors.torch
import timm
import torch

import pipeline.models  # noqa: F401  (registers ours)
from pipeline.models.factory import create_model
from pipeline.models.weights import WeightsError
from pipeline.run import build_inputs, run
from pipeline.tracking.checkpoints import local_weights
from tests.conftest import REPO, clean_env, compose_in, run_cli, store_uri

SMALL = ("model=timm", "model.name=test_resnet", "data.image_size=[32,32]")  # timm's 0.4 M-parameter ResNet
QUICK = (
    "trainer.max_epochs=1",
    "scheduler.warmup_epochs=0",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
)


def source_model(num_classes: int = 10, in_chans: int = 1) -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=num_classes, in_chans=in_chans)


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.startswith("conv1.0.")}


def load(weights: str | Path, num_classes: int, in_chans: int = 1, uri: str = "") -> torch.nn.Module:
    """`weights` into a fresh test_resnet, as run(cfg) loads model.weights (a run's checkpoint downloaded first)."""
    with local_weights(str(weights), uri, f"model.weights={weights}", WeightsError) as file:
        kwargs = {"num_classes": num_classes, "in_chans": in_chans, "weights_file": file}
        return create_model("test_resnet", pretrained=True, weights=str(weights), **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A real run of ours: (its best checkpoint, its MLflow run id, the store's URI)."""
    root = tmp_path_factory.mktemp("source")
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        result = run(compose_in(root, [*SMALL, *QUICK, "trainer.limit_test_batches=1", "model.pretrained=false"]))
    return Path(result.best_checkpoint), result.run_id, store_uri(root)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["safetensors", "state_dict"])
def test_saved_weights_load_into_a_new_head_with_the_backbone_intact(tmp_path: Path, form: str) -> None:
    source = source_model(num_classes=10)
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)

    model = load(path, num_classes=4)
    loaded, original = model.state_dict(), source.state_dict()
    for key, tensor in backbone(original).items():
        assert torch.equal(loaded[key], tensor), key
    assert torch.equal(loaded["conv1.0.weight"], original["conv1.0.weight"])
    assert model.fc.weight.shape == (4, model.num_features), "the head has the new class count"
    fresh = source_model(num_classes=4).fc.weight
    assert model.fc.weight.std().item() == pytest.approx(fresh.std().item(), rel=0.3), "re-initialised like a new head"
    assert not torch.equal(model.fc.weight, original["fc.weight"][:4])

    same = load(path, num_classes=10)  # timm's overlay gotcha: an equal class count keeps the trained head
    assert torch.equal(same.fc.weight, original["fc.weight"]) and torch.equal(same.fc.bias, original["fc.bias"])


def test_reset_head_starts_a_fitting_head_afresh_for_new_classes(tmp_path: Path) -> None:
    """model.reset_head: the same class count, other classes (digits 0–4 → 5–9) — the old head must not be kept."""
    source = source_model(num_classes=5)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    original = source.state_dict()

    torch.manual_seed(7)
    fresh = create_model("test_resnet", num_classes=5, in_chans=1, pretrained=False)
    torch.manual_seed(7)
    model = create_model("test_resnet", num_classes=5, in_chans=1, pretrained=True, weights=str(path), reset_head=True)
    loaded = model.state_dict()
    for key, tensor in backbone(original).items():
        assert torch.equal(loaded[key], tensor), key
    assert not torch.equal(model.fc.weight, original["fc.weight"]), "a fresh head, though the old one fits"
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias), "as created"


@pytest.mark.slow
def test_the_input_layer_is_adapted_to_the_channels_as_timm_does(tmp_path: Path) -> None:
    rgb = source_model(in_chans=3)
    path = tmp_path / "rgb.safetensors"
    safetensors.torch.save_file(rgb.state_dict(), path)
    gray = load(path, num_classes=10, in_chans=1)
    assert torch.allclose(gray.conv1[0].weight, rgb.conv1[0].weight.sum(dim=1, keepdim=True)), "RGB summed"

    path = tmp_path / "gray.safetensors"
    safetensors.torch.save_file(gray.state_dict(), path)
    back = load(path, num_classes=10, in_chans=3)
    assert torch.allclose(back.conv1[0].weight, gray.conv1[0].weight.repeat(1, 3, 1, 1) / 3), "gray repeated, scaled"


@pytest.mark.slow
def test_a_lightning_checkpoint_of_ours_and_its_run_both_load(trained: tuple[Path, str, str]) -> None:
    checkpoint, run_id, uri = trained
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    network = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert network, "ImageClassifier keeps the network under model."

    for source in (checkpoint, f"runs:/{run_id}"):
        model = load(source, num_classes=3, uri=uri)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in backbone(network).items()), source
        assert model.fc.weight.shape[0] == 3


@pytest.mark.slow
def test_runs_source_resolves_through_mlflow_in_a_full_run(root: Path, trained: tuple[Path, str, str]) -> None:
    """A run of ours seeds the next one: model.weights=runs:/<id> through run(cfg), recorded in the new run."""
    _, run_id, uri = trained
    weights = ["model.pretrained=true", f"model.weights=runs:/{run_id}", f"logger.tracking_uri={uri}"]
    result = run(compose_in(root, [*SMALL, *QUICK, "trainer.limit_test_batches=1", *weights, "data.classes=[1,2,3]"]))
    client = mlflow.MlflowClient(uri)
    params = client.get_run(result.run_id).data.params
    assert params["model.weights"] == f"runs:/{run_id}" and params["data.classes"] == "[1, 2, 3]"
    assert client.get_run(run_id).info.status == "FINISHED"


def runs_in(root: Path) -> int:
    if not (root / "mlruns" / "mlflow.db").exists():
        return 0
    client = mlflow.MlflowClient(store_uri(root))
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.slow
def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused(root: Path) -> None:
    marker = root / "code-ran"
    path = root / "trojan.ckpt"
    torch.save({"state_dict": source_model().state_dict(), "extra": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(WeightsError, match=r"refused.*arbitrary Python objects \(posix.mkdir\)") as error:
        run(compose_in(root, [*SMALL, *QUICK, "model.pretrained=true", f"model.weights={path}"]))
    assert "safetensors" in str(error.value) and not marker.exists(), "nothing was executed"
    assert runs_in(root) == 0, "the error comes before any MLflow run"


def test_weights_of_another_architecture_list_the_keys_beyond_the_head(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "resnet10t.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet10t", in_chans=1).state_dict(), path)
    with pytest.raises(WeightsError) as error:
        build_inputs(compose_in(root, [*SMALL, "model.pretrained=true", f"model.weights={path}"]))
    message = str(error.value)
    assert f"model.weights={path} does not fit test_resnet beyond its classifier (fc)" in message
    assert "missing from the weights: layer3.0.conv3.weight" in message  # resnet10t has basic blocks
    assert "of another shape: bn1.bias (64,) in the weights, (32,) in the model" in message
    assert "fc.weight" not in message, "the head is expected to differ"
    assert "same model.name and model.kwargs" in message


MISSING_RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.slow
@pytest.mark.fresh_store  # "here" is a project folder without a store
@pytest.mark.parametrize(
    ("weights", "store", "message"),
    [
        ("/nowhere/w.safetensors", "here", "model.weights=/nowhere/w.safetensors: no such file"),
        (f"runs:/{MISSING_RUN}", "here", f"model.weights=runs:/{MISSING_RUN}: there is no MLflow store at sqlite:///"),
        (f"runs:/{MISSING_RUN}", "the source's", f"no run '{MISSING_RUN}' in sqlite:///"),
    ],
    ids=["file", "store", "run"],
)
def test_a_missing_source_is_named_with_the_fix(
    root: Path, trained: tuple[Path, str, str], weights: str, store: str, message: str
) -> None:
    uri = trained[2] if store == "the source's" else store_uri(root)
    with pytest.raises(WeightsError) as error:
        run(
            compose_in(
                root, [*SMALL, "model.pretrained=true", f"model.weights={weights}", f"logger.tracking_uri={uri}"]
            )
        )
    assert message in str(error.value)
    assert "logger.tracking_uri" in str(error.value) or "no such file" in str(error.value)
    assert runs_in(root) == 0


def test_our_models_have_no_published_weights(root: Path) -> None:
    with pytest.raises(WeightsError, match=r"model.name=lenet5 has no published pretrained weights.*model.weights="):
        build_inputs(compose_in(root, ["model=lenet5", "model.pretrained=true"]))


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", **extra)


OFFLINE_CHECK = """
import time, pipeline.models
from pipeline.models.factory import create_model
from pipeline.models.weights import WeightsError
start = time.monotonic()
try:
    create_model("resnet18", num_classes=10, in_chans=1, pretrained=True)
except WeightsError as error:
    print(f"{time.monotonic() - start:.2f}", error)
"""


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("env", "reason"),
    [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"), ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached")],
    ids=["HF_HUB_OFFLINE", "unreachable"],
)
def test_pretrained_offline_without_local_weights_fails_at_once_saying_how(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    done = python(OFFLINE_CHECK, offline_env(tmp_path, **env))
    seconds, message = done.stdout.strip().split(" ", 1)
    assert float(seconds) < 5, f"answered in {seconds} s: no download retries (timm alone waits ~46 s)"
    assert "the published weights of resnet18 (timm/resnet18.a1_in1k) are not in the local cache" in message
    assert reason in message
    assert "model.weights=<file>" in message and "model.pretrained=false" in message


@pytest.mark.e2e
def test_the_offline_error_reaches_the_user_before_any_run(root: Path) -> None:
    done = run_cli("pipeline.train", "model=resnet18", root=root, env=offline_env(root, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith("error: model.pretrained=true: the published weights of resnet18")
    assert runs_in(root) == 0


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


CACHED_HUB_LOAD = """
import time, timm, torch, pipeline.models
from pipeline.models.factory import create_model
start = time.monotonic()
model = create_model("test_resnet", num_classes=5, in_chans=1, pretrained=True)
seconds = time.monotonic() - start
published = timm.models.load_state_dict({path!r})
assert torch.equal(model.layer1[0].conv1.weight, published["layer1.0.conv1.weight"])
assert torch.allclose(model.conv1[0].weight, published["conv1.0.weight"].sum(dim=1, keepdim=True))
assert model.fc.weight.shape[0] == 5
print(f"loaded from the cache in {{seconds:.2f}} s")
"""


@pytest.mark.e2e
def test_published_weights_load_offline_from_the_hub_cache(tmp_path: Path) -> None:
    """What an online machine leaves in ~/.cache/huggingface is enough: timm adapts the input layer and the head."""
    snapshot = tmp_path / "hf/hub/models--timm--test_resnet.r160_in1k/snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    published = snapshot / "model.safetensors"
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), published)
    code = CACHED_HUB_LOAD.format(path=str(published))
    env = offline_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # the cache, not the network, must serve it
    assert "loaded from the cache" in python(code, env).stdout

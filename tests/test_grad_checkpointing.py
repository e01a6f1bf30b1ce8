"""perf.grad_checkpointing: the run's model recomputes activations in the backward pass, ours and timm's alike, with
the same gradients; a model that cannot is named before anything trains. (Each of our models' own checkpointing is
checked in tests/test_models_timm_contract.py; what it saves is measured in benchmarks/grad_checkpointing.py.)"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch

from pipeline.errors import UserInputError
from pipeline.module import ImageClassifier
from pipeline.run import run
from tests.conftest import compose_in


class Seen(L.Callback):
    """What the model trained with: its checkpointing switch at the first step."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.checkpointing = pl_module.model.grad_checkpointing


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model=lenet5", "model=timm model.name=test_resnet model.pretrained=false"])
def test_a_run_trains_with_checkpointing_on(root: Path, model: str) -> None:
    seen = Seen()
    result = run(
        compose_in(
            root,
            [
                *model.split(),
                "data.image_size=[32,32]",
                "perf.grad_checkpointing=true",
                "trainer.max_epochs=1",
                "scheduler.warmup_epochs=0",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
            ],
        ),
        callbacks=[seen],
    )
    assert seen.checkpointing is True
    assert np.isfinite(result.metrics["test/loss"])


def test_a_timm_model_gets_the_same_gradients_with_it() -> None:
    x = torch.randn(2, 3, 32, 32)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=3)
        ImageClassifier(model, 3, optimizer=torch.optim.SGD, scheduler=None, grad_checkpointing=checkpointing)
        assert model.grad_checkpointing is checkpointing
        model(x).square().mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_without_it_is_named_with_the_fix() -> None:
    with torch.device("meta"):
        vgg = timm.create_model("vgg11", num_classes=3)  # timm's VGG asserts it has no checkpointing
    with pytest.raises(UserInputError, match=r"perf\.grad_checkpointing=true: vgg11 does not support .*=false"):
        ImageClassifier(vgg, 3, optimizer=torch.optim.SGD, scheduler=None, grad_checkpointing=True)
    with pytest.raises(UserInputError, match="Sequential does not support"):
        ImageClassifier(torch.nn.Sequential(), 3, optimizer=torch.optim.SGD, scheduler=None, grad_checkpointing=True)

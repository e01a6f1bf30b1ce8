"""Loader workers hand over uint8 batches, each on one thread; the training device normalises them (channels-last when
asked), and so do evaluation and the served model's classifier; the default worker count follows the CPUs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.data import workers
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.images import ImageSet, ImageSplits
from pipeline.data.normalize import Normalize
from pipeline.data.transforms import InputSpec, eval_transform, train_transform
from pipeline.inference import Classifier
from pipeline.module import ImageClassifier

SPEC = InputSpec((16, 16), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def splits(count: int = 8) -> ImageSplits:
    rng = np.random.default_rng(0)
    part = ImageSet(rng.integers(0, 256, (count, 20, 24, 3), dtype=np.uint8), np.arange(count) % 2)
    return ImageSplits(part, part, part, ["a", "b"])


def datamodule(workers: int) -> ImageDataModule:
    return ImageDataModule(splits(), train_transform({}, SPEC, 0), eval_transform(SPEC), 4, workers, False, False, None)


def reference(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return (images.double() / 255 - mean) / std


def test_batches_are_uint8_and_the_module_normalises_them_on_its_device() -> None:
    images, _ = next(iter(datamodule(0).val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    for channels_last in (False, True):
        module = ImageClassifier(
            nn.Identity(), 2, optimizer=None, scheduler=None, normalize=Normalize(SPEC.mean, SPEC.std, channels_last)
        )
        prepared = module.prepare(images)
        assert prepared.dtype == torch.float32
        assert torch.allclose(prepared.double(), reference(images), atol=1e-5)
        assert prepared.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert module.prepare(prepared) is prepared, "a float batch is left alone"
    assert "normalize.scale" not in module.state_dict(), "checkpoints hold the network's weights only"
    with pytest.raises(TypeError, match="uint8 batch and no normalize"):
        ImageClassifier(nn.Identity(), 2, optimizer=None, scheduler=None).prepare(images)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_network_of_another_precision_gets_its_batch_in_its_own_dtype(dtype: torch.dtype) -> None:
    """trainer.precision=bf16-true or 64-true: the network's weights are of that dtype, and so is what it is given."""
    images, _ = next(iter(datamodule(0).val_dataloader()))
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    module = ImageClassifier(network, 2, optimizer=None, scheduler=None, normalize=Normalize(SPEC.mean, SPEC.std))
    module(module.prepare(images))  # materialises the lazy layer
    module.to(dtype)
    logits = module(module.prepare(images))
    assert module.prepare(images).dtype == dtype and logits.dtype == dtype


class Threads(Dataset):
    """Each item: the torch and OpenCV thread counts of the process that loads it."""

    labels = np.zeros(4, dtype=np.int64)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.array([torch.get_num_threads(), cv2.getNumThreads()]), 0


def test_each_loader_worker_runs_one_thread_for_torch_and_opencv() -> None:
    module = datamodule(2)
    loader = module._loader(Threads(), lambda image: {"image": torch.from_numpy(image)}, train=False)
    threads = torch.cat([counts for counts, _ in loader])
    assert threads.shape == (4, 2) and set(threads.flatten().tolist()) == {1}


def test_the_default_worker_count_follows_the_cpus_without_a_cap(monkeypatch: object) -> None:
    for cpus, expected in ((1, 0), (2, 1), (16, 15), (96, 95)):
        monkeypatch.setattr(workers, "available_cpus", lambda cpus=cpus: cpus)
        assert workers.loader_workers() == expected


def test_the_served_classifier_normalises_as_training_does() -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    classifier = Classifier(network, SPEC, ["a", "b"], 3)
    image = splits().train.images[0]
    prepared = classifier.transform(image=image)["image"]
    assert prepared.dtype == torch.uint8
    expected = torch.softmax(network(reference(prepared[None]).float()), dim=1)
    assert torch.allclose(classifier.probabilities([prepared]), expected, atol=1e-6)

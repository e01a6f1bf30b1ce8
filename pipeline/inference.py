"""From images to class probabilities: the one path that `pipeline.predict` and the served MLflow model share.

No Lightning and no MLflow: the network in eval mode, the run's evaluation transform (resize or resize + centre crop,
to uint8), the normalisation training used on its device (pipeline.data.normalize) and a softmax. An image is a file
path or the bytes of an image file (PNG, JPEG, anything Pillow reads); it is decoded exactly as training decoded its
validation and test files (pipeline.data.decode: in full, EXIF orientation, alpha on white, the run's channel count).
Images go through the network in batches of `batch_size` in the order given, leaving out the ones that could not be
decoded, so the same images in the same order give the same numbers to the last bit wherever they are classified.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data.decode import decode_image
from pipeline.data.normalize import Normalize
from pipeline.data.transforms import InputSpec, eval_transform

ImageInput = str | Path | bytes  # a file, or the encoded bytes of one


class EncodedImage(io.BytesIO):
    """An image file's bytes, read like a file; errors name it by its size (Pillow would print the object's address)."""

    def __repr__(self) -> str:
        return f"<{len(self.getbuffer())} bytes>"


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything but the weights that turns a trained network back into a classifier of images: JSON-able, so a
    logged model carries it as a file beside its weights."""

    model_name: str  # a name in timm's registry (ours are registered when pipeline.models is imported)
    model_kwargs: dict[str, Any]
    classes: list[str]  # in the order of the network's outputs
    channels: int  # input channels the network was trained on
    input: InputSpec  # the run's evaluation preprocessing

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClassifierSpec:
        fields = json.loads(text)
        spec = fields.pop("input")
        spec["size"] = tuple(spec["size"])
        spec["mean"], spec["std"] = tuple(spec["mean"]), tuple(spec["std"])
        return cls(**fields, input=InputSpec(**spec))


@dataclass(frozen=True)
class Outcome:
    """One image's result: the probability of every class (in the classifier's class order), or why it failed."""

    probabilities: torch.Tensor | None = None  # float32, one value per class
    error: str = ""


class Classifier:
    """A trained network with the preprocessing of its run. Build it with `Classifier(...)` from a network in hand, or
    `Classifier.build(spec, weights)` from a spec and a state dict."""

    def __init__(
        self,
        network: nn.Module,
        spec: InputSpec,
        classes: Sequence[str],
        channels: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)
        self.transform = eval_transform(spec)
        self.normalize = Normalize(spec.mean, spec.std).to(self.device)
        self.classes = list(classes)
        self.channels = channels

    @classmethod
    def build(
        cls, spec: ClassifierSpec, weights: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> Classifier:
        """The network of `spec` with `weights`, which must fit it exactly (every tensor, by name and shape)."""
        import pipeline.models  # noqa: F401  (registers ours into timm)
        from pipeline.models.factory import create_model

        network = create_model(
            spec.model_name,
            num_classes=len(spec.classes),
            in_chans=spec.channels,
            pretrained=False,
            kwargs=spec.model_kwargs,
        )
        network.load_state_dict(dict(weights), strict=True)
        return cls(network, spec.input, spec.classes, spec.channels, device)

    def prepare(self, image: ImageInput) -> torch.Tensor:
        """One image, decoded and transformed into the network's input. Raises whatever decoding raises."""
        source = EncodedImage(image) if isinstance(image, bytes | bytearray | memoryview) else image
        return self.transform(image=decode_image(source, self.channels))["image"]

    def probabilities(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Softmax of the network's outputs for a batch of prepared images: (N, classes), float32 on the CPU."""
        with torch.inference_mode():
            output = self.network(self.normalize(torch.stack(list(batch)).to(self.device)))
            return torch.softmax(output.float(), dim=1).cpu()

    def classify(self, images: Iterable[ImageInput], batch_size: int = 64) -> list[Outcome]:
        """An Outcome per image, in order. An image that cannot be decoded gets its error; the others are classified
        in batches of `batch_size`."""
        outcomes: list[Outcome | None] = []
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                for (index, _), row in zip(pending, self.probabilities([t for _, t in pending]), strict=True):
                    outcomes[index] = Outcome(row)
                pending.clear()

        for image in images:
            outcomes.append(None)
            try:
                pending.append((len(outcomes) - 1, self.prepare(image)))
            except Exception as error:  # unreadable, not an image, truncated, empty: reported in its row
                outcomes[-1] = Outcome(error=f"{type(error).__name__}: {error}")
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
        return [outcome for outcome in outcomes if outcome is not None]

    def top(self, probabilities: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The `k` most likely classes and their probabilities, most likely first."""
        values, indices = probabilities.topk(min(k, len(self.classes)))
        return [(self.classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]

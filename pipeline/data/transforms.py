"""Albumentations pipelines built from config.

An augmentation is declared in YAML as an ordered mapping of transform name → keyword arguments:

    train:
      RandomResizedCrop: {size: null, scale: [0.7, 1.0]}   # size null = the model's input size
      HorizontalFlip: {p: 0.5}
      warp:                                              # a label; `transform` names the class
        transform: OneOf
        p: 0.3
        transforms: {ElasticTransform: {}, GridDistortion: {}}

A value of null switches an entry off (`aug.train.HorizontalFlip=null`). Every pipeline ends with the
same deterministic tail: resize to the model's input size, convert to a uint8 CHW tensor. Batches cross from the
loader workers as uint8 (a quarter of float32's bytes, and collated 5× faster); they are converted to float and
normalised on the training device (pipeline.data.normalize).

JPEG draft decoding (`draft_scale`): when the pipeline starts by resampling the whole image to a size of its own —
RandomResizedCrop, Resize, SmallestMaxSize, LongestMaxSize, or nothing before the tail's Resize — a large JPEG may be
decoded at 1/2, 1/4 or 1/8 of its size, as long as what that first step takes still has at least as many pixels as
it resamples to. The model then sees the same image but for resampling noise (tests/test_data_decoding.py). Any other
first step (a crop of fixed pixels, a blur of a pixel radius, …) sees the image at full size.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np

from pipeline.data.augmentations import FASTER, Resize
from pipeline.errors import UserInputError

SIZE_KEYS = ("size", "height", "width")
# Colour transforms on grayscale images apply what they can (brightness) and warn about the rest on every call.
warnings.filterwarnings("ignore", message=".*not applicable to grayscale", category=UserWarning)
# A decoded image is NumPy's read-only view of Pillow's bytes (pipeline.data.decode: one copy, not two). When no step
# resamples it (already at the input size), ToTensorV2 wraps that view: the tensor is only read (collated into a new
# batch), so PyTorch's warning about tensors over read-only arrays does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


class AugmentationError(UserInputError):
    """A transform in the augmentation config cannot be built."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, handed to data code as plain values."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def resolve(
        cls,
        model_config: Mapping[str, Any],
        image_size: Sequence[int] | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        channels: int,
    ) -> InputSpec:
        """The model's data config (timm's resolve_model_data_config), overridden where the data config says.

        Mean and std given for another channel count are adapted: averaged to one channel, or repeated.
        """
        _, height, width = model_config["input_size"]
        return cls(
            size=tuple(image_size) if image_size else (int(height), int(width)),
            channels=channels,
            mean=_per_channel(mean if mean is not None else model_config["mean"], channels),
            std=_per_channel(std if std is not None else model_config["std"], channels),
            interpolation=str(model_config.get("interpolation", "bilinear")),
            crop_pct=float(model_config.get("crop_pct", 1.0)),
        )


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    raise ValueError(f"{len(values)} normalization values cannot be applied to {channels}-channel images")


def transform_class(name: str, where: str) -> type[A.BasicTransform] | type[A.BaseCompose]:
    """Albumentations' class `name`, or our faster equivalent of it (pipeline.data.augmentations)."""
    cls = FASTER.get(name) or getattr(A, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        known = [n for n in dir(A) if inspect.isclass(getattr(A, n)) and n[0].isupper()]
        hint = difflib.get_close_matches(name, known, n=3)
        suggestion = f" Did you mean {', '.join(hint)}?" if hint else ""
        raise AugmentationError(
            f"{where}: unknown Albumentations transform {name!r}.{suggestion} "
            "Use a class name from albumentations (https://albumentations.ai/docs/)."
        )
    return cls


def _check_arguments(cls: type, kwargs: Mapping[str, Any], where: str) -> None:
    # Albumentations only warns about unknown arguments; a typo would silently do nothing.
    parameters = inspect.signature(cls.__init__).parameters
    allowed = {n for n, p in parameters.items() if p.kind is not p.VAR_KEYWORD} - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise AugmentationError(f"{where}: {cls.__name__} has no argument(s) {unknown}; it takes {sorted(allowed)}.")


def _build_one(label: str, options: Mapping[str, Any], spec: InputSpec, where: str) -> Any:
    kwargs = dict(options)
    name = kwargs.pop("transform", label)
    where = f"{where}.{label}"
    cls = transform_class(name, where)
    if "transforms" in kwargs:
        kwargs["transforms"] = build_transforms(kwargs["transforms"], spec, where=f"{where}.transforms")
    for key in SIZE_KEYS:
        if key in kwargs and kwargs[key] is None:
            kwargs[key] = spec.size if key == "size" else spec.size[0 if key == "height" else 1]
    _check_arguments(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise AugmentationError(f"{where}: bad arguments for {name}: {_one_line(error)}") from error


def _one_line(error: Exception) -> str:
    """Albumentations' pydantic messages span several lines and end in a link; keep the facts on one line."""
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("For further information"))


def build_transforms(entries: Mapping[str, Any] | None, spec: InputSpec, where: str = "aug.train") -> list[Any]:
    """The configured transforms, in order; entries set to null are skipped."""
    transforms = []
    for label, options in (entries or {}).items():
        if options is None:
            continue
        if not isinstance(options, Mapping):
            raise AugmentationError(f"{where}.{label}: expected a mapping of arguments, got {options!r}")
        transforms.append(_build_one(str(label), options, spec, where))
    return transforms


def _finish(spec: InputSpec) -> list[Any]:
    """Resize to the input size and hand over uint8 CHW: normalisation happens on the training device."""
    return [Resize(*spec.size, interpolation=INTERPOLATIONS[spec.interpolation]), A.ToTensorV2()]


def train_transform(entries: Mapping[str, Any] | None, spec: InputSpec, seed: int | None) -> A.Compose:
    """Random transforms from config, then the common tail. Albumentations draws from its own generator,
    seeded here (global seeding does not reach it); loader workers reseed it (see data.datamodule)."""
    return A.Compose([*build_transforms(entries, spec), *_finish(spec)], seed=seed)


def eval_transform(spec: InputSpec) -> A.Compose:
    """Deterministic: resize the shorter side to size / crop_pct, centre-crop, then the common tail."""
    steps: list[Any] = []
    if spec.crop_pct < 1.0:
        steps = [
            A.SmallestMaxSize(
                max_size=round(min(spec.size) / spec.crop_pct),
                interpolation=INTERPOLATIONS[spec.interpolation],
            ),
            A.CenterCrop(*spec.size),
        ]
    return A.Compose([*steps, *_finish(spec)])


# Images held in memory (digits, MNIST, CIFAR) are resized once, before the first epoch, when their pipeline starts with
# a Resize that always applies; up to this many bytes of resized images, beyond which (CIFAR-10 at 224×224: 7.5 GB)
# each image is resized when it is drawn, as files are.
RESIZE_IN_ADVANCE_BYTES = 256 * 2**20


def resized_in_advance(images: np.ndarray, transform: Any) -> np.ndarray | None:
    """`images` (N, H, W, C) through `transform`'s first step, when that is a Resize that passes images already at
    its size through (pipeline.data.augmentations.Resize, as every pipeline built here has) and the result fits in
    RESIZE_IN_ADVANCE_BYTES; None otherwise. The pipeline then gives the same output for the resized images as for
    the originals: a step that always applies draws nothing from its generator, and each step has its own."""
    first = transform.transforms[0] if isinstance(transform, A.Compose) and transform.transforms else None
    if not (isinstance(first, Resize) and first.p >= 1.0):
        return None
    count, _, _, channels = images.shape
    if count * first.height * first.width * channels > RESIZE_IN_ADVANCE_BYTES:
        return None
    resized = np.empty((count, first.height, first.width, channels), dtype=images.dtype)
    for index, image in enumerate(images):
        resized[index] = first(image=np.ascontiguousarray(image))["image"].reshape(resized.shape[1:])
    return resized


def _whole(transform: Any) -> bool:
    return getattr(transform, "p", 1.0) >= 1.0  # a step that may be skipped leaves the next one the full image


# The scales below are small classes rather than closures: a loader worker started by spawning (macOS, Windows)
# receives its dataset pickled, and a closure does not pickle.


@dataclass(frozen=True)
class ResizeScale:
    """A resize of the whole image to `width` × `height`: each side keeps at least the output's pixels."""

    width: int
    height: int

    def __call__(self, width: int, height: int) -> float:
        return max(self.width / width, self.height / height)


@dataclass(frozen=True)
class SideScale:
    """A resize of the shortest (`shortest`) or longest side to `size`."""

    size: int
    shortest: bool

    def __call__(self, width: int, height: int) -> float:
        return self.size / (min(width, height) if self.shortest else max(width, height))


@dataclass(frozen=True)
class CropScale:
    """A random crop of at least `area` of the image, of aspect ratio (width / height) `low` to `high`, resized to
    `width` × `height`. A crop of area a and ratio r is sqrt(a·r) wide and sqrt(a/r) tall: narrowest at the lowest
    ratio, shortest at the highest. The smallest crops must keep at least the output's pixels on both sides."""

    width: int
    height: int
    area: float
    low: float
    high: float

    def __call__(self, width: int, height: int) -> float:
        least = self.area * width * height
        return max(self.width / math.sqrt(least * self.low), self.height / math.sqrt(least / self.high))


def draft_scale(transform: A.Compose) -> Callable[[int, int], float] | None:
    """For a pipeline built here, the smallest scale an image of (width, height) may be decoded at (see the module's
    docstring); None when its first step needs the image at full size."""
    first = transform.transforms[0] if transform.transforms else None
    if not _whole(first):
        return None
    if isinstance(first, A.RandomResizedCrop):
        (height, width), (low, high) = first.size, first.ratio
        return CropScale(width, height, first.scale[0], low, high)
    if isinstance(first, A.Resize):
        return ResizeScale(first.width, first.height)
    if isinstance(first, A.SmallestMaxSize | A.LongestMaxSize) and isinstance(first.max_size, int):
        return SideScale(first.max_size, shortest=isinstance(first, A.SmallestMaxSize))
    return None

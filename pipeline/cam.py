"""Class-activation figures: where in an image the model found the class it predicted.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization"):
take the maps of the model's last feature level (timm's `forward_intermediates`), weight each channel by the mean
gradient of the predicted class's logit over it, sum, keep the positive part, and upsample to the image. It needs
nothing but timm's model contract, so it works for ours and for timm's models alike.

Where a model's last intermediate is a new tensor rather than one its logits are computed from (timm's ViTs and
Swin lay their tokens out as NCHW maps after the forward pass), the gradient is taken at the output of the module
`feature_info` names for that level instead, and laid out like the map: NHWC maps are permuted, token sequences
lose their leading class/distillation tokens and are folded into the grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.images import LabelledImages
from pipeline.data.normalize import Normalize
from pipeline.data.transforms import InputSpec, eval_transform

log = logging.getLogger(__name__)


def _as_map(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` laid out as NCHW maps of `shape` (see the module's docstring), or None when it cannot be."""
    batch, channels, height, width = shape
    if tensor.shape == shape:
        return tensor
    if tensor.ndim == 4 and tensor.shape == (batch, height, width, channels):
        return tensor.permute(0, 3, 1, 2)
    if (
        tensor.ndim == 3
        and tensor.shape[0] == batch
        and tensor.shape[2] == channels
        and tensor.shape[1] >= height * width
    ):
        return tensor[:, -height * width :].reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return None


def grad_cam(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(heat maps (B, H, W) in [0, 1] at the images' size, logits (B, classes)) for the predicted classes.

    The model is run in eval mode (restored after) and its parameters' gradients are left untouched."""
    info = model.feature_info
    info = getattr(info, "info", info)  # a FeatureInfo, or timm's plain list of dicts
    module = model.get_submodule(info[-1]["module"])
    outputs: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # The images require a gradient so the graph exists even where every parameter is frozen (linear probe).
            images = images.detach().requires_grad_(True)
            final, (maps,) = model.forward_intermediates(images, indices=1)
            logits = model.forward_head(final)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            candidates = [maps, *outputs[:1]]  # the first call is the forward pass (checkpointing may call again)
            gradients = torch.autograd.grad(score, candidates, allow_unused=True)
    finally:
        hook.remove()
        model.train(was_training)
    gradient = gradients[0]
    if gradient is None:  # the map is not on the way to the logits: use the module's output, laid out as the map
        laid_out = [_as_map(t, maps.shape) for t in (candidates[-1], gradients[-1])] if len(candidates) > 1 else []
        if len(laid_out) != 2 or laid_out[0] is None or laid_out[1] is None:
            raise ValueError(
                f"Grad-CAM: the last feature level of {type(model).__name__} ({info[-1]['module']}) is not on the way "
                f"to its logits, and that module's output cannot be laid out as its {tuple(maps.shape)} maps"
            )
        maps, gradient = laid_out
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # one weight per channel: its mean gradient
    heat = torch.relu((weights * maps).sum(1, keepdim=True)).detach()
    heat = nn.functional.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = heat.flatten(1).amax(1)[:, None, None]
    # Each map scaled to peak at 1, however small its values (an untrained GoogLeNet's are ~1e-12); all-zero stays 0.
    return (heat / torch.where(peak > 0, peak, 1.0)).cpu(), logits.detach().cpu()


def pick(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over `total` items: image folders list their files class by class."""
    return sorted({round(i) for i in np.linspace(0, total - 1, min(count, total))}) if count > 0 and total else []


def class_activation_png(
    model: nn.Module,
    images: LabelledImages,
    spec: InputSpec,
    classes: Sequence[str],
    count: int,
    path: Path,
    title: str,
) -> Path | None:
    """A figure of `count` of `images` (spread over the set) as the model sees them, each under the Grad-CAM heat map
    of its predicted class, titled with the true and the predicted class. None when `count` is 0 or no images, or
    when the model lacks what Grad-CAM needs (said in a warning: a figure never fails a finished run)."""
    indices = pick(count, len(images))
    if not indices:
        return None
    try:
        return _draw(model, images, spec, classes, indices, path, title)
    except (AttributeError, NotImplementedError, ValueError) as error:  # no feature_info / forward_intermediates, …
        log.warning("%s not drawn: %s (class_activation.images=0 leaves it out)", path.name, error)
        return None


def _draw(
    model: nn.Module,
    images: LabelledImages,
    spec: InputSpec,
    classes: Sequence[str],
    indices: list[int],
    path: Path,
    title: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transform = eval_transform(spec)
    samples = [images[i] for i in indices]
    batch = torch.stack([transform(image=np.ascontiguousarray(image))["image"] for image, _ in samples])
    device = next(model.parameters()).device
    heat, logits = grad_cam(model, Normalize(spec.mean, spec.std).to(device)(batch.to(device)))
    predicted = logits.argmax(1).tolist()
    # The image the model was given, before its normalisation (resized and cropped like the test images).
    shown = (batch.float() / 255).permute(0, 2, 3, 1).numpy()

    columns = min(4, len(indices))
    rows = -(-len(indices) // columns)
    # Constrained layout keeps every title (two lines each, and the figure's) clear of the images.
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.8 * columns, 3.0 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, (_, label), guess, cam in zip(axes.flat, shown, samples, predicted, heat.numpy(), strict=False):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(
            f"true: {classes[label]}\npredicted: {classes[guess]}",
            fontsize=9,
            color="darkgreen" if guess == label else "firebrick",
        )
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

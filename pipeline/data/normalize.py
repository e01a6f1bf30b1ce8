"""Loader batches → the network's input, on the training device: uint8 (N, C, H, W) to float32, scaled and shifted
by the input spec's mean and std, in the memory format the network runs in, in one pass.

The loader workers hand over uint8 (pipeline.data.transforms), so a batch crosses processes and the host→device copy
at a quarter of float32's bytes; this step costs a GPU microseconds. Training, validation and testing (the
LightningModule's steps, before Mixup), `pipeline.evaluate`, Grad-CAM figures and the served model
(pipeline.inference) all go through this one module, so they compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MAX_PIXEL = 255.0


class Normalize(nn.Module):
    """(x / 255 − mean) / std per channel, as x · scale + shift; channels-last output when `channels_last`. A float
    batch is taken as already prepared and returned as it is. Its buffers are not saved in checkpoints."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (1.0 / (MAX_PIXEL * std_t)).float(), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).float(), persistent=False)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        layout = torch.channels_last if self.channels_last and images.dim() == 4 else torch.contiguous_format
        prepared = images.to(dtype=torch.float32, memory_format=layout)
        return prepared.mul_(self.scale).add_(self.shift)

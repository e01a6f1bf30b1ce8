"""What timm's feature API asks of a network whose feature levels are layers of one `nn.Sequential` (`features`):
LeNet-5 and NiN. `forward_intermediates`, `forward_features` (with gradient checkpointing) and the slicing of
`prune_intermediate_layers` are the same for both, so they live here; each network keeps what is its own (its head,
how pruning changes it).

`feature_take_indices` is timm's own reading of `indices` (None: all levels; an int n: the last n; a list: those,
negative from the end). timm does not export it: it is private (`timm.models._features`), and this module is the one
place that imports it, so every model reads `indices` as timm's models do; tests/test_internals.py fails loudly when
a timm upgrade moves or changes it. (pipeline/internals.py holds the other private names; it imports Lightning,
which the models must not.)
"""

from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["SequentialFeatures", "feature_take_indices"]


class SequentialFeatures(nn.Module):
    """Feature levels at the layers `feature_ends` (indices into `features`) of the `features` sequence. A subclass
    sets `features` (an nn.Sequential), `feature_info`, `feature_ends`, `grad_checkpointing` and `head`; they are not
    annotated here because TorchScript reads a module class's annotations as its attribute types."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The final features and the feature maps at `indices` of `feature_info` (an int n: the last n; None:
        all). `stop_early` skips the layers after the last feature asked for; `norm` does nothing (no final norm)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        take_ends = [self.feature_ends[i] for i in take_indices]
        layers = self.features[: self.feature_ends[max_index] + 1] if stop_early else self.features
        for index, layer in enumerate(layers):
            x = layer(x)
            if index in take_ends:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_features(self, indices: int | list[int]) -> tuple[list[int], int]:
        """Drop the layers after the last feature level at `indices`; returns timm's (indices kept, last index)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.features = self.features[: self.feature_ends[max_index] + 1]
        return take_indices, max_index

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

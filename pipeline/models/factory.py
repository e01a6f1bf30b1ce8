"""One factory for every model: ours (registered when the pipeline.models package is imported) and timm's.

With `pretrained=True` the weights come from `weights` when it is given (a file, or a run's checkpoint the caller
downloaded, see pipeline.models.weights), otherwise from the model's published weights through timm. `reset_head`
keeps the classifier freshly initialised even where the weights' one fits (model.reset_head: fine-tuning for new
classes).
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from torch import nn

from pipeline.errors import UserInputError


class ModelError(UserInputError):
    """The configured model cannot be built."""


def _unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ModelError(
        f"model.name={name!r} is not a known model.{hint} List them all with: python -m pipeline.inspect --list"
    )


def check_model(name: str, kwargs: Mapping[str, Any] | None) -> None:
    """Raise ModelError for an unknown model.name, or a model.kwargs key the model does not take, before any data is
    loaded: the model is built with the same arguments on the meta device (no memory, no weights, milliseconds)."""
    import torch

    if not timm.is_model(name):
        raise _unknown_model(name)
    if not kwargs:
        return
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **dict(kwargs))
    except TypeError as error:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if found is None:
            return  # building it for real says what is wrong
        key = found.group(1)
        raise ModelError(
            f"model.kwargs.{key}: {name} takes no argument {key!r}.{_close_arguments(name, key)}"
        ) from None
    except Exception:  # some models cannot be built on the meta device (e.g. they read a tensor's value)
        return


def _close_arguments(name: str, key: str) -> str:
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return ""
    accepted = [p for p in inspect.signature(type(model).__init__).parameters if p not in ("self", "kwargs")]
    close = difflib.get_close_matches(key, accepted, n=3)
    return f" Did you mean {' or '.join(f'model.kwargs.{c}' for c in close)}?" if close else ""


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    weights: str | None = None,
    weights_file: Path | None = None,
    reset_head: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """`weights`: model.weights as the user gave it; `weights_file`: where those weights are on disk when that is not
    `weights` itself (a run's checkpoint downloaded by the caller)."""
    from pipeline.models import weights as sources  # imports the hub client only when weights are used

    if not timm.is_model(name):
        raise _unknown_model(name)
    from_hub = pretrained and weights is None
    # Checked before building: offline, timm would retry the download for most of a minute before failing.
    overlay = sources.hub_weights(name) if from_hub else None
    try:
        model = timm.create_model(
            name,
            pretrained=from_hub,
            num_classes=num_classes,
            in_chans=in_chans,
            **({"pretrained_cfg_overlay": overlay} if overlay else {}),
            **dict(kwargs or {}),
        )
    except TypeError as error:
        raise ModelError(f"model.kwargs {dict(kwargs or {})} do not fit {name}: {error}") from error
    except Exception as error:
        if not from_hub:
            raise
        raise sources.WeightsError(  # a download that broke off, a corrupt cache entry, …
            f"The published weights of {name} could not be loaded ({type(error).__name__}: {error}). "
            f"{sources.how_to_provide(name)}"
        ) from error
    if pretrained and weights is not None:
        sources.load_weights(model, weights, file=weights_file, reset_head=reset_head)
    return model


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the model's classifier: timm's get_classifier(), and any its pretrained config names."""
    head = model.get_classifier()
    names = {name for name, module in model.named_modules() if module is head and name}
    configured = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names.update([configured] if isinstance(configured, str) else configured)
    return tuple(sorted(name for name in names if _has_module(model, name)))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The classifier's parameters and all the others, each in the model's order."""
    prefixes = tuple(f"{name}." for name in classifier_names(model))
    head, backbone = [], []
    for name, parameter in model.named_parameters():
        (head if name.startswith(prefixes) else backbone).append(parameter)
    return head, backbone

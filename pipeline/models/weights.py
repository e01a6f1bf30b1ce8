"""Where pretrained weights come from, and how they are fitted to the model the data needs.

`model.pretrained=true` with
  model.weights=null        the model's published weights, through timm: from the Hugging Face hub's local
                            cache, or downloaded when the hub can be reached (checked first, in a second)
  model.weights=<file>      a .safetensors file, a state dict saved with torch.save, or a Lightning
                            checkpoint of ours (ImageClassifier keeps the network under `model.`)
  model.weights=runs:/<id>  the network of the MLflow model an earlier run of ours logged (or the checkpoint at
                            runs:/<id>/<artifact path>), from logger.tracking_uri: run(cfg) downloads it
                            (pipeline.tracking.checkpoints); models never talk to MLflow

Local weights are fitted like timm fits its own: the first convolution is adapted to the data's channels
(timm's adapt_input_conv: RGB weights summed for grayscale, repeated and scaled the other way), and the
classifier keeps the model's fresh initialisation when its class count differs, or always with
`reset_head=True` (model.reset_head: a new task, even one with as many classes). Every other tensor must
match by name and shape; what does not is listed in the error. Nothing but tensors is ever unpickled:
safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from pipeline.models.factory import ModelError, classifier_names

log = logging.getLogger(__name__)
PROBE_SECONDS = 2.0


def how_to_provide(name: str) -> str:
    return (
        "Either give local weights with model.weights=<file> (.safetensors, a state dict, a .ckpt of ours) or "
        "model.weights=runs:/<run_id> (a run of ours), or fetch the published ones once on a machine that is online "
        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy its Hugging Face "
        "cache (~/.cache/huggingface/hub, or $HF_HOME) here; or train from scratch with model.pretrained=false."
    )


class WeightsError(ModelError):
    """Pretrained weights cannot be found, read, or fitted to the model."""


@dataclass(frozen=True)
class Fitted:
    """What loading local weights changed: the adapted input convolutions and the re-initialised classifier."""

    adapted_inputs: tuple[str, ...]
    reset_classifier: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- the hub


def hub_weights(name: str) -> dict[str, str]:
    """The `pretrained_cfg_overlay` that makes timm load `name`'s published weights without waiting on a network.

    {"file": <path>} when they are in the local cache; {} when timm may download them (the host answered);
    a WeightsError naming the way out when neither holds. Answers in about PROBE_SECONDS at worst.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id, url = (cfg.hf_hub_id, cfg.url) if cfg else (None, None)
    if not hub_id and not url:
        raise WeightsError(
            f"model.name={name} has no published pretrained weights. Give your own with model.weights=<file> or "
            "model.weights=runs:/<run_id>, or set model.pretrained=false to train it from scratch."
        )
    cached = _cached_hub_file(hub_id, cfg.hf_hub_filename) if hub_id else _cached_url_file(url)
    if cached:
        return {"file": cached}
    endpoint = _hub_endpoint() if hub_id else url
    if _hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif not _reachable(endpoint):
        reason = f"{urlparse(endpoint).hostname} cannot be reached (no connection within {PROBE_SECONDS:g} s)"
    else:
        return {}
    where = hub_id or url
    raise WeightsError(
        f"model.pretrained=true: the published weights of {name} ({where}) are not in the local cache and "
        f"{reason}. {how_to_provide(name)}"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cached_hub_file(hub_id: str, filename: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    for candidate in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:  # timm's order
        path = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _cached_url_file(url: str) -> str | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return str(path) if path.is_file() else None


def _reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the URL's host (or the HTTPS proxy) opens within `timeout` seconds.

    Run in a thread: name resolution has no timeout of its own and can hang on a machine without network.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    opened = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.set()
        except OSError:
            pass

    threading.Thread(target=connect, daemon=True).start()
    return opened.wait(timeout)


# ----------------------------------------------------------------------------------------- local weights


def load_weights(model: nn.Module, source: str, file: Path | None = None, reset_head: bool = False) -> Fitted:
    """Put the weights of `source` (model.weights as the user gave it) into `model`, fitted to it. `file`: where they
    are on disk when that is not `source` itself (a run's checkpoint, downloaded by pipeline.tracking.checkpoints);
    `reset_head`: keep the model's fresh classifier even where the weights' one would fit."""
    state = read_state_dict(file or _file(source), source)
    fitted = fit_state_dict(model, state, source, reset_head=reset_head)
    log.info(
        "Loaded model.weights=%s (input convolution adapted: %s; classifier re-initialised: %s)",
        source,
        ", ".join(fitted.adapted_inputs) or "no",
        ", ".join(fitted.reset_classifier) or "no",
    )
    return fitted


def _file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"model.weights={source}: no such file{' (it is a folder)' if path.is_dir() else ''}. Give the path of "
            "a .safetensors file, a state dict saved with torch.save, or a .ckpt of ours, or runs:/<run_id> for the "
            "best checkpoint of an earlier run."
        )
    return path


def read_state_dict(path: Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file, a torch state dict, or a (Lightning) checkpoint holding one."""
    source = source or str(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise WeightsError(f"model.weights={source}: not a valid safetensors file ({error}).") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(error))
        if "Weights only load failed" not in str(error):
            raise WeightsError(f"model.weights={source}: not a weights file torch can read ({error}).") from error
        raise WeightsError(
            f"model.weights={source}: refused. Reading it would unpickle arbitrary Python objects"
            f"{f' ({unsafe.group(1)})' if unsafe else ''}, which can run code. Save only tensors — "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') or "
            "torch.save(model.state_dict(), 'weights.pt') — from a source you trust, and give that file."
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        raise WeightsError(
            f"model.weights={source}: not a weights file torch can read ({type(error).__name__}: {error}). "
            "Give a .safetensors file, a state dict saved with torch.save, or a .ckpt of ours."
        ) from error
    return _unwrap(loaded, source)


def _unwrap(loaded: object, source: str) -> dict[str, torch.Tensor]:
    state = loaded
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        state = loaded["state_dict"]
        if "pytorch-lightning_version" in loaded and any(key.startswith("model.") for key in state):
            state = {key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")}
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"model.weights={source}: holds no state dict (a mapping of names to tensors, or a checkpoint with "
            "one under 'state_dict'). Save it with torch.save(model.state_dict(), path)."
        )
    return dict(timm.models.clean_state_dict(dict(state)))  # drops a DataParallel `module.` prefix


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "the weights", reset_head: bool = False
) -> Fitted:
    """Load `state` into `model`, adapting the input convolution and leaving a differently sized classifier fresh
    (every classifier, with `reset_head`: the weights' head answers another task's classes)."""
    target = model.state_dict()
    state = dict(state)
    adapted = []
    first_convs = getattr(model, "pretrained_cfg", {}).get("first_conv") or ()
    for conv in [first_convs] if isinstance(first_convs, str) else first_convs:
        key = f"{conv}.weight"
        if key not in state or key not in target or state[key].ndim != 4:
            continue
        (out_have, in_have, *kernel_have), (out_want, in_want, *kernel_want) = state[key].shape, target[key].shape
        if in_have != in_want and (out_have, kernel_have) == (out_want, kernel_want):
            state[key] = timm.models.adapt_input_conv(in_want, state[key], in_have)
            adapted.append(conv)

    heads = classifier_names(model)
    in_head = tuple(f"{name}." for name in heads)
    head_keys = [key for key in target if key.startswith(in_head)]
    reset = [key for key in head_keys if reset_head or key not in state or state[key].shape != target[key].shape]
    for key in reset:
        state.pop(key, None)

    ignored = ("num_batches_tracked",)  # BatchNorm step counters: absent from frozen BatchNorm, not weights
    missing = [k for k in target if k not in state and not k.startswith(in_head) and not k.endswith(ignored)]
    unexpected = [k for k in state if k not in target and not k.endswith(ignored)]
    misshapen = [
        f"{k} {tuple(state[k].shape)} in the weights, {tuple(target[k].shape)} in the model"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or misshapen:
        problems = [
            _listed("missing from the weights", missing),
            _listed("not in the model", unexpected),
            _listed("of another shape", misshapen),
        ]
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise WeightsError(
            f"model.weights={source} does not fit {name} beyond its classifier ({', '.join(heads)}): "
            + "; ".join(p for p in problems if p)
            + ". The weights must come from the same model.name and model.kwargs; only the classifier and the "
            "input channels are adapted."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    return Fitted(tuple(adapted), tuple(sorted({key.rsplit(".", 1)[0] for key in reset})))


def _listed(what: str, keys: list[str], shown: int = 8) -> str:
    if not keys:
        return ""
    more = f", … ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what}: {', '.join(keys[:shown])}{more}"

"""What a run is called and the command that trains it again: `<model>-<data>-<aug>` and the overrides that differ
from the composed defaults, short enough to read in MLflow's run table.

The overrides are the ones typed on `python -m pipeline.train` (Hydra's, per job in a multirun); a run started from
Python (tests, notebooks) has none, so what its config changes in the defaults stands for them.
"""

from __future__ import annotations

import math
import secrets
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that say where a run writes or how it is shown, not what it trains: never part of a name, never "a difference".
NOT_WHAT_TRAINS = ("paths.", "logger.", "hydra.", "progress", "resume", "trainer.enable_model_summary")
# The groups the name starts with: <model>-<data>-<aug>.
NAMED_GROUPS = ("model", "data", "aug")
# Short forms of the keys people change most; any other key is shown by its last part (optim.nesterov → nesterov).
ABBREVIATIONS = {
    "optim.lr": "lr",
    "optim.lr_base": "lr_base",
    "optim.weight_decay": "wd",
    "optim.momentum": "mom",
    "trainer.max_epochs": "epochs",
    "data.batch_size": "bs",
    "loss.label_smoothing": "ls",
    "scheduler.warmup_epochs": "warmup",
    "mixup.mixup_alpha": "mixup",
    "mixup.cutmix_alpha": "cutmix",
    "experiment": "exp",
    "scheduler": "sched",
    "finetune": "ft",
}
MAX_DESCRIPTION = 40  # characters of overrides in a name; the rest is said as "+N" (every value is a param)


def short_number(value: float, digits: int = 3) -> str:
    """0.031622 → 0.0316, 0.00015 → 1.5e-4, 1000000.0 → 1e6: few characters, enough to tell runs apart."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def short_value(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return short_number(value, digits)
    text = str(value)
    try:  # a number typed on the command line: 1e-4 → 1e-4, 0.10 → 0.1
        return short_number(float(text), digits) if text.lower() not in ("true", "false", "nan", "inf") else text
    except ValueError:
        return text if len(text) <= 16 else text[:15] + "…"


def short_key(key: str, keys: Sequence[str] = ()) -> str:
    """The key as a name shows it; a last part that two of `keys` share stays whole."""
    bare = key.lstrip("+~")
    if bare in ABBREVIATIONS:
        return ABBREVIATIONS[bare]
    last = bare.rsplit(".", 1)[-1]
    shared = sum(1 for other in keys if other.lstrip("+~").rsplit(".", 1)[-1] == last) > 1
    return bare if shared else last


def default_choices() -> dict[str, str]:
    """Each config group's option in train.yaml's defaults list (data: digits, model: lenet5, …)."""
    from pipeline.config import CONF_DIR

    choices = {}
    for entry in OmegaConf.load(CONF_DIR / "train.yaml").defaults:
        if isinstance(entry, str) or not OmegaConf.is_dict(entry):
            continue
        for group, option in entry.items():
            choices[str(group)] = str(option)
    return choices


def differing_overrides(overrides: Sequence[str], cfg: DictConfig, defaults: DictConfig) -> list[str]:
    """The overrides that change the composed defaults: `optim.lr=0.05` when 0.05 is the default is left out, and so
    are keys of NOT_WHAT_TRAINS and the groups the name starts with."""
    ours, theirs = _flat(cfg), _flat(defaults)
    choices = default_choices()
    kept = []
    for override in overrides:
        key, _, option = override.partition("=")
        bare = key.lstrip("+~")
        if bare.startswith(NOT_WHAT_TRAINS) or bare in NAMED_GROUPS:
            continue
        if bare in choices:  # a group: kept when another option than the default
            if option != choices[bare]:
                kept.append(override)
            continue
        if key.startswith("~") or bare not in ours or ours.get(bare) != theirs.get(bare):
            kept.append(override)
    return kept


def config_overrides(cfg: DictConfig, defaults: DictConfig) -> list[str]:
    """The `key=value` overrides that turn the defaults into `cfg`, for a run started from Python. Keys of a group
    whose _target_ changed (another optimizer) are said as the group's class (optim=AdamW), not key by key."""
    ours, theirs = _flat(cfg), _flat(defaults)
    swapped = {
        key.removesuffix("._target_"): str(value).rsplit(".", 1)[-1]
        for key, value in ours.items()
        if key.endswith("._target_") and value != theirs.get(key)
    }
    overrides = [f"{group}={target}" for group, target in swapped.items()]
    for key, value in ours.items():
        if key.startswith(NOT_WHAT_TRAINS) or key.split(".", 1)[0] in NAMED_GROUPS:
            continue
        if any(key.startswith(f"{group}.") for group in swapped) or (key in theirs and theirs[key] == value):
            continue
        overrides.append(f"{key}={value}" if key in theirs else f"+{key}={value}")
    return overrides


def describe(overrides: Sequence[str], digits: int = 3, limit: int = MAX_DESCRIPTION) -> str:
    """`optim.lr=0.1 trainer.max_epochs=5` → `lr=0.1 epochs=5`, cut to `limit` characters with a count of the rest.
    Groups and the keys of ABBREVIATIONS (what people tune) come first, so a cut leaves out set-up such as
    trainer.limit_train_batches rather than the learning rate."""
    tuned = set(ABBREVIATIONS) | set(NAMED_GROUPS) | {"optim", "trainer", "callbacks", "debug", "paths"}
    overrides = sorted(overrides, key=lambda override: override.partition("=")[0].lstrip("+~") not in tuned)
    keys = [override.partition("=")[0] for override in overrides]
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        parts.append(f"{short_key(key, keys)}={short_value(value, digits)}" if value else short_key(key, keys))
    text = ""
    for index, part in enumerate(parts):
        rest = len(parts) - index - 1
        candidate = f"{text} {part}".strip()
        if len(candidate) + (len(f" +{rest}") if rest else 0) > limit:
            return f"{text} +{len(parts) - index}".strip()
        text = candidate
    return text


def run_name(cfg: DictConfig, overrides: Sequence[str]) -> str:
    """`lenet5-digits-affine lr=0.1 epochs=5 #3fa2`: what was trained, what differs, and 4 random hex digits that
    keep two runs of the same config apart in MLflow's table (which sorts and searches by name)."""
    base = f"{cfg.model.name}-{cfg.data.name}-{cfg.aug.name}"
    return " ".join(part for part in (base, describe(overrides), f"#{secrets.token_hex(2)}") if part)


def trial_name(sweep: str, number: int, values: Mapping[str, Any]) -> str:
    """`lr_wd/003 lr=0.032 wd=1.5e-4`: the sweep, the trial's number and its sampled values (two digits: the values
    are random; the params hold them whole)."""
    sampled = describe([f"{key}={value}" for key, value in values.items()], digits=2)
    return f"{sweep}/{number:03d} {sampled}".strip()


def train_command(overrides: Sequence[str]) -> str:
    """The command that trains this config again."""
    return shlex.join(["python", "-m", "pipeline.train", *overrides])


def hydra_overrides() -> list[str] | None:
    """The overrides typed for this `python -m pipeline.train` job, or None outside that command."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.job.config_name != "train":
        return None
    return [str(override) for override in hydra.overrides.task]


def _flat(cfg: DictConfig) -> dict[str, Any]:
    return flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} → {'optim.lr': 0.1}: the keys a user types as overrides."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

"""Composing and checking the configuration, before any expensive work starts.

Hydra already rejects unknown groups, options and keys. What it cannot know is which *values* make sense;
`validate` checks those against the rules below and reports every problem at once, each naming the key,
the value given, what is allowed, and an example override that fixes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import pipeline.data.workers  # noqa: F401  (registers the ${loader_workers:} resolver that conf/data uses)
from pipeline.errors import UserInputError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OmegaConf.register_new_resolver("abspath", lambda path: os.path.abspath(path), replace=True)

PRECISIONS = (
    "32-true",
    "32",
    "64-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "transformer-engine",
)
MONITORED = tuple(f"{stage}/{name}" for stage in ("val", "train") for name in ("acc", "loss", "f1", "acc_top5"))


class ConfigError(UserInputError):
    """The composed configuration has values that cannot work."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _fraction(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


def _one_of(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in allowed), "one of " + ", ".join(map(str, allowed))


@dataclass(frozen=True)
class Rule:
    key: str
    check: Callable[[Any], bool]
    allowed: str
    example: str


def _rule(key: str, check: Callable[[Any], bool], allowed: str, example: Any) -> Rule:
    return Rule(key, check, allowed, f"{key}={example}")


def _choice_rule(key: str, *allowed: Any) -> Rule:
    check, text = _one_of(*allowed)
    return Rule(key, check, text, f"{key}={allowed[0]}")


RULES: Sequence[Rule] = (
    _rule("seed", lambda v: v is None or _integer(v), "an integer or null", 0),
    _choice_rule("progress", "rich", "tqdm", "none"),
    _rule("loss.label_smoothing", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.1),
    _choice_rule("monitor.metric", *MONITORED),
    _choice_rule("monitor.mode", "max", "min"),
    _rule(
        "early_stopping.patience",
        lambda v: v is None or (_integer(v) and v >= 1),
        "an integer >= 1 or null",
        5,
    ),
    _rule("data.batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1", 64),
    _rule("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0", 2),
    _rule("data.source.val_fraction", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)", 0.15),
    _rule("data.source.test_fraction", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)", 0.15),
    _rule(
        "data.image_size",
        lambda v: v is None or (len(v) == 2 and all(_integer(s) and s > 0 for s in v)),
        "null or [height, width] of positive integers",
        "[32,32]",
    ),
    _rule(
        "data.std",
        lambda v: v is None or all(_number(s) and s > 0 for s in v),
        "null or numbers > 0",
        "[0.5]",
    ),
    _rule(
        "data.train_per_class",
        lambda v: v is None or (_integer(v) and v >= 1),
        "an integer >= 1 or null",
        5,
    ),
    _rule("data.classes", lambda v: v is None or (isinstance(v, list) and len(v) >= 2), "null or >= 2 names", "[0,1]"),
    _rule("model.reset_head", _boolean, "true or false", "true"),
    _rule("model.weights", lambda v: v is None or (isinstance(v, str) and v.strip()), "null or a path", "w.pt"),
    _rule("finetune.unfreeze_epoch", lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0 or null", 5),
    _rule("finetune.backbone_lr_factor", lambda v: _number(v) and v > 0, "a number > 0", 0.1),
    _rule("optim.lr", lambda v: _number(v) and v > 0, "a number > 0", 0.01),
    _rule("optim.lr_base", lambda v: v is None or (_number(v) and v > 0), "a number > 0 or null", 0.1),
    _choice_rule("optim.lr_scale", "linear", "sqrt"),
    _rule("optim.filter_bias_and_bn", _boolean, "true or false", "true"),
    _rule("optim.layer_decay", lambda v: v is None or (_number(v) and 0 < v <= 1), "a number in (0, 1] or null", 0.75),
    _rule("model.kwargs.drop_rate", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.2),
    _rule("model.kwargs.drop_path_rate", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.1),
    _rule("mixup.mixup_alpha", lambda v: _number(v) and v >= 0, "a number >= 0 (0 = off)", 0.2),
    _rule("mixup.cutmix_alpha", lambda v: _number(v) and v >= 0, "a number >= 0 (0 = off)", 1.0),
    _rule("mixup.prob", _fraction, "a number in [0, 1]", 1.0),
    _rule("mixup.switch_prob", _fraction, "a number in [0, 1]", 0.5),
    _rule("mixup.label_smoothing", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.1),
    _rule("mixup.off_epoch", lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0 or null", 25),
    _rule("ema.enabled", _boolean, "true or false", "true"),
    _rule("ema.decay", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)", 0.9998),
    _rule("ema.warmup", _boolean, "true or false", "true"),
    _rule("perf.channels_last", _boolean, "true or false", "true"),
    _rule("perf.compile", _boolean, "true or false", "true"),
    _rule("perf.grad_checkpointing", _boolean, "true or false", "true"),
    _rule("class_activation.images", lambda v: _integer(v) and v >= 0, "an integer >= 0", 4),
    _rule("inspect.features", _boolean, "true or false", "true"),
    _rule("optim.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0", 0.0005),
    _rule("optim.momentum", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.9),
    _rule("scheduler.warmup_epochs", lambda v: _number(v) and v >= 0, "a number >= 0", 1),
    _rule("trainer.max_epochs", lambda v: _integer(v) and v >= 1, "an integer >= 1", 20),
    _rule("trainer.precision", lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS), "bf16-mixed"),
    _rule("trainer.accumulate_grad_batches", lambda v: _integer(v) and v >= 1, "an integer >= 1", 1),
    _rule("trainer.gradient_clip_val", lambda v: v is None or (_number(v) and v > 0), "a number > 0 or null", 1.0),
    # MLflow's client refuses more than 10 retries or a backoff factor above 120
    _rule("logger.http.max_retries", lambda v: _integer(v) and 0 <= v <= 10, "an integer in 0..10", 5),
    _rule("logger.http.backoff_factor", lambda v: _integer(v) and 0 <= v <= 120, "an integer in 0..120", 2),
    _rule("logger.http.timeout", lambda v: _integer(v) and v >= 1, "an integer >= 1 (seconds)", 30),
)

_ABSENT = object()


def _cross_field_problems(cfg: DictConfig) -> list[str]:
    problems = []
    source = cfg.data.get("source", {})
    fractions = [source.get("val_fraction"), source.get("test_fraction")]
    if all(_number(f) for f in fractions) and sum(fractions) >= 1:
        problems.append(
            f"data.source.val_fraction + data.source.test_fraction = {sum(fractions):g} leaves no training "
            "images: their sum must be < 1 (e.g. data.source.val_fraction=0.15 data.source.test_fraction=0.15)"
        )
    warmup, epochs = cfg.scheduler.get("warmup_epochs"), cfg.trainer.get("max_epochs")
    if _number(warmup) and _integer(epochs) and warmup >= epochs:
        problems.append(
            f"scheduler.warmup_epochs={warmup} is not shorter than trainer.max_epochs={epochs}: "
            f"the schedule would never leave warm-up (e.g. scheduler.warmup_epochs={max(0, epochs // 10)})"
        )
    unfreeze = cfg.get("finetune", {}).get("unfreeze_epoch")
    if _integer(unfreeze) and _integer(epochs) and unfreeze >= epochs:
        problems.append(
            f"finetune.unfreeze_epoch={unfreeze} is not before trainer.max_epochs={epochs}: the backbone would "
            f"never train (e.g. finetune.unfreeze_epoch={epochs // 3}, or finetune=linear_probe to keep it frozen)"
        )
    mixup, batch_size = cfg.get("mixup") or {}, cfg.data.get("batch_size")
    mixing = any(_number(mixup.get(k)) and mixup.get(k) > 0 for k in ("mixup_alpha", "cutmix_alpha"))
    if mixing and _integer(batch_size) and batch_size % 2:
        problems.append(
            f"data.batch_size={batch_size} is odd, but Mixup/CutMix (mixup.mixup_alpha, mixup.cutmix_alpha) mixes "
            f"each batch with its reverse and needs an even one (e.g. data.batch_size={batch_size + 1})"
        )
    mean, std = cfg.data.get("mean"), cfg.data.get("std")
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
        problems.append("data.mean and data.std must both be null or lists of the same length")
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every value that cannot work; silent when the config is sound."""
    problems = []
    for rule in RULES:
        value = OmegaConf.select(cfg, rule.key, default=_ABSENT)
        if value is _ABSENT:
            continue
        plain = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        try:
            ok = rule.check(plain)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{rule.key}={plain!r}: must be {rule.allowed} (e.g. {rule.example})")
    problems += _cross_field_problems(cfg)
    if problems:
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(problems))


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m pipeline.<config_name> <overrides>` would run, for tests and sweep trials."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (the sweep driver): same search path
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))

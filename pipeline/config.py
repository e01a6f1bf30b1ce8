"""Composing and checking the configuration, before any expensive work starts.

Hydra already rejects unknown groups, options and keys; `composition_error` puts its message on one line and adds
the close matches of a mistyped key. What Hydra cannot know is which *values* make sense; `validate` checks those
against the rules below and reports every problem at once, each naming the key, the value given, what is allowed,
and an example override that fixes it. Nor does it know which keys the objects built from the config take: a key
added with `+` reaches the constructor only when training starts; `check_arguments` compares them first.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import pipeline.data.workers  # noqa: F401  (registers the ${loader_workers:} resolver that conf/data uses)
from pipeline.errors import UserInputError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OmegaConf.register_new_resolver("abspath", lambda path: os.path.abspath(path), replace=True)
# A few random hex digits that tell apart commands started in the same second from one folder (sweeps, CI jobs and
# schedulers do it all the time): with the time alone they would share one output folder. Cached, so one config
# resolves one value however often it is read.
OmegaConf.register_new_resolver("run_token", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def relative_data_root(cfg: DictConfig) -> Path | None:
    """data.root resolved from the folder the command runs in, when it was given as a relative path; else None."""
    root = OmegaConf.select(cfg, "data.root")
    if root is None or Path(str(root)).expanduser().is_absolute():
        return None
    return Path(str(root)).expanduser().resolve()


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


SEED_MAX = 2**32 - 1  # NumPy's generators, which seed_everything and Albumentations seed, take 0..2**32-1

RULES: Sequence[Rule] = (
    _rule(
        "seed", lambda v: v is None or (_integer(v) and 0 <= v <= SEED_MAX), f"an integer in 0..{SEED_MAX} or null", 0
    ),
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
    # 0 would keep no best checkpoint: nothing to test at the end or to log
    _rule(
        "checkpoint.save_top_k",
        lambda v: _integer(v) and (v >= 1 or v == -1),
        "an integer >= 1, or -1 for every epoch",
        3,
    ),
    _rule("data.batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1", 64),
    _rule("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0", 2),
    _choice_rule("data.verify", "full", "header", "off"),
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
    _rule("per_class.shown", lambda v: _integer(v) and v >= 2, "an integer >= 2", 30),
    _rule("inspect.features", _boolean, "true or false", "true"),
    _rule("optim.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0", 0.0005),
    _rule("optim.momentum", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.9),
    _rule("scheduler.warmup_epochs", lambda v: _number(v) and v >= 0, "a number >= 0", 1),
    _rule("trainer.max_epochs", lambda v: _integer(v) and v >= 1, "an integer >= 1", 20),
    _rule("trainer.precision", lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS), "bf16-mixed"),
    _rule(
        "trainer.devices",
        lambda v: (
            v in ("auto", -1, "-1")
            or (_integer(v) and v >= 1)
            or (isinstance(v, list) and bool(v) and all(_integer(d) and d >= 0 for d in v))
            or (isinstance(v, str) and all(part.strip().isdigit() for part in v.strip(",").split(",")) and v != "0")
        ),
        "auto, -1 (every device), a count >= 1, or a list of device indices",
        "auto",
    ),
    _rule("trainer.accumulate_grad_batches", lambda v: _integer(v) and v >= 1, "an integer >= 1", 1),
    _rule("trainer.gradient_clip_val", lambda v: v is None or (_number(v) and v > 0), "a number > 0 or null", 1.0),
    # MLflow's client refuses more than 10 retries or a backoff factor above 120
    _rule("logger.http.max_retries", lambda v: _integer(v) and 0 <= v <= 10, "an integer in 0..10", 5),
    _rule("logger.http.backoff_factor", lambda v: _integer(v) and 0 <= v <= 120, "an integer in 0..120", 2),
    _rule("logger.http.timeout", lambda v: _integer(v) and v >= 1, "an integer >= 1 (seconds)", 30),
    _rule("logger.system_metrics.enabled", _boolean, "true or false", "false"),
    _rule("logger.system_metrics.interval", lambda v: _number(v) and v > 0, "a number > 0 (seconds)", 10),
    # pipeline.sweep's own settings (conf/sweep.yaml), checked by its driver before Ray starts (Ray and Tune would
    # fail on them later, with an assertion's traceback, or take them silently)
    _rule("sweep.num_samples", lambda v: _integer(v) and v >= 1, "an integer >= 1", 8),
    _choice_rule("sweep.metric", *MONITORED),
    _choice_rule("sweep.mode", "max", "min"),
    _choice_rule("sweep.search", "random", "grid", "optuna"),
    _rule("sweep.search_seed", lambda v: v is None or _integer(v), "an integer or null", 0),
    _choice_rule("sweep.scheduler", "asha", "fifo"),
    _rule("sweep.grace_period", lambda v: _integer(v) and v >= 1, "an integer >= 1 (epochs)", 2),
    _rule("sweep.reduction_factor", lambda v: _number(v) and v > 1, "a number > 1", 2),
    _rule("sweep.max_concurrent_trials", lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null", 2),
    _rule("sweep.max_failures", lambda v: _integer(v) and v >= -1, "an integer >= 0, or -1 for no limit", 1),
    _rule("ray.num_cpus", lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null", 4),
    _rule("ray.num_gpus", lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0 or null", 1),
)
SWEEP_SETTINGS = tuple(rule.key for rule in RULES if rule.key.startswith(("sweep.", "ray.")))

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
    # A warm-up as long as the run is not refused: run(cfg) shortens it to fit (schedules.fit_warmup).
    epochs = cfg.trainer.get("max_epochs")
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
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is not None and not (isinstance(entry, DictConfig) and isinstance(entry.get("_target_"), str)):
            problems.append(
                f"callbacks.{name}={_plain(entry)!r}: must be a Lightning callback's _target_ and arguments, or null "
                f"to leave it out (e.g. +callbacks.{name}._target_=lightning.pytorch.callbacks.Timer)"
            )
    mean, std = cfg.data.get("mean"), cfg.data.get("std")
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
        problems.append("data.mean and data.std must both be null or lists of the same length")
    return problems


def _plain(value: Any) -> Any:
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def _refuse(problems: Sequence[str]) -> None:
    """One problem on one line; several listed below each other."""
    if len(problems) == 1:
        raise ConfigError(f"Invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(problems))


def _unset(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose value is `???`, read without resolving (OmegaConf.missing_keys resolves interpolations,
    and one that refers to an unset key fails)."""
    plain = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if isinstance(plain, dict):
        return [key for name, value in plain.items() for key in _unset(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if plain == "???" else []


def validate(cfg: DictConfig, only: Collection[str] | None = None) -> None:
    """Raise ConfigError listing every value that cannot work; silent when the config is sound. `only`: check just
    these keys' rules (for a command whose config shares a few keys with training's), without the cross-field ones."""
    # A value a config file leaves to the user (`???`, e.g. data=shards' url): first, since reading any key that
    # refers to it (data.source.url) would fail with OmegaConf's own error.
    _refuse([f"{key} is not set: give it on the command line ({key}=…)" for key in _unset(cfg)])
    problems = []
    for rule in RULES:
        if only is not None and rule.key not in only:
            continue
        value = OmegaConf.select(cfg, rule.key, default=_ABSENT)
        if value is _ABSENT:
            continue
        plain = _plain(value)
        try:
            ok = rule.check(plain)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{rule.key}={plain!r}: must be {rule.allowed} (e.g. {rule.example})")
    if only is None:
        problems += _cross_field_problems(cfg)
    _refuse(problems)


# Nodes built without a `_target_` of their own, and what they are given to.
IMPLIED_TARGETS = {"trainer": "lightning.pytorch.Trainer"}
# Keys of a node that we read ourselves and never pass to its target.
# optim keys the pipeline reads itself (LR scaling, timm's parameter groups); the rest go to the optimizer.
OPTIM_KEYS_OF_OURS = ("lr_base", "lr_scale", "filter_bias_and_bn", "layer_decay")
NOT_ARGUMENTS = {"optim": OPTIM_KEYS_OF_OURS}
# Nodes whose every key is passed on or named by the user (a model's constructor arguments, checked once composed; the
# run's tags; Lightning callbacks by name; Hydra's job environment). An empty node is taken as one too.
OPEN_NODES = ("model.kwargs", "logger.tags", "callbacks", "hydra.job.env_set")
AUG_CHECK_SIZE = (32, 32)  # the augmentation is checked before the model gives its input size


def _arguments(target: str) -> set[str] | None:
    """The keyword arguments `target` takes; None when it takes any (**kwargs) or has no signature to read."""
    from hydra.utils import get_object

    try:
        parameters = inspect.signature(get_object(target)).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return None  # an unknown target is Hydra's error to report; a builtin (timedelta) has no signature
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not p.VAR_POSITIONAL}


def _built_nodes(node: DictConfig, path: str = "") -> Iterator[tuple[str, DictConfig, str]]:
    """(path, node, target) of every node of `cfg` that is built from a target, the trainer's included."""
    target = node.get("_target_") if "_target_" in node else IMPLIED_TARGETS.get(path)
    if isinstance(target, str):
        yield path, node, target
    for key, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig):
            yield from _built_nodes(child, f"{path}.{key}" if path else str(key))


def _suggest(key: str, candidates: Sequence[str], path: str) -> str:
    close = difflib.get_close_matches(key, sorted(set(candidates)), n=3)
    prefix = f"{path}." if path else ""
    return f" Did you mean {' or '.join(prefix + name for name in close)}?" if close else ""


def check_arguments(cfg: DictConfig) -> None:
    """Raise ConfigError for a key of an optimizer, schedule, data source, trainer… that its target does not take,
    ModelError for an unknown model or model.kwargs it does not take, and AugmentationError for an augmentation entry
    that cannot be built. Imports the targets (torch among them):
    call it after `validate`, before any data is loaded."""
    from pipeline.data.transforms import InputSpec, build_transforms

    problems = []
    for path, node, target in _built_nodes(cfg):
        accepted = _arguments(target)
        if accepted is None:
            continue
        ours = NOT_ARGUMENTS.get(path, ())
        for key in [str(k) for k in node if not str(k).startswith("_") and k not in accepted and k not in ours]:
            hint = _suggest(key, [*accepted, *ours], path)
            problems.append(f"{path}.{key}: {target} takes no argument {key!r}.{hint}")
    _refuse(problems)
    from pipeline.models.factory import check_model

    kwargs = cfg.model.get("kwargs")
    check_model(str(cfg.model.name), OmegaConf.to_container(kwargs, resolve=True) if kwargs else None)
    # Built here with a placeholder input size, so a bad entry fails now; run() builds it again for the model's size.
    spec = InputSpec(AUG_CHECK_SIZE, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    build_transforms(OmegaConf.select(cfg, "aug.train"), spec)


def composition_error(error: Exception) -> str:
    """Hydra's message for a config it could not compose, on one line; for a key that does not exist, the keys it
    may have meant (of the node, or the arguments its target takes; for augmentation, Albumentations' transforms)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = error.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and isinstance(cause.parent_node, DictConfig):
        return _unknown_key(str(error), cause.parent_node, str(cause.full_key))
    text = str(error).split("\nConfig search path:")[0]  # where Hydra looked: not the user's concern
    text = re.sub(r":\s*\n\t", ": ", text)  # a list of options, one per line, becomes "options: a, b, c"
    text = re.sub(r"\n\t", ", ", text)
    one_line = ". ".join(line.strip().rstrip(".") for line in text.splitlines() if line.strip()) + "."
    override = getattr(error, "override", None)  # a syntax error names the override it could not parse
    return f"{override}: {one_line}" if override else one_line


def _unknown_key(message: str, parent: DictConfig, full_key: str) -> str:
    path, _, key = full_key.rpartition(".")
    appended = re.search(r"use \+(\S+)", message)  # Hydra's advice carries the override as typed
    override = appended.group(1) if appended else full_key
    if path == "aug.train":  # its entries are Albumentations class names
        from pipeline.data.transforms import AugmentationError, transform_class

        try:
            transform_class(key, full_key)
        except AugmentationError as error:
            return str(error)
        return f"{full_key}: the augmentation does not list {key}; add it with +{override}"
    keys = [str(k) for k in parent if not str(k).startswith("_") and (path or k != "hydra")]  # hydra: Hydra's own
    target = parent.get("_target_") if "_target_" in parent else IMPLIED_TARGETS.get(path)
    accepted = _arguments(target) if isinstance(target, str) else None
    where = path or "the config"
    if accepted is not None and key in accepted:
        return f"{override}: {where} does not list {key!r}, but {target} takes it: add it with +{override}"
    hint = _suggest(key, [*keys, *(accepted or ())], path)
    if accepted is None and (isinstance(target, str) or path in OPEN_NODES or not keys):  # takes keys unlisted
        return f"{override}: {where} has no key {key!r}.{hint} To add a key it does not list: +{override}"
    # A node the commands read themselves (preview, sweep, the top level): a key added with + would only be ignored.
    listed = "" if hint else f" It has: {', '.join(keys)}."
    return f"{override}: {where} has no key {key!r}.{hint}{listed}"


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m pipeline.<config_name> <overrides>` would run, for tests and sweep trials."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (the sweep driver): same search path
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))

"""Search spaces in Hydra's sweeper grammar, parsed by Hydra's own parser and mapped to Ray Tune.

    optim.lr: tag(log, interval(1e-4, 1e-1))   → tune.loguniform(1e-4, 1e-1)
    optim.momentum: interval(0.8, 0.99)       → tune.uniform(0.8, 0.99)
    model: choice(lenet5, nin)                → tune.choice([...])      (tune.grid_search with search=grid)
    data.batch_size: range(32, 129, 32)       → tune.choice([32, 64, 96, 128])   (grid_search likewise)

Keys are config keys (`optim.lr`) or config groups (`model`). Every key and every value is checked against
the composed config before Ray starts, so a typo costs seconds, not a cluster.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from ray import tune

from pipeline.config import CONF_DIR, ConfigError, validate
from pipeline.errors import UserInputError

GRAMMAR = "choice(a, b, …), range(start, stop[, step]), interval(low, high) or tag(log, interval(low, high))"
_ABSENT = object()


class SearchSpaceError(UserInputError):
    """A search expression that cannot be parsed, or that names a key or value the config does not have."""


def parse(params: Mapping[str, str]) -> dict[str, Override]:
    parser = OverridesParser.create()
    overrides = {}
    for key, expression in params.items():
        try:
            override = parser.parse_override(f"{key}={expression}")
        except HydraException as error:
            raise SearchSpaceError(
                f"sweep.params.{key}: cannot parse {expression!r} ({error}). Use {GRAMMAR}."
            ) from error
        if not override.is_sweep_override():
            raise SearchSpaceError(
                f"sweep.params.{key}={expression!r} is a fixed value, not a search: pass it as a plain override "
                f"({key}={expression}) or write {GRAMMAR}."
            )
        overrides[key] = override
    return overrides


def candidate_values(override: Override) -> list[Any]:
    """The values a discrete sweep can take, or the two ends of an interval."""
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return [sweep.start, sweep.end]
    return list(override.sweep_iterator())


def to_tune(override: Override, grid: bool) -> Any:
    sweep, key = override.value(), override.key_or_group
    if isinstance(sweep, ChoiceSweep | RangeSweep):
        values = list(override.sweep_iterator())
        return tune.grid_search(values) if grid else tune.choice(values)
    if isinstance(sweep, IntervalSweep):
        if grid:
            raise SearchSpaceError(
                f"sweep.params.{key}: interval(…) cannot be grid-searched; "
                "use choice/range, or sweep.search=random|optuna"
            )
        unknown = set(sweep.tags) - {"log"}
        if unknown:
            raise SearchSpaceError(f"sweep.params.{key}: unknown tag(s) {sorted(unknown)}; the one supported is log")
        if sweep.start >= sweep.end:  # Tune's sampler fails on it inside the driver, once Ray has started
            raise SearchSpaceError(
                f"sweep.params.{key}: interval({sweep.start:g}, {sweep.end:g}) needs low < high: "
                f"interval({sweep.end:g}, {sweep.start:g})"
            )
        if "log" in sweep.tags:
            if sweep.start <= 0:
                raise SearchSpaceError(f"sweep.params.{key}: a log interval needs low > 0, got {sweep.start}")
            return tune.loguniform(sweep.start, sweep.end)
        return tune.uniform(sweep.start, sweep.end)
    raise SearchSpaceError(f"sweep.params.{key}: unsupported expression. Use {GRAMMAR}.")


def override_text(key: str, value: Any) -> str:
    """The command-line override for one sampled value (strings quoted only when Hydra needs it)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        value = "'" + value.replace("'", "\\'") + "'"
    return f"{key}={value}"


def check_against_config(
    overrides: Mapping[str, Override], base: Sequence[str], compose: Callable[[list[str]], DictConfig]
) -> None:
    """Every searched key exists, and every value (each choice, both ends of an interval) passes validation."""
    config = compose(list(base))
    for key, override in overrides.items():
        is_group = "." not in key and (CONF_DIR / key).is_dir()
        if not is_group and OmegaConf.select(config, key, default=_ABSENT) is _ABSENT:
            keys = _all_keys(config)
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise SearchSpaceError(f"sweep.params: {key!r} is not a config key or group.{hint}")
        for value in candidate_values(override):
            if is_group and not (CONF_DIR / key / f"{value}.yaml").exists():
                options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
                raise SearchSpaceError(f"sweep.params.{key}: no option {value!r} in conf/{key}/ (options: {options})")
            try:
                validate(compose([*base, override_text(key, value)]))
            except ConfigError as error:
                raise SearchSpaceError(
                    f"sweep.params.{key} can take the value {value!r}, which is invalid: {error}"
                ) from error


def _all_keys(config: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, DictConfig):
            keys += _all_keys(value, f"{name}.")
    return keys


def build(
    params: Mapping[str, str], search: str, base: Sequence[str], compose: Callable[[list[str]], DictConfig]
) -> dict[str, Any]:
    """The Ray Tune param_space for `params`, after checking it against the config composed from `base`."""
    if not params:
        raise SearchSpaceError(f"sweep.params is empty: give at least one key → expression, e.g. optim.lr: {GRAMMAR}")
    overrides = parse(params)
    check_against_config(overrides, base, compose)
    return {key: to_tune(override, grid=search == "grid") for key, override in overrides.items()}

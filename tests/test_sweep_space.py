"""Search spaces in Hydra's sweeper grammar become Ray Tune's own distributions, and every key and value is checked
against the composed config before Ray starts (the driver calls `build` first; tests/test_sweep.py runs it)."""

from __future__ import annotations

import statistics

import pytest

from pipeline.config import compose
from pipeline.sweep.space import SearchSpaceError, build


def space(params: dict[str, str], search: str = "random") -> dict[str, object]:
    return build(params, search, [], compose)


def test_each_expression_becomes_tunes_distribution_over_its_values() -> None:
    built = space(
        {
            "optim.lr": "tag(log, interval(1e-4, 1e-1))",
            "optim.momentum": "interval(0.8, 0.99)",
            "model": "choice(lenet5, nin)",
            "data.batch_size": "range(32, 129, 32)",
        }
    )
    rates = built["optim.lr"].sample(size=400)
    assert all(1e-4 <= rate <= 1e-1 for rate in rates)
    assert statistics.median(rates) < 0.01, "log-uniform: half the draws below the bounds' geometric mean (~3e-3)"
    assert all(0.8 <= value <= 0.99 for value in built["optim.momentum"].sample(size=50))
    assert built["model"].categories == ["lenet5", "nin"]
    assert built["data.batch_size"].categories == [32, 64, 96, 128]
    assert space({"model": "choice(lenet5, nin)"}, search="grid") == {"model": {"grid_search": ["lenet5", "nin"]}}


@pytest.mark.parametrize(
    ("params", "search", "message"),
    [
        ({"optim.lr": "interval(1e-1, 1e-4)"}, "random", "optim.lr: interval(0.1, 0.0001) needs low < high"),
        ({"optim.weight_decay": "tag(log, interval(0, 1e-3))"}, "random", "a log interval needs low > 0, got 0"),
        ({"optim.lr": "interval(1e-4, 1e-1)"}, "grid", "interval(…) cannot be grid-searched"),
        ({"optim.lr": "tag(exp, interval(1e-4, 1e-1))"}, "random", "unknown tag(s) ['exp']; the one supported is log"),
        ({"optim.lrr": "interval(1e-4, 1e-1)"}, "random", "'optim.lrr' is not a config key or group. Close matches: "),
        ({"optim.lr": "choice(0.1, -1)"}, "random", "optim.lr can take the value -1, which is invalid"),
        ({"model": "choice(lenet5, lenet6)"}, "random", "sweep.params.model: no option 'lenet6' in conf/model/"),
        ({"optim.lr": "0.1"}, "random", "is a fixed value, not a search"),
    ],
)
def test_a_search_that_cannot_run_is_refused_naming_the_key(params: dict[str, str], search: str, message: str) -> None:
    with pytest.raises(SearchSpaceError) as refused:
        space(params, search)
    assert message in str(refused.value)

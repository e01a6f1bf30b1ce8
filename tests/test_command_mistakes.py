"""Every command answers a mistake in its config as pipeline.train does: a mistyped key names the key it may mean, an
output folder that cannot be written names paths.output_dir; one line on stderr, exit status 2, no traceback, nothing
made. (Mistakes of train's own keys and values: test_train_cli.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from tests.helpers.commands import run_module

MISTYPED = {
    "pipeline.train": ("optim.lrr=1", "optim.lrr=1: optim has no key 'lrr'. Did you mean optim.lr?"),
    "pipeline.evaluate": ("splitt=val", "splitt=val: the config has no key 'splitt'. Did you mean split?"),
    "pipeline.predict": ("top_kk=3", "top_kk=3: the config has no key 'top_kk'. Did you mean top_k?"),
    "pipeline.compare": ("experiment_nam=x", "the config has no key 'experiment_nam'. Did you mean experiment_name?"),
    "pipeline.register": ("nmae=x", "nmae=x: the config has no key 'nmae'. Did you mean name?"),
    "pipeline.augment": ("preview.view=3", "preview.view=3: preview has no key 'view'. Did you mean preview.views?"),
    "pipeline.inspect": ("inspect.depht=1", "inspect has no key 'depht'. Did you mean inspect.depth?"),
    "pipeline.sweep": ("sweep.resoruces.cpu=1", "sweep has no key 'resoruces'. Did you mean sweep.resources?"),
    "pipeline.shard": ("outptu=x", "outptu=x: the config has no key 'outptu'. Did you mean output?"),
}


def hydra_commands() -> set[str]:
    """The modules with a @hydra.main: every command a user runs with key=value overrides."""
    found = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        if re.search(r"^@hydra\.main\(", path.read_text(), re.MULTILINE):
            module = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
            found.add(module.removesuffix(".__main__"))
    return found


def test_every_command_is_checked_here() -> None:
    assert hydra_commands() == set(MISTYPED), "a new command: add its mistyped key to MISTYPED"


@pytest.mark.parametrize("module", sorted(MISTYPED))
def test_every_command_gives_hydra_its_own_errors_back_when_the_job_starts(module: str) -> None:
    """The callback that ends pipeline.cli.hydra_command's composing (HYDRA_FULL_ERROR=1): without it, the job would
    run with Hydra's raw errors on, and a job's own config error would be reported as a mistake in the overrides."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=module.split(".")[1], return_hydra_config=True)
    assert cfg.hydra.callbacks.checks._target_ == "pipeline.cli.CommandChecks"


@pytest.mark.fresh_store
@pytest.mark.parametrize("module", sorted(MISTYPED))
def test_a_mistyped_key_names_the_key_it_may_mean(root: Path, module: str) -> None:
    override, message = MISTYPED[module]
    done = run_module(module, [override], cwd=root, env=clean_env(), timeout=120)  # as typed, in the project folder
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, "one line: the problem and the fix"
    assert "+" + override not in done.stderr, "a top-level key added with + would be ignored: not advised"
    assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
    assert not list(root.iterdir()), "nothing is made for a command that cannot start"


@pytest.mark.fresh_store
@pytest.mark.parametrize(
    ("module", "arguments"),
    [("pipeline.evaluate", ["source=x"]), ("pipeline.predict", ["source=x", "input=x.png"]), ("pipeline.compare", [])],
)
def test_an_output_folder_that_cannot_be_written_names_the_key(root: Path, module: str, arguments: list[str]) -> None:
    (root / "taken").write_text("a file where the folder would go")
    where = root / "taken" / "out"
    done = run_module(module, [*arguments, f"paths.output_dir={where}"], cwd=root, env=clean_env(), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: paths.output_dir={where}: cannot write there" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "mlruns").exists(), "nothing is tracked by a command that cannot start"

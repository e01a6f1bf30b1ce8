"""What every command does around its work: it writes into the folder Hydra made for it, and a mistake the user
can fix ends with its message and exit status 2, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig, open_dict

from pipeline.errors import UserInputError


def adopt_output_folder(cfg: DictConfig) -> None:
    """paths.output_dir becomes the folder Hydra made for this command (its log and config are there)."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir


@contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """Print `error: <message>` and exit 2 for a UserInputError (and the `also` types)."""
    try:
        yield
    except (UserInputError, *also) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

"""Building a configured source: `data.source` (a `_target_` and its arguments) → ImageSplits, and the subset of
them a `data` config asks for."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.data.images import ImageSplits
from pipeline.errors import UserInputError


def load_splits(source: DictConfig) -> ImageSplits:
    """`instantiate(source)`, with the source's own UserInputError (e.g. DataError) raised as itself.

    Hydra wraps whatever the target raises in an InstantiationException, which the CLI would print as a
    traceback; a bad file or a missing data set is the user's to fix, so its message must reach them as is.
    """
    try:
        return instantiate(source)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserInputError):
            raise error.__cause__ from None
        raise


def load_data(data: DictConfig) -> ImageSplits:
    """The images a `data` config names: its source's splits, cut to `data.classes` and
    `data.train_per_class` (drawn with `data.source.split_seed`)."""
    return load_splits(data.source).subset(
        data.get("classes"), data.get("train_per_class"), seed=data.source.get("split_seed", 0)
    )

"""python -m pipeline.shard data=<source> output=<folder | s3://bucket/prefix>: convert a data set to WebDataset shards.

Loads the source exactly as training would (its splits, data.classes, data.train_per_class, its checks), writes each
split as tar shards and the index (pipeline.data.shard_writer), and prints the command that trains on them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import exit_after, hydra_command, user_errors
from pipeline.config import CONF_DIR, ConfigError


def _check(cfg: DictConfig) -> None:
    problems = []
    if OmegaConf.is_missing(cfg, "output") or not str(cfg.output).strip():  # empty: the shards would land here
        problems.append(
            "output is not set: where the shards go (e.g. output=/data/shards or output=s3://bucket/shards)"
        )
    for key in ("max_samples", "max_bytes"):
        value = cfg.shard[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            problems.append(f"shard.{key}={value!r}: must be an integer >= 1 (e.g. shard.{key}=1000)")
    if cfg.data.name == "shards":
        problems.append("data=shards: these are shards already; convert a source (e.g. data=imagefolder data.root=…)")
    if problems:
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(problems))


def training_command(cfg: DictConfig) -> str:
    """The command that trains on what was written, with the source's normalization (null: the model's own)."""
    words = ["python -m pipeline.train data=shards", f"data.url={cfg.output}"]
    if cfg.endpoint_url:
        words.append(f"data.endpoint_url={cfg.endpoint_url}")
    for key in ("mean", "std"):
        value = cfg.data.get(key)
        if value is not None:
            words.append(f"data.{key}=[{','.join(f'{v:g}' for v in value)}]")
    return " ".join(words)


def convert(cfg: DictConfig) -> Any:
    from pipeline.data.shard_format import DatasetIndex
    from pipeline.data.shard_store import INDEX, Store, check_url
    from pipeline.data.shard_writer import write_shards
    from pipeline.data.sources import load_data

    _check(cfg)
    output = str(cfg.output)
    check_url(output)
    store = Store(output, cfg.endpoint_url or None)
    exists = store.is_s3 or store.folder.exists()  # an S3 bucket must exist: listing it checks the endpoint too
    if exists and INDEX in store.sizes() and not cfg.shard.overwrite:
        raise ConfigError(
            f"output={output} already holds shards ({INDEX}): choose another output or shard.overwrite=true"
        )
    splits = load_data(cfg.data)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    source: dict[str, Any] = {"data": json.loads(json.dumps(data, default=str))}

    def progress(split: str, info: Any) -> None:
        print(f"{store.where(info.name)}: {info.samples} images, {info.bytes / 1e6:.1f} MB", flush=True)

    index: DatasetIndex = write_shards(
        splits, store, cfg.shard.max_samples, cfg.shard.max_bytes, cfg.shard.shuffle_seed, source, progress
    )
    counts = {split: sum(shard.samples for shard in shards) for split, shards in index.splits.items()}
    print(
        f"Wrote {sum(len(shards) for shards in index.splits.values())} shards of {len(index.classes)} classes to "
        f"{output} (train {counts['train']}, val {counts['val']}, test {counts['test']} images) and {INDEX}."
    )
    print(f"Train on them: {training_command(cfg)}")
    return index


@hydra.main(config_path=str(CONF_DIR), config_name="shard", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        convert(cfg)


if __name__ == "__main__":
    exit_after(lambda: hydra_command(main))
    sys.exit(0)

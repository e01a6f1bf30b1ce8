"""What a run trained, validated and tested on, as MLflow dataset inputs: "Datasets used" on the run's page, and the
dataset filter of the runs table, work across runs.

Each split is one MLflow dataset named `<data.name>-<split>` (e.g. `digits-train`), with the context tag MLflow reads
(`mlflow.data.context`: training, validation, test), its source (the image folder for data with a `root`, else the
loader and its arguments: how the split was made) and its profile (the image count and the images per class). The
digest fingerprints the split's contents — its class names, its labels in order and every image (the pixels of sets
held in memory, the MD5 of each image file's bytes) — so it is the same whenever the images and the split are, on any
machine, and differs when one image or label does. A file's hash is remembered in `data.cache_dir` with what verifying
it found (pipeline.data.contents), so only the first run on a folder reads every file's bytes. MLflow's own NumPy
digest reads only the first 10,000 values of an array (156 digits of 8×8 pixels); this one covers everything, and
keeps MLflow's form (the first 8 hex digits of an MD5).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from omegaconf import DictConfig, OmegaConf

from pipeline.data.contents import FileHashes
from pipeline.data.images import ImageSplits, LabelledImages, content_chunks

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.tracking.logger import RecordedMLFlowLogger

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # split → MLflow's context tag


class ImageSplitDataset(MetaDataset):
    """MLflow's metadata-only dataset (name, source, digest) with a profile: the split's images per class."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: Mapping[str, Any]) -> None:
        super().__init__(source, name=name, digest=digest)
        self._profile = dict(profile)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def digest(part: LabelledImages, classes: list[str], hashes: FileHashes | None = None) -> str:
    """The split's fingerprint (see the module's docstring); `hashes` gives image files' hashes (None: read them)."""
    md5 = hashlib.md5(usedforsecurity=False)
    md5.update(json.dumps(classes).encode())
    md5.update(np.ascontiguousarray(part.labels, dtype=np.int64))
    for chunk in content_chunks(part, hashes=hashes):
        md5.update(chunk)
    return md5.hexdigest()[:8]


def data_source(data: DictConfig) -> DatasetSource:
    """Where the images come from: the folder of a source with a root, else the loader with its arguments."""
    root = data.get("root")
    if root:
        return LocalArtifactDatasetSource(str(Path(str(root)).expanduser().resolve()))
    loader = OmegaConf.to_container(data.source, resolve=True)
    return CodeDatasetSource(tags={str(key): str(value) for key, value in loader.items()})


def split_datasets(data: DictConfig, splits: ImageSplits) -> dict[str, ImageSplitDataset]:
    """One dataset per split, by context (training, validation, test)."""
    source, counts = data_source(data), splits.class_counts()
    datasets = {}
    with FileHashes(data.get("cache_dir")) as hashes:
        for split, context in CONTEXTS.items():
            part = getattr(splits, split)
            profile = {"images": len(part), "classes": len(splits.classes), "images_per_class": counts[split]}
            fingerprint = digest(part, splits.classes, hashes)
            datasets[context] = ImageSplitDataset(source, f"{data.name}-{split}", fingerprint, profile)
    return datasets


def log_datasets(logger: RecordedMLFlowLogger, data: DictConfig, splits: ImageSplits) -> None:
    """The run's train, validation and test splits as its MLflow dataset inputs (kept in its record too)."""
    logger.log_datasets(recorded_entries(split_datasets(data, splits)))


def dataset_inputs(entries: list[dict[str, str]]) -> list[DatasetInput]:
    """MLflow's dataset inputs from recorded entries (a dataset's `to_dict()` and its `context`)."""
    inputs = []
    for entry in entries:
        fields = {key: value for key, value in entry.items() if key != "context"}
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, entry["context"])]
        inputs.append(DatasetInput(DatasetEntity(**fields), tags=tags))
    return inputs


# What each database says when a row with the same key was inserted first: SQLite, PostgreSQL, MySQL.
LOST_INSERT_RACE = ("UNIQUE constraint failed", "UniqueViolation", "Duplicate entry")


def log_inputs(client: MlflowClient, run_id: str, inputs: list[DatasetInput], attempts: int = 3) -> None:
    """`client.log_inputs`, tolerant of a race in MLflow's store: it inserts a dataset it has not seen yet without a
    lock, so two runs logging the same new dataset at once (trainings on one data set started together, sweep
    trials) may both insert it and one fails on the unique key. By then the dataset exists, and the call made again
    links it to the run."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as error:
            if attempt == attempts - 1 or not any(sign in str(error) for sign in LOST_INSERT_RACE):
                raise


def recorded_entries(datasets: Mapping[str, ImageSplitDataset]) -> list[dict[str, str]]:
    """What a run's record keeps of its datasets: enough to log them again (pipeline.sync)."""
    return [{**dataset.to_dict(), "context": context} for context, dataset in datasets.items()]


def missing_inputs(run: Any, entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The recorded datasets the run in MLflow does not have yet (same name, digest and context)."""
    held = {
        (item.dataset.name, item.dataset.digest, tag.value)
        for item in (run.inputs.dataset_inputs if run.inputs else [])
        for tag in item.tags
        if tag.key == MLFLOW_DATASET_CONTEXT
    }
    return [entry for entry in entries if (entry["name"], entry["digest"], entry["context"]) not in held]

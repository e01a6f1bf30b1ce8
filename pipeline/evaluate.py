"""python -m pipeline.evaluate source=<run | checkpoint | models:/name/version> [split=…] [data=…]: test a trained
model again, and log the result as a new MLflow run linked to its source.

The model is rebuilt from the source's config and checkpoint (pipeline.source) and tested by Lightning with our
ImageClassifier, so the metrics are the ones training reports (`<split>/acc`, `/f1`, `/acc_top5`, `/loss`);
on the source's own test split and best checkpoint they equal the training's `test/*`. The new run (tags
kind=evaluation, source_run_id) holds them, a per-class report (`reports/per_class.csv`: precision, recall, F1,
support) and the confusion matrix (`figures/confusion_matrix.png`), all also written to the output folder.

Exit status: 0 evaluated and logged; 2 an error the message explains (source, data, class count, tracking store);
3 evaluated, but the tracking server lacks part of the run (the message names the pipeline.sync command).
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.cli import adopt_output_folder, user_errors
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError

SPLITS = ("test", "val", "train")
KIND = "evaluation"


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # <split>/acc, /f1, /acc_top5 (≥ 5 classes), /loss, /samples
    per_class: list[dict[str, Any]]  # class, precision, recall, f1, support
    run_id: str  # the new evaluation run
    source_run_id: str | None  # the training run it evaluated, when known
    tracking_uri: str
    files: dict[str, Path]  # what was written locally: report, confusion matrix
    unsynced: str | None = None  # why the server lacks part of the run, and the command that uploads the rest


def evaluation_data(cfg: DictConfig, source: Any) -> DictConfig:
    """The data to test on, resolved: the source run's, or the data=<option> given, read with the channel count the
    network was trained on."""
    if cfg.get("data") is None:
        data = source.config.get("data")
        if data is None or data.get("source") is None:
            raise UserInputError(
                f"source={source.text}: the data it was trained on is unknown (no config beside the checkpoint). "
                "Say which images to test on with data=<option> (e.g. data=digits, or data=imagefolder data.root=…)."
            )
        return data
    with open_dict(cfg):
        if "channels" in cfg.data:
            cfg.data.channels = source.channels
    return OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))


def per_class_report(matrix: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows true, columns predicted)."""
    hits = np.diag(matrix).astype(float)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    rows = []
    for index, name in enumerate(classes):
        precision = hits[index] / predicted[index] if predicted[index] else 0.0
        recall = hits[index] / support[index] if support[index] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support[index])})
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("an evaluation does not train")


def evaluate(cfg: DictConfig) -> Evaluation:
    """Check everything a user can get wrong, then test and log the evaluation run."""
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from torch.utils.data import DataLoader

    from pipeline import tracking
    from pipeline.data.datamodule import TransformedImages
    from pipeline.data.sources import load_splits
    from pipeline.data.transforms import eval_transform
    from pipeline.module import ImageClassifier
    from pipeline.plots import confusion_matrix_png
    from pipeline.source import KIND_TAG, SOURCE_TAG, build_model, client_for, input_spec, load_source

    split = str(cfg.split)
    if split not in SPLITS:
        raise UserInputError(f"split={split}: must be one of {', '.join(SPLITS)} (e.g. split=test).")
    uri = str(cfg.logger.tracking_uri)
    tracking.prepare(uri, cfg.logger.http)
    source = load_source(str(cfg.source), uri, fallback=cfg)
    model = build_model(source)
    spec = input_spec(source, model)
    data = evaluation_data(cfg, source)
    splits = load_splits(data.source).subset(
        data.get("classes"), data.get("train_per_class"), seed=data.source.get("split_seed", 0)
    )
    if splits.num_classes != len(source.classes):
        raise UserInputError(
            f"data={data.name} has {splits.num_classes} classes but the model of source={source.text} was trained on "
            f"{len(source.classes)} ({', '.join(source.classes[:20])}{', …' if len(source.classes) > 20 else ''}): "
            f"test it on images of the same {len(source.classes)} classes, or pick them with data.classes=[…]."
        )
    if splits.classes != source.classes:
        print(
            f"note: the data's classes {splits.classes} are not named like the model's {source.classes}; output i is "
            "read as the data's i-th class.",
            file=sys.stderr,
        )
    images = getattr(splits, split)
    if len(images) == 0:
        raise UserInputError(f"split={split}: data={data.name} has no {split} images; choose another split=.")
    loader = DataLoader(
        TransformedImages(images, eval_transform(spec)),
        batch_size=int(cfg.batch_size or data.batch_size),
        num_workers=int(data.get("num_workers") or 0),
    )
    module = ImageClassifier(model, num_classes=splits.num_classes, optimizer=_no_training, scheduler=_no_training)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model_name = str(source.config.model.name)
    experiment = cfg.logger.experiment_name
    if experiment is None and source.experiment_id is not None:
        experiment = client_for(uri).get_experiment(source.experiment_id).name
    run_name = cfg.logger.run_name or f"eval-{model_name}-{data.name}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_cfg = OmegaConf.create(
        {
            "logger": {
                "tracking_uri": uri,
                "experiment_name": str(experiment or data.name),
                "run_name": run_name,
                "artifact_root": str(cfg.logger.artifact_root),
                "run_id": None,
                "parent_run_id": None,
                "tags": OmegaConf.to_container(cfg.logger.tags),
            },
            "paths": {"output_dir": str(output_dir)},
            "model": {"name": model_name},
            "data": {"name": str(data.name)},
            "aug": {"name": "none"},
        }
    )
    tags = {k: v for k, v in tracking.run_tags(run_cfg).items() if k != "aug"}
    tags.update({KIND_TAG: KIND, "evaluation.split": split, "source": source.text, "checkpoint": source.checkpoint})
    if source.run_id:
        tags[SOURCE_TAG] = source.run_id
    if source.model_version:
        tags["registered_model"] = source.model_version
    tags.update({str(k): str(v) for k, v in (cfg.logger.tags or {}).items()})

    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["precision"] = trainer_args.get("precision") or source.config.get("trainer", {}).get(
        "precision", "32-true"
    )
    progress = {"rich": RichProgressBar, "tqdm": TQDMProgressBar}.get(cfg.progress)
    evaluated = {
        **OmegaConf.to_container(source.config, resolve=True),
        "data": OmegaConf.to_container(data, resolve=True),
        "evaluation": {"source": source.text, "checkpoint": source.checkpoint, "split": split},
    }

    logger = tracking.open_run(run_cfg, tags)
    with tracking.recorded_status(logger.end):
        logger.log_hyperparams(
            tracking.flatten(
                {
                    "source": source.text,
                    "split": split,
                    "model": evaluated["model"],
                    "data": evaluated["data"],
                    "source_run_id": source.run_id or "",
                }
            )
        )
        logger.log_text(OmegaConf.to_yaml(evaluated), "config.yaml")
        trainer = L.Trainer(
            **trainer_args,
            logger=False,
            callbacks=[progress()] if progress else [],
            enable_checkpointing=False,
            enable_progress_bar=progress is not None,
            default_root_dir=output_dir,
        )
        tested = trainer.test(module, dataloaders=loader, verbose=False)[0]
        counts = module.test_confusion.compute().cpu().numpy()
        metrics = {f"{split}/{name.split('/', 1)[1]}": float(value) for name, value in tested.items()}
        metrics[f"{split}/samples"] = float(counts.sum())
        logger.log_metrics(metrics, step=0)
        report = per_class_report(counts, splits.classes)
        files = {
            "reports": write_csv(report, output_dir / "per_class.csv"),
            "figures": confusion_matrix_png(
                counts,
                splits.classes,
                output_dir / "confusion_matrix.png",
                title=f"{model_name} on {data.name} ({split})",
            ),
        }
        tracking.log_files(logger, files)
    return Evaluation(metrics, report, logger.run_id, source.run_id, uri, files, logger.unsynced)


def report(result: Evaluation) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline import tracking

    console = Console(soft_wrap=True)
    table = Table(title="Evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    classes = Table(title="Per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for row in result.per_class:
        classes.add_row(
            str(row["class"]),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            str(row["support"]),
        )
    console.print(classes)
    console.print(f"Evaluation run: {result.run_id} (source run: {result.source_run_id or 'unknown'})")
    for path in result.files.values():
        console.print(f"Wrote {path}")
    console.print(f"See the runs: {tracking.ui_command(result.tracking_uri)}")


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    adopt_output_folder(cfg)
    with user_errors():
        result = evaluate(cfg)
    report(result)
    if result.unsynced:
        print(f"error: {result.unsynced}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()

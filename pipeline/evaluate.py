"""python -m pipeline.evaluate source=<run | checkpoint | models:/name/version> [split=…] [data=…]: test a trained
model again, and log the result as a new MLflow run linked to its source.

The model is rebuilt from the source's config and checkpoint (pipeline.source) and tested by Lightning with our
ImageClassifier, so the metrics are the ones training reports (`<split>/acc`, `/f1`, `/acc_top5`, `/loss`);
on the source's own test split and best checkpoint they equal the training's `test/*`. The new run (tags
kind=evaluation, source_run_id) holds them, a per-class report (`reports/per_class.csv`: precision, recall, F1,
support), the confusion matrix (every cell in `reports/confusion_matrix.csv`; `figures/confusion_matrix.png` draws at
most `per_class.shown` classes, the most-confused ones when there are more) and Grad-CAM heat maps of the predicted
class on a few of the images (`figures/class_activation.png`), all also written to the output folder.

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

from pipeline.cli import command, exit_after, hydra_command, metrics_table, progress_bar
from pipeline.config import CONF_DIR, validate
from pipeline.errors import UserInputError
from pipeline.plots import SHOWN_CLASSES

SPLITS = ("test", "val", "train")
KIND = "evaluation"


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # <split>/acc, /f1, /acc_top5 (≥ 5 classes), /loss, /samples
    per_class: list[dict[str, Any]]  # class, precision, recall, f1, support
    run_id: str  # the new evaluation run
    source_run_id: str | None  # the training run it evaluated, when known
    tracking_uri: str
    files: dict[str, Path]  # what was written locally: report, confusion matrix (figure and CSV), class activations
    unsynced: str | None = None  # why the server lacks part of the run, and the command that uploads the rest
    shown: int = SHOWN_CLASSES  # classes the printed table lists one by one (per_class.shown)


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
    from sklearn.metrics import precision_recall_fscore_support

    scores = np.zeros((4, len(classes)))  # nothing counted: every score 0 (sklearn refuses all-zero weights)
    if matrix.any():
        true, predicted = np.indices(matrix.shape).reshape(2, -1)  # one sample per cell, weighted by its count
        scores = precision_recall_fscore_support(
            true, predicted, labels=range(len(classes)), sample_weight=matrix.ravel(), zero_division=0
        )
    return [
        {
            "class": name,
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(support),
        }
        for name, precision, recall, f1, support in zip(classes, *scores, strict=True)
    ]


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("an evaluation does not train")


def open_evaluation_run(cfg: DictConfig, source: Any, data_name: str, split: str, output_dir: Path) -> Any:
    """The evaluation's own MLflow run, in the source run's experiment unless logger.experiment_name says otherwise,
    tagged with what it evaluated (kind=evaluation, source_run_id)."""
    from pipeline.source import client_for
    from pipeline.tracking.provenance import KIND_TAG, SOURCE_TAG, run_tags
    from pipeline.tracking.runs import open_run

    uri = str(cfg.logger.tracking_uri)
    model_name = str(source.config.model.name)
    experiment = cfg.logger.experiment_name
    if experiment is None and source.experiment_id is not None:
        experiment = client_for(uri).get_experiment(source.experiment_id).name
    run_name = cfg.logger.run_name or f"eval-{model_name}-{data_name}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {KIND_TAG: KIND, "evaluation.split": split, "source": source.text, "checkpoint": source.checkpoint}
    if source.run_id:
        tags[SOURCE_TAG] = source.run_id
    if source.model_version:
        tags["registered_model"] = source.model_version
    tags = run_tags(output_dir, {"model": model_name, "dataset": data_name, **tags}, extra=cfg.logger.tags)
    return open_run(uri, str(experiment or data_name), run_name, output_dir, tags, cfg.logger.artifact_root)


def evaluation_images(cfg: DictConfig, source: Any, split: str) -> tuple[DictConfig, Any, Any]:
    """The data config, its splits and the images of `split` to test the source's model on; the class count must
    match the network's outputs."""
    from pipeline.data.sources import load_data

    data = evaluation_data(cfg, source)
    splits = load_data(data)
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
    return data, splits, images


def run_test(cfg: DictConfig, source: Any, model: Any, images: Any, data: DictConfig) -> tuple[Any, dict[str, float]]:
    """Lightning tests `model` on `images` with our ImageClassifier (so the metrics are training's own); returns the
    confusion counts and the metrics named `<split>/…`."""
    import lightning as L
    from torch.utils.data import DataLoader

    from pipeline.data.datamodule import TransformedImages
    from pipeline.data.normalize import Normalize
    from pipeline.data.transforms import eval_transform
    from pipeline.module import ImageClassifier
    from pipeline.source import input_spec

    spec = input_spec(source, model)
    loader = DataLoader(
        TransformedImages(images, eval_transform(spec)),
        batch_size=int(cfg.batch_size or data.batch_size),
        num_workers=int(data.get("num_workers") or 0),
    )
    module = ImageClassifier(
        model,
        num_classes=len(source.classes),
        optimizer=_no_training,
        scheduler=_no_training,
        normalize=Normalize(spec.mean, spec.std),
    )
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["precision"] = trainer_args.get("precision") or source.config.get("trainer", {}).get(
        "precision", "32-true"
    )
    progress = progress_bar(cfg.progress)
    trainer = L.Trainer(
        **trainer_args,
        logger=False,
        callbacks=[progress] if progress is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=progress is not None,
        default_root_dir=cfg.paths.output_dir,
    )
    tested = trainer.test(module, dataloaders=loader, verbose=False)[0]
    counts = module.test_confusion.compute().cpu().numpy()
    metrics = {f"{cfg.split}/{name.split('/', 1)[1]}": float(value) for name, value in tested.items()}
    metrics[f"{cfg.split}/samples"] = float(counts.sum())
    return counts, metrics


def evaluate(cfg: DictConfig) -> Evaluation:
    """Check everything a user can get wrong, then test and log the evaluation run."""
    from pipeline.cam import class_activation_png
    from pipeline.distributed import check_accelerator
    from pipeline.plots import confusion_matrix_csv, confusion_matrix_png
    from pipeline.source import build_model, input_spec, load_source
    from pipeline.tracking.naming import flatten
    from pipeline.tracking.runs import log_files
    from pipeline.tracking.status import recorded_status
    from pipeline.tracking.store import prepare

    split = str(cfg.split)
    if split not in SPLITS:
        raise UserInputError(f"split={split}: must be one of {', '.join(SPLITS)} (e.g. split=test).")
    validate(cfg, only=("per_class.shown",))  # the rule training's per_class.shown is held to
    check_accelerator(cfg.trainer)
    shown = OmegaConf.select(cfg, "per_class.shown", default=SHOWN_CLASSES)
    uri = str(cfg.logger.tracking_uri)
    prepare(uri, cfg.logger.http)
    source = load_source(str(cfg.source), uri, fallback=cfg)
    model = build_model(source)
    data, splits, images = evaluation_images(cfg, source, split)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    logger = open_evaluation_run(cfg, source, str(data.name), split, output_dir)
    evaluated = {
        **OmegaConf.to_container(source.config, resolve=True),
        "data": OmegaConf.to_container(data, resolve=True),
        "evaluation": {"source": source.text, "checkpoint": source.checkpoint, "split": split},
    }
    with recorded_status(logger.end):
        params = {"source": source.text, "split": split, "model": evaluated["model"], "data": evaluated["data"]}
        logger.log_hyperparams(flatten({**params, "source_run_id": source.run_id or ""}))
        logger.log_text(OmegaConf.to_yaml(evaluated), "config.yaml")
        counts, metrics = run_test(cfg, source, model, images, data)
        logger.log_metrics(metrics, step=0)
        report = per_class_report(counts, splits.classes)
        title = f"{source.config.model.name} on {data.name} ({split})"
        files = {
            "reports": write_csv(report, output_dir / "per_class.csv"),
            "figures": confusion_matrix_png(
                counts, splits.classes, output_dir / "confusion_matrix.png", title=title, shown=shown
            ),
            "confusion_matrix": confusion_matrix_csv(counts, splits.classes, output_dir / "confusion_matrix.csv"),
        }
        log_files(logger, {"reports": files["reports"], "figures": files["figures"]})
        log_files(logger, {"reports": files["confusion_matrix"]})
        activation = class_activation_png(  # Grad-CAM of the predicted class on a few of the images
            model,
            images,
            input_spec(source, model),
            splits.classes,
            OmegaConf.select(cfg, "class_activation.images", default=0),
            output_dir / "class_activation.png",
            title=f"{title}: Grad-CAM of the predicted class",
        )
        if activation:
            log_files(logger, {"figures": activation})
            files["class_activation"] = activation
    return Evaluation(metrics, report, logger.run_id, source.run_id, uri, files, logger.unsynced, shown)


def report(result: Evaluation) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.tracking.store import ui_command

    console = Console(soft_wrap=True)
    console.print(metrics_table("Evaluation", result.metrics))
    rows = result.per_class
    title = "Per class"
    if len(rows) > result.shown:  # a thousand-row table scrolls away what matters: the weakest classes, worst first
        rows = sorted(rows, key=lambda row: (row["f1"], row["class"]))[: result.shown]
        title = f"The {result.shown} of {len(result.per_class)} classes with the lowest F1 (every class: per_class.csv)"
    classes = Table(title=title)
    for column in ("class", "precision", "recall", "f1", "support"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for row in rows:
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
    console.print(f"See the runs: {ui_command(result.tracking_uri)}")


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with command(cfg):
        result = evaluate(cfg)
    report(result)
    if result.unsynced:
        print(f"error: {result.unsynced}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    exit_after(lambda: hydra_command(main))

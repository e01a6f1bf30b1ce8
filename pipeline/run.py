"""run(cfg): the one training path. The CLI, the sweep trials and the tests all call it.

config → data → model → LightningModule → tracked Trainer.fit → test with the best checkpoint → metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import timm
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline import internals, resume
from pipeline.cam import class_activation_png
from pipeline.cli import progress_bar
from pipeline.config import validate
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.images import ImageSplits
from pipeline.data.preview import save_augmentation_grid
from pipeline.data.sources import load_data
from pipeline.data.transforms import InputSpec, eval_transform, train_transform
from pipeline.distributed import (
    ReportingDDPStrategy,
    describe_batch,
    end_process_group,
    is_first_process,
    single_process_tester,
)
from pipeline.ema import ModelEma
from pipeline.finetune import BackboneFreeze
from pipeline.models.factory import ModelError, create_model
from pipeline.models.stats import count_flops, count_parameters
from pipeline.models.weights import WeightsError
from pipeline.module import ImageClassifier
from pipeline.plots import confusion_matrix_png
from pipeline.recipes import LearningRates, ParameterGroups, build_mixup, mixup_enabled, optimizer_factory
from pipeline.resume import RandomStateCheckpoint
from pipeline.tracking.checkpoints import local_weights
from pipeline.tracking.logger import RecordedMLFlowLogger
from pipeline.tracking.runs import log_files, log_inputs, open_training_run, recorded_status
from pipeline.tracking.store import prepare


class CheckpointOnException(Callback):
    """Save the training state when fit is interrupted or crashes, so nothing trained is lost.

    Lightning's OnExceptionCheckpoint does the same but also makes every later `fit(ckpt_path=None)`
    silently resume from "last"; resuming is an explicit choice here.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # trainer.save_checkpoint would wait at a barrier for every rank: under DDP one may be dead.
        trainer.strategy.save_checkpoint(internals.dump_checkpoint(trainer), self.path)


PREVIEW_SAMPLES, PREVIEW_VIEWS = 6, 8  # the augmentation grid every run logs


@dataclass(frozen=True)
class RunResult:
    metrics: dict[str, float]  # final test metrics of the best checkpoint, plus the best validation score
    run_id: str
    tracking_uri: str
    best_checkpoint: str | None
    output_dir: Path
    unsynced: str | None = None  # why MLflow lacks part of the run, and the command that uploads the rest


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path, tracked: bool = True) -> list[Callback]:
    monitor, mode = cfg.monitor.metric, cfg.monitor.mode
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=cfg.checkpoint.save_last,
        ),
        CheckpointOnException(checkpoint_dir / "interrupted.ckpt"),
        RandomStateCheckpoint(),
        *([LearningRates()] if tracked else []),  # one curve per learning rate, however many groups share it
        BackboneFreeze(cfg.finetune.unfreeze_epoch),  # conf/finetune: which parameters train when
    ]
    if cfg.early_stopping.patience is not None:
        callbacks.append(
            EarlyStopping(
                monitor,
                patience=cfg.early_stopping.patience,
                mode=mode,
                min_delta=cfg.early_stopping.min_delta,
            )
        )
    if cfg.get("ema") and cfg.ema.enabled:  # validate, test and checkpoint an average of the weights
        callbacks.append(ModelEma(decay=cfg.ema.decay, warmup=cfg.ema.warmup))
    progress = progress_bar(cfg.progress)
    if progress is not None:
        callbacks.append(progress)
    return callbacks


def build_data(cfg: DictConfig, splits: ImageSplits, spec: InputSpec) -> ImageDataModule:
    return ImageDataModule(
        splits,
        train_transform=train_transform(cfg.aug.train, spec, seed=cfg.seed),
        eval_transform=eval_transform(spec),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        persistent_workers=cfg.data.persistent_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        drop_last=mixup_enabled(cfg.get("mixup")),  # timm's Mixup needs an even batch
    )


@dataclass(frozen=True)
class Inputs:
    """What a run trains on and with: the data, the model, and the input spec that joins them."""

    splits: ImageSplits
    model: nn.Module
    spec: InputSpec
    flops: int  # of one forward pass on one image


def build_inputs(cfg: DictConfig) -> Inputs:
    """Load the data and build the model (with its pretrained weights); the model's pretrained config sets the
    input spec."""
    splits = load_data(cfg.data)
    weights = cfg.model.weights if cfg.model.pretrained else None
    with local_weights(weights, str(cfg.logger.tracking_uri), f"model.weights={weights}", WeightsError) as file:
        model = create_model(
            cfg.model.name,
            num_classes=splits.num_classes,
            in_chans=splits.channels,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
            weights_file=file,
            reset_head=cfg.model.reset_head,
            kwargs=cfg.model.kwargs,
        )
    model_config = timm.data.resolve_model_data_config(model)
    spec = InputSpec.resolve(model_config, cfg.data.image_size, cfg.data.mean, cfg.data.std, splits.channels)
    try:  # one image through the model now, so a size it cannot take fails here, not inside the Trainer
        flops = count_flops(model, (spec.channels, *spec.size))
    except RuntimeError as error:
        _, height, width = model_config["input_size"]
        raise ModelError(
            f"{cfg.model.name} cannot take {spec.channels}×{spec.size[0]}×{spec.size[1]} inputs ({error}). "
            f"Its own input size is {height}×{width}: set data.image_size=[{height},{width}] or null."
        ) from error
    return Inputs(splits, model, spec, flops)


def build_trainer(
    cfg: DictConfig, output_dir: Path, logger: RecordedMLFlowLogger | None, callbacks: Sequence[Callback]
) -> L.Trainer:
    arguments = instantiate(cfg.trainer, _convert_="all")  # a strategy given by _target_ becomes its object
    trainer = L.Trainer(
        **arguments,
        logger=logger or False,
        callbacks=[*build_callbacks(cfg, output_dir / "checkpoints", tracked=logger is not None), *callbacks],
        default_root_dir=output_dir,
        enable_progress_bar=cfg.progress != "none",
    )
    if logger is not None and isinstance(trainer.strategy, ReportingDDPStrategy):
        trainer.strategy.on_rank_death = lambda message: fail_run(logger, message)
    return trainer


def fail_run(logger: RecordedMLFlowLogger, message: str) -> None:
    logger.set_tag("failure", message)
    logger.end("FAILED")


def follow(
    cfg: DictConfig, module: ImageClassifier, datamodule: ImageDataModule, callbacks: Sequence[Callback]
) -> RunResult:
    """A data-parallel rank other than the first: trains its shard of every batch; tracks and tests nothing."""
    output_dir = Path(cfg.paths.output_dir)
    trainer = build_trainer(cfg, output_dir, None, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
    end_process_group()
    return RunResult({}, "", str(cfg.logger.tracking_uri), None, output_dir)


def run(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train and test as configured; `callbacks` are added to the Trainer's (a sweep trial reports through one)."""
    validate(cfg)
    cfg = resume.resolve(cfg)  # resume=<run id | checkpoint>: which checkpoint, into which run and folder
    lead = is_first_process()
    if lead:
        prepare(str(cfg.logger.tracking_uri), cfg.logger.http)  # a server that is down fails now, not later
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    inputs = build_inputs(cfg)
    splits, model, spec = inputs.splits, inputs.model, inputs.spec
    datamodule = build_data(cfg, splits, spec)
    module = ImageClassifier(
        model,
        num_classes=splits.num_classes,
        optimizer=optimizer_factory(cfg.optim),
        grouping=ParameterGroups.from_config(cfg.optim),  # weight decay and layer decay per parameter group
        scheduler=instantiate(cfg.scheduler),
        label_smoothing=cfg.loss.label_smoothing,
        aux_weight=cfg.loss.aux_weight,
        backbone_lr_factor=cfg.finetune.backbone_lr_factor,
        mixup=build_mixup(cfg.get("mixup"), splits.num_classes),
        mixup_off_epoch=OmegaConf.select(cfg, "mixup.off_epoch"),
        lr_base=cfg.optim.get("lr_base"),
        lr_scale=cfg.optim.get("lr_scale", "linear"),
        channels_last=OmegaConf.select(cfg, "perf.channels_last", default=False),
        compile=OmegaConf.select(cfg, "perf.compile", default=False),
        grad_checkpointing=OmegaConf.select(cfg, "perf.grad_checkpointing", default=False),
    )
    if not lead:
        return follow(cfg, module, datamodule, callbacks)
    # model/trainable_params is logged every epoch by the fine-tuning callback: it changes with finetune.
    cost = {"model/params": count_parameters(model)[0], "model/flops": inputs.flops}
    preview = save_augmentation_grid(
        output_dir / "augmentation_preview.png",
        splits.train,
        PREVIEW_SAMPLES,
        cfg.aug.train,
        spec,
        views=PREVIEW_VIEWS,
        seed=cfg.seed,
        title=f"aug={cfg.aug.name}: training images of {cfg.data.name}",
    )

    logger = open_training_run(cfg)
    with recorded_status(logger.end):
        log_inputs(logger, cfg, cost, splits.class_counts(), splits.skipped)
        log_files(logger, {"figures": preview})
        trainer = build_trainer(cfg, output_dir, logger, callbacks)
        print(
            describe_batch(
                cfg.data.batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
            ),
            flush=True,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path or None
        tester = single_process_tester(
            trainer, instantiate(cfg.trainer, _convert_="all"), progress_bar(cfg.progress), logger
        )
        test_metrics = tester.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        confusion_counts = module.test_confusion.compute().cpu().numpy()
        test_metrics["test/samples"] = float(confusion_counts.sum())  # every test image once, whatever the ranks
        logger.log_metrics({"test/samples": test_metrics["test/samples"]}, step=trainer.global_step)
        confusion = confusion_matrix_png(
            confusion_counts,
            splits.classes,
            output_dir / "confusion_matrix.png",
            title=f"{cfg.model.name} on {cfg.data.name} (test)",
        )
        log_files(logger, {"figures": confusion})
        activation = class_activation_png(  # Grad-CAM of the predicted class on a few test images
            module.model,
            splits.test,
            spec,
            splits.classes,
            OmegaConf.select(cfg, "class_activation.images", default=0),
            output_dir / "class_activation.png",
            title=f"{cfg.model.name} on {cfg.data.name} (test): Grad-CAM of the predicted class",
        )
        log_files(logger, {"figures": activation} if activation else {})
        if best and cfg.logger.log_checkpoint:
            log_files(logger, {"checkpoints": Path(best)})
        logger.set_tag("checkpoint.weights", "ema" if OmegaConf.select(cfg, "ema.enabled") else "live")
        profiles = getattr(trainer.profiler, "dirpath", None)  # debug=profile: the profiler's reports
        for report in sorted(Path(profiles).glob("*.txt")) if profiles else ():
            log_files(logger, {"profile": report})

    best_score = trainer.checkpoint_callback.best_model_score
    metrics = {name: float(value) for name, value in test_metrics.items()}
    if best_score is not None:
        metrics[f"best_{cfg.monitor.metric}"] = float(best_score)
    return RunResult(metrics, logger.run_id, str(cfg.logger.tracking_uri), best, output_dir, logger.unsynced)

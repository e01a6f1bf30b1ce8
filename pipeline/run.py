"""run(cfg): the one training path. The CLI, the sweep trials and the tests all call it.

config → data → model → LightningModule → tracked Trainer.fit → test with the best checkpoint → metrics.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import timm
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from pipeline import checkpointing, internals, network, resume
from pipeline.cam import class_activation_png
from pipeline.checkpointing import AtomicCheckpointIO
from pipeline.cli import progress_bar
from pipeline.config import ConfigError, check_arguments, relative_data_root, validate
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.images import ImageSplits
from pipeline.data.normalize import Normalize
from pipeline.data.preview import save_augmentation_grid
from pipeline.data.shard_stream import ShardDataModule
from pipeline.data.shards import ShardSet
from pipeline.data.sources import load_data
from pipeline.data.transforms import InputSpec, eval_transform, train_transform
from pipeline.distributed import (
    ReportingDDPStrategy,
    check_accelerator,
    describe_batch,
    end_process_group,
    is_first_process,
    single_process_tester,
)
from pipeline.ema import ModelEma
from pipeline.errors import TrainingDiverged
from pipeline.finetune import BackboneFreeze
from pipeline.models.factory import ModelError, create_model
from pipeline.models.stats import count_flops, count_parameters
from pipeline.models.weights import WeightsError
from pipeline.module import ImageClassifier, SchedulerFactory
from pipeline.plots import SHOWN_CLASSES, confusion_matrix_csv, confusion_matrix_png
from pipeline.recipes import LearningRates, ParameterGroups, build_mixup, mixup_enabled, optimizer_factory
from pipeline.resume import ConfigCheckpoint, RandomStateCheckpoint
from pipeline.schedules import fit_warmup
from pipeline.tracking.checkpoints import local_weights
from pipeline.tracking.datasets import log_datasets
from pipeline.tracking.logger import RecordedMLFlowLogger
from pipeline.tracking.model import log_best_model
from pipeline.tracking.runs import log_files, log_inputs, open_training_run
from pipeline.tracking.status import recorded_status
from pipeline.tracking.store import prepare


class CheckpointOnException(Callback):
    """Save the training state when fit is interrupted or crashes, so nothing trained is lost.

    Lightning's OnExceptionCheckpoint does the same but also makes every later `fit(ckpt_path=None)`
    silently resume from "last"; resuming is an explicit choice here. Nothing is saved when training had not
    started (a checkpoint that failed to load would be overwritten by untrained weights), nor when it diverged, nor
    weights that are NaN.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.training = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training = True  # a resumed checkpoint is restored by now

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.training or isinstance(exception, TrainingDiverged):  # a diverged state is nothing to resume
            return
        checkpoint = internals.dump_checkpoint(trainer)
        if checkpointing.nonfinite_tensors(checkpoint):
            print(f"note: {self.path.name} was not written: the weights are NaN or infinite", file=sys.stderr)
            return
        try:
            # trainer.save_checkpoint would wait at a barrier for every rank: under DDP one may be dead.
            trainer.strategy.save_checkpoint(checkpoint, self.path)
        except OSError as error:  # e.g. the disk is full: what stopped the run is the error to report
            print(f"note: {self.path.name} was not written: {error}", file=sys.stderr)


PREVIEW_SAMPLES, PREVIEW_VIEWS = 6, 8  # the augmentation grid every run logs


@dataclass(frozen=True)
class RunResult:
    metrics: dict[str, float]  # final test metrics of the best checkpoint, plus the best validation score
    run_id: str
    tracking_uri: str
    best_checkpoint: str | None
    output_dir: Path
    unsynced: str | None = None  # why MLflow lacks part of the run, and the command that uploads the rest
    model_id: str | None = None  # the MLflow model it logged (models:/<id>)


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path, tracked: bool = True) -> list[Callback]:
    monitor, mode = cfg.monitor.metric, cfg.monitor.mode
    callbacks: list[Callback] = [
        ModelCheckpoint(  # first: trainer.checkpoint_callback, whose best checkpoint is tested
            dirpath=checkpoint_dir,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_top_k=OmegaConf.select(cfg, "checkpoint.save_top_k", default=1),  # configs written before it: 1
        ),
        CheckpointOnException(checkpoint_dir / "interrupted.ckpt"),
        RandomStateCheckpoint(),
        ConfigCheckpoint(cfg),
        *([LearningRates()] if tracked else []),  # one curve per learning rate, however many groups share it
        BackboneFreeze(cfg.finetune.unfreeze_epoch),  # conf/finetune: which parameters train when
    ]
    if cfg.checkpoint.save_last:
        # last.ckpt after every epoch. Not ModelCheckpoint(save_last=True) on the callback above: with a monitored
        # metric, Lightning 2.6 writes last.ckpt only in the epochs where that metric improved. Lightning runs
        # checkpoint callbacks after the others, in this order: the best one first, so last.ckpt holds its state.
        callbacks.append(
            ModelCheckpoint(dirpath=checkpoint_dir, filename="last", save_top_k=1, enable_version_counter=False)
        )
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


def declared_callbacks(cfg: DictConfig) -> list[Callback]:
    """The callbacks of conf/callbacks (`callbacks.<name>`: a _target_ and its arguments; null leaves one out), built
    now so that a wrong class or argument stops the run before any work. They are added to build_callbacks' own,
    which no entry here can replace or remove."""
    built = []
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is None:
            continue
        key, target = f"callbacks.{name}", entry._target_
        kind = _locate(target, f"{key}._target_")
        if not (isinstance(kind, type) and issubclass(kind, Callback)):
            raise ConfigError(f"{key}._target_={target} is not a Lightning callback (lightning.pytorch.Callback)")
        if issubclass(kind, ProgressBar):
            raise ConfigError(f"{key}: the progress bar is chosen by progress=rich|tqdm|none, not as a callback")
        try:
            built.append(instantiate(entry, _convert_="all"))
        except Exception as error:  # Hydra wraps the constructor's error: show that one
            cause = " ".join(str(error.__cause__ or error).split())
            raise ConfigError(
                f"{key}: {kind.__name__} cannot be built from its arguments ({cause}). Fix {key}.<argument>=…, or "
                f"leave it out with {key}=null"
            ) from error
    return built


def _locate(target: str, key: str) -> object:
    """The class `target` names (module.Class); an error naming `key` and the close names when it does not exist."""
    module_name, _, name = target.rpartition(".")
    example = "Give the class's full import path, e.g. lightning.pytorch.callbacks.Timer"
    if not module_name:
        raise ConfigError(f"{key}={target} is not an import path. {example}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # whatever importing a user's module raises: its message says what
        raise ConfigError(f"{key}={target}: cannot import {module_name} ({error}). {example}") from error
    if not hasattr(module, name):
        classes = [n for n in dir(module) if isinstance(getattr(module, n), type)]
        close = difflib.get_close_matches(name, classes, n=3)
        raise ConfigError(
            f"{key}={target}: {module_name} has no {name}" + (f". Close matches: {', '.join(close)}" if close else "")
        )
    return getattr(module, name)


def build_data(cfg: DictConfig, splits: ImageSplits, spec: InputSpec) -> ImageDataModule:
    # Shards (data=shards) stream into training; every other source is indexed.
    kind = ShardDataModule if isinstance(splits.train, ShardSet) else ImageDataModule
    return kind(
        splits,
        train_transform=train_transform(cfg.aug.train, spec, seed=cfg.seed),
        eval_transform=eval_transform(spec),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        persistent_workers=cfg.data.persistent_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        drop_last=mixup_enabled(cfg.get("mixup")),  # timm's Mixup needs an even batch
        draft=bool(cfg.data.get("draft", False)),
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


def absolute_data_root(cfg: DictConfig) -> None:
    """A relative data.root is read from the folder the command runs in: the run records it absolute, so evaluate,
    predict and resume find the images from any folder (paths.root is absolute for the same reason)."""
    if (root := relative_data_root(cfg)) is not None:
        with open_dict(cfg):
            cfg.data.root = str(root)


def build_trainer(
    cfg: DictConfig, output_dir: Path, logger: RecordedMLFlowLogger | None, callbacks: Sequence[Callback]
) -> L.Trainer:
    arguments = instantiate(cfg.trainer, _convert_="all")  # a strategy given by _target_ becomes its object
    given = arguments.pop("plugins", None) or []  # e.g. Ray's cluster environment for a trial spread over workers
    trainer = L.Trainer(
        **arguments,
        # checkpoints written whole or not at all, never with NaN weights
        plugins=[*(given if isinstance(given, list) else [given]), AtomicCheckpointIO()],
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


def fitted_scheduler(cfg: DictConfig, lead: bool) -> tuple[SchedulerFactory, dict[str, float]]:
    """The schedule from conf/scheduler with a warm-up that fits in the run, and the warm-up it uses (as a param,
    for the run's record). A shortened warm-up is said in one line on stderr."""
    asked = cfg.scheduler.get("warmup_epochs")
    if asked is None:  # a schedule of one's own without a warm-up
        return instantiate(cfg.scheduler), {}
    used = fit_warmup(asked, cfg.trainer.max_epochs)
    if used != asked and lead:
        print(
            f"warning: scheduler.warmup_epochs={asked} does not fit in trainer.max_epochs={cfg.trainer.max_epochs}: "
            f"warming up for {used:g} epochs instead (logged as scheduler.warmup_epochs_used)",
            file=sys.stderr,
            flush=True,
        )
    return instantiate(cfg.scheduler, warmup_epochs=used), {"scheduler.warmup_epochs_used": used}


def run(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train and test as configured; `callbacks` are added to the Trainer's (a sweep trial reports through one)."""
    validate(cfg)
    check_arguments(cfg)  # a key added with + that its optimizer, schedule, trainer… does not take fails here
    check_accelerator(cfg.trainer)
    absolute_data_root(cfg)
    callbacks = [*declared_callbacks(cfg), *callbacks]
    lead = is_first_process()
    network.use_launcher_interface()  # a rank of a run over several hosts talks to them through the right interface
    if lead:  # a server that is down fails now, not later (nor as "no such run" for resume=<run id>)
        prepare(str(cfg.logger.tracking_uri), cfg.logger.http)
    cfg = resume.resolve(cfg, lead)  # resume=<run id | checkpoint>: which checkpoint, into which run and folder
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    inputs = build_inputs(cfg)
    splits, model, spec = inputs.splits, inputs.model, inputs.spec
    datamodule = build_data(cfg, splits, spec)
    scheduler, schedule_params = fitted_scheduler(cfg, lead)
    module = ImageClassifier(
        model,
        num_classes=splits.num_classes,
        optimizer=optimizer_factory(cfg.optim),
        grouping=ParameterGroups.from_config(cfg.optim),  # weight decay and layer decay per parameter group
        scheduler=scheduler,
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
        normalize=Normalize(spec.mean, spec.std, OmegaConf.select(cfg, "perf.channels_last", default=False)),
    )
    if cfg.resume is not None:
        resume.check_fits(module, cfg.resume)  # before anything is written into the run's folder
    if not lead:
        return follow(cfg, module, datamodule, callbacks)
    opened: list[RecordedMLFlowLogger] = []  # the run once it is opened: a full disk is reported with its id
    with resume.disk_full_explained(output_dir, opened):
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
        opened.append(logger)
        with recorded_status(
            logger.end,
            note=lambda reason: logger.set_tag("failure", reason),
            interrupted=lambda stop: resume.note_how_to_resume(stop, logger.run_id, output_dir),
        ):
            log_inputs(logger, cfg, cost, splits.class_counts(), splits.skipped)
            log_datasets(logger, cfg.data, splits)
            logger.log_hyperparams(schedule_params)
            log_files(logger, {"figures": preview})
            trainer = build_trainer(cfg, output_dir, logger, callbacks)
            print(
                describe_batch(
                    cfg.data.batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
                ),
                flush=True,
            )
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
            except TrainingDiverged as error:  # say what is kept, rather than promise it
                raise TrainingDiverged(f"{error} {resume.what_is_kept(output_dir)}") from error
            best = trainer.checkpoint_callback.best_model_path or None
            tester = single_process_tester(
                trainer, instantiate(cfg.trainer, _convert_="all"), progress_bar(cfg.progress), logger
            )
            test_metrics = tester.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[
                0
            ]
            confusion_counts = module.test_confusion.compute().cpu().numpy()
            test_metrics["test/samples"] = float(confusion_counts.sum())  # every test image once, whatever the ranks
            logger.log_metrics({"test/samples": test_metrics["test/samples"]}, step=0)  # with the other test/*
            confusion = confusion_matrix_png(
                confusion_counts,
                splits.classes,
                output_dir / "confusion_matrix.png",
                title=f"{cfg.model.name} on {cfg.data.name} (test)",
                shown=OmegaConf.select(cfg, "per_class.shown", default=SHOWN_CLASSES),
            )
            cells = confusion_matrix_csv(confusion_counts, splits.classes, output_dir / "confusion_matrix.csv")
            log_files(logger, {"figures": confusion, "reports": cells})
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
            model_id = log_best_model(logger, cfg, module.model, best, splits, spec, trainer.global_step)
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
    return RunResult(metrics, logger.run_id, str(cfg.logger.tracking_uri), best, output_dir, logger.unsynced, model_id)

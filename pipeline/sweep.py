"""python -m pipeline.sweep: Ray Tune over the same run(cfg) that pipeline.train calls.

The driver composes the config, checks the search space against it (before Ray starts), creates the MLflow
experiment and the sweep's parent run, and lets Ray Tune run trials. Each trial composes the train config
with its sampled overrides and calls run(cfg), reporting every epoch to Tune (for ASHA) with a checkpoint
(for retries). At the end the driver records every trial on the parent run and writes the best trial's
config as a YAML that pipeline.train accepts as it is.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import CONF_DIR, compose
from pipeline.errors import UserInputError

STATE_FILE = "sweep.json"
SWEEP_ONLY = ("sweep", "ray", "resume", "progress", "hydra")  # override keys that configure the sweep itself
TRIAL_CHECKPOINT = "checkpoint.ckpt"
DRIVER_CPU = 0.01  # what a trial spread over Ray Train workers asks for itself


def tune_name(metric: str) -> str:
    """Tune flattens nested results on "/", so metrics travel as val_acc rather than val/acc."""
    return metric.replace("/", "_")


@dataclass
class SweepState:
    """Everything a trial, or a resumed sweep, needs to rebuild the exact same runs."""

    name: str
    folder: str
    base_overrides: list[str]  # the train config every trial starts from
    params: dict[str, str]  # key → Hydra sweeper expression
    settings: dict[str, Any]  # the resolved `sweep` config node
    tracking_uri: str
    experiment_name: str
    artifact_root: str  # where a new experiment on a local store keeps artifacts
    parent_run_id: str = ""

    def save(self) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> SweepState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def new_state(cfg: DictConfig, cli_overrides: list[str]) -> SweepState:
    settings = OmegaConf.to_container(cfg.sweep, resolve=True)
    params = dict(settings.pop("params") or settings.pop("space", None) or {})
    settings.pop("space", None)
    pinned = {  # resolved here: trials run in other folders, processes and machines
        "paths.root": cfg.paths.root,
        "logger.tracking_uri": cfg.logger.tracking_uri,
        "logger.experiment_name": cfg.logger.experiment_name,
    }
    base = [
        o
        for o in cli_overrides
        if not _key(o).startswith(SWEEP_ONLY) and _key(o) not in params and _key(o) not in pinned
    ]
    base += [f"{key}={value}" for key, value in pinned.items()]
    folder = Path(settings["storage_path"]).resolve() / settings["name"]
    if (folder / STATE_FILE).exists():
        raise UserInputError(f"a sweep named {settings['name']!r} exists in {folder}: continue it with resume=")
    return SweepState(
        name=settings["name"],
        folder=str(folder),
        base_overrides=base,
        params=params,
        settings=settings,
        tracking_uri=str(cfg.logger.tracking_uri),
        experiment_name=str(cfg.logger.experiment_name),
        artifact_root=str(cfg.logger.artifact_root),
    )


def locate(resume: str, storage_path: str) -> Path:
    for folder in (Path(resume), Path(storage_path) / resume):
        if (folder / STATE_FILE).exists():
            return folder.resolve()
    raise UserInputError(
        f"resume={resume!r}: no sweep there (looked for {STATE_FILE} in {resume} and in {storage_path}/{resume}). "
        "Give the sweep's name or its folder."
    )


# ---------------------------------------------------------------------------------------------- the trial


def train_trial(config: dict[str, Any], state: dict[str, Any]) -> None:
    """One Ray Tune trial: the train config + this trial's values → run(cfg), reporting every epoch."""
    import ray
    import torch
    from ray import tune
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    from pipeline import tracking
    from pipeline.run import run
    from pipeline.search_space import override_text

    sweep = SweepState(**state)
    torch.set_num_threads(max(1, int(sweep.settings["resources"]["cpu"])))  # not every core: trials share them
    trial_id = tune.get_context().get_trial_id()
    cfg = compose([*sweep.base_overrides, *(override_text(k, v) for k, v in config.items())])
    gpus = sweep.settings["resources"]["gpu"]
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(sweep.folder) / "trials" / trial_id)
        cfg.progress = "none"
        cfg.trainer.enable_model_summary = False
        # A trial given no GPU must not take one it was not given (Ray leaves every GPU visible then).
        cfg.trainer.accelerator = "gpu" if gpus else "cpu"
        cfg.trainer.devices = 1
        cfg.logger.run_name = f"{sweep.name}-{trial_id}"
        cfg.logger.parent_run_id = sweep.parent_run_id
        cfg.logger.tags = {
            **cfg.logger.tags,
            "sweep.name": sweep.name,
            "sweep.trial_id": trial_id,
            "sweep.node_id": ray.get_runtime_context().get_node_id(),
        }
        # A retried or resumed trial continues its own MLflow run, from its last reported checkpoint.
        cfg.logger.run_id = tracking.find_child_run(sweep.tracking_uri, sweep.parent_run_id, trial_id)
    metric = sweep.settings["metric"]
    reported = {tune_name(m): m for m in dict.fromkeys([metric, "val/loss", "val/acc", "train/loss"])}
    if sweep.settings["resources"]["workers_per_trial"] > 1:
        from pipeline.trial_workers import train_on_workers

        train_on_workers(cfg, sweep.settings, sweep.folder, reported)
        return
    report = TuneReportCheckpointCallback(metrics=reported, filename=TRIAL_CHECKPOINT, on="train_epoch_end")
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run(cfg, callbacks=[report])
        return
    with checkpoint.as_directory() as folder:
        with open_dict(cfg):
            cfg.resume = str(Path(folder) / TRIAL_CHECKPOINT)
        run(cfg, callbacks=[report])


# --------------------------------------------------------------------------------------------- the driver


def _tuner(state: SweepState, space: dict[str, Any], max_epochs: int, resume: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = state.settings
    resources = settings["resources"]
    # A trial spread over Ray Train workers only drives them: the workers ask for the CPUs and GPUs, the trial
    # for a token share of a CPU (Tune refuses a trial that asks for nothing).
    spread = resources["workers_per_trial"] > 1
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, state=asdict(state)),
        {"cpu": DRIVER_CPU if spread else resources["cpu"], "gpu": 0 if spread else resources["gpu"]},
    )
    if resume:
        return tune.Tuner.restore(state.folder, trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = tune_name(settings["metric"]), settings["mode"]
    if settings["scheduler"] == "asha":
        scheduler = ASHAScheduler(
            max_t=max_epochs,
            grace_period=settings["grace_period"],
            reduction_factor=settings["reduction_factor"],
            stop_last_trials=False,  # a trial that reaches the last epoch finishes: its best checkpoint is tested
        )
    else:
        scheduler = FIFOScheduler()
    if settings["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=settings["search_seed"])
    else:  # random and grid: Tune's variant generator samples distributions and expands grid_search
        search_alg = tune.search.BasicVariantGenerator(random_state=settings["search_seed"])
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=settings["num_samples"],
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=settings["max_concurrent_trials"],
            # A new trial reuses a finished trial's worker process: torch, Lightning and MLflow stay imported,
            # which saves seconds per trial (run(cfg) keeps no state between calls).
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=state.name,
            storage_path=str(Path(state.folder).parent),
            failure_config=tune.FailureConfig(max_failures=settings["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def _start_ray(cfg: DictConfig) -> float:
    import ray

    start = time.perf_counter()
    local = cfg.ray.address is None
    ray.init(
        address=cfg.ray.address,
        num_cpus=cfg.ray.num_cpus if local else None,
        num_gpus=cfg.ray.num_gpus if local else None,
        _temp_dir=cfg.ray.temp_dir if local else None,
        include_dashboard=False,
    )
    return time.perf_counter() - start


def write_best_config(state: SweepState, best_overrides: list[str]) -> Path:
    """The best trial's complete config, with train.yaml's Hydra settings, for `pipeline.train --config-name`."""
    best = OmegaConf.create(OmegaConf.to_container(compose([*state.base_overrides, *best_overrides])))
    best.hydra = OmegaConf.load(CONF_DIR / "train.yaml").hydra
    path = Path(state.folder) / "best_config.yaml"
    path.write_text(f"# Best trial of sweep {state.name}: {' '.join(best_overrides)}\n" + OmegaConf.to_yaml(best))
    return path


def run_sweep(cfg: DictConfig, cli_overrides: list[str]) -> dict[str, Any]:
    from pipeline import search_space, tracking
    from pipeline.plots import parallel_coordinates_png

    resuming = cfg.resume is not None
    state = SweepState.load(locate(cfg.resume, cfg.sweep.storage_path)) if resuming else new_state(cfg, cli_overrides)
    space = search_space.build(state.params, state.settings["search"], state.base_overrides, compose)
    max_epochs = int(compose(state.base_overrides).trainer.max_epochs)

    parent = tracking.open_parent_run(state, tags=tracking.run_tags(cfg), resume=resuming, http=cfg.logger.http)
    state.parent_run_id = parent.run_id
    state.save()
    ray_startup = _start_ray(cfg)
    parent.log_metric("sweep/ray_startup_s", ray_startup)
    print(
        f"Sweep {state.name}: {state.folder} (MLflow parent run {state.parent_run_id}); Ray up in {ray_startup:.1f} s"
    )

    started = time.perf_counter()
    with parent.recorded_status():
        results = _tuner(state, space, max_epochs, resuming).fit()
        metric = tune_name(state.settings["metric"])
        rows = tracking.settle_trials(parent, results, state, metric)
        keys = list(state.params)
        table = Path(state.folder) / "trials.csv"
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial_id"])
            writer.writeheader()
            writer.writerows(rows)
        figure = parallel_coordinates_png(
            rows, keys, state.settings["metric"], Path(state.folder) / "parallel_coordinates.png", state.name
        )
        best = results.get_best_result(metric=metric, mode=state.settings["mode"], scope="all")
        best_overrides = [search_space.override_text(k, v) for k, v in best.config.items()]
        best_config = write_best_config(state, best_overrides)
        parent.log_metric("sweep/wall_s", time.perf_counter() - started)
        best_score = best.metrics_dataframe[metric].agg(state.settings["mode"])
        parent.log_best(best_overrides, best_score, state.settings["metric"])
        parent.log_files({"": table, "figures": figure, "best": best_config})
    return {"state": state, "best_config": best_config, "best_overrides": best_overrides, "rows": rows}


@hydra.main(config_path=str(CONF_DIR), config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        outcome = run_sweep(cfg, list(HydraConfig.get().overrides.task))
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    state = outcome["state"]
    print(f"\nBest trial: {' '.join(outcome['best_overrides'])}")
    print(f"Trials table: {state.folder}/trials.csv")
    print(f"Best config: {outcome['best_config']}")
    print(f"Retrain it: python -m pipeline.train --config-dir {state.folder} --config-name best_config")


if __name__ == "__main__":
    main()

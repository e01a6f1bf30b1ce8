"""The sweep's driver: the state checked and saved, the parent run opened, Ray started, Tune's trials run, and every
trial recorded on the parent run with the best trial's config written for pipeline.train (and, with
sweep.register_best=<name>, the best trial's MLflow model registered under that name)."""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.cli import unwritable
from pipeline.config import CONF_DIR, SWEEP_SETTINGS, compose, validate
from pipeline.errors import TrainingDiverged, UserInputError
from pipeline.sweep.state import SweepState, locate, new_state, tune_name
from pipeline.sweep.trial import train_trial

DRIVER_CPU = 0.01  # what a trial spread over Ray Train workers asks for itself
TUNE_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # 1: Tune adds no result loggers beside the run's callbacks


class SweepFailed(Exception):
    """No trial of the sweep succeeded: there is no best trial. `exit_status` is 2 when the first trial's error is
    one its config caused (a diverged loss, a bad value), else 1."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status

    @classmethod
    def of(cls, state: SweepState, errors: list[BaseException | None]) -> SweepFailed:
        # Ray wraps what the trial raised (RayTaskError); its `cause` is the trial's own exception.
        causes = [getattr(error, "cause", None) or error for error in errors if error is not None]
        first = causes[0] if causes else None
        reason = str(first).strip().splitlines()[-1] if first is not None and str(first).strip() else repr(first)
        return cls(
            f"every trial of sweep {state.name} failed ({len(errors)} of {len(errors)}), so there is no best trial "
            f"and no best_config.yaml. The first error: {reason} (every trial: {state.folder}/trials.csv and the "
            "trials' MLflow runs)",
            2 if isinstance(first, UserInputError | TrainingDiverged) else 1,
        )


def _tuner(state: SweepState, space: dict[str, Any], max_epochs: int, resume: bool) -> Any:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.sweep.placement import ReleaseOrphanedWorkers

    settings = state.settings
    resources = settings["resources"]
    # A trial spread over Ray Train workers only drives them: the workers ask for the CPUs and GPUs, the trial
    # for a token share of a CPU (Tune refuses a trial that asks for nothing).
    spread = resources["workers_per_trial"] > 1
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, state=asdict(state)),
        {"cpu": DRIVER_CPU if spread else resources["cpu"], "gpu": 0 if spread else resources["gpu"]},
    )
    # Tune's CSV and JSON results (a trial's metrics_dataframe), not its TensorBoard files: the trials log to MLflow,
    # and importing tensorboardX took two seconds of the driver's CPU. Tune adds its default loggers when it runs,
    # a resumed sweep's too: they stay off for a sweep whose saved callbacks include the CSV and JSON ones.
    if state.own_result_loggers:
        os.environ[TUNE_LOGGERS] = "1"
    if resume:  # with the callbacks it was started with
        return tune.Tuner.restore(state.folder, trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = tune_name(settings["metric"]), settings["mode"]
    if asha_stops_early(settings, max_epochs):
        scheduler = ASHAScheduler(
            max_t=max_epochs,
            grace_period=settings["grace_period"],
            reduction_factor=settings["reduction_factor"],
            stop_last_trials=False,  # a trial that reaches the last epoch finishes: its best checkpoint is tested
        )
    else:  # fifo, or trials no longer than ASHA's grace period (said by trials_too_short_for_asha)
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
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), *([ReleaseOrphanedWorkers()] if spread else [])],
        ),
    )


# How long a trial process Tune reuses (reuse_actors) gives the trial that ended in it to finish its run (the scheduler
# stopped it: Lightning and MLflow close it). Tune's default, 2 s, is short of that on a busy node, and then the next
# trial given that process fails without starting ("Could not re-use actor"): a trial lost from the sweep.
TRIAL_END_TIMEOUT_S = 120


def _runtime_env(local: bool) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": str(TRIAL_END_TIMEOUT_S)}}
    if not local:
        # On a cluster, each worker process of the sweep picks the interface gloo's process groups use (a trial
        # spread over hosts): the one carrying its node's address, not the loopback its hostname may resolve to.
        runtime_env["worker_process_setup_hook"] = "pipeline.network.use_ray_node_interface"
    return runtime_env


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
        runtime_env=_runtime_env(local),
    )
    return time.perf_counter() - start


def write_best_config(state: SweepState, best_overrides: list[str]) -> Path:
    """The best trial's complete config, with train.yaml's Hydra settings, for `pipeline.train --config-name`."""
    best = OmegaConf.create(OmegaConf.to_container(compose([*state.base_overrides, *best_overrides])))
    best.hydra = OmegaConf.load(CONF_DIR / "train.yaml").hydra
    path = Path(state.folder) / "best_config.yaml"
    path.write_text(f"# Best trial of sweep {state.name}: {' '.join(best_overrides)}\n" + OmegaConf.to_yaml(best))
    return path


def check_storage(cfg: DictConfig) -> None:
    """sweep.storage_path, where a new sweep's folder goes: writable here, checked before Ray starts (on a cluster,
    pipeline.sweep.cluster checks later that every node sees it)."""
    if reason := unwritable(Path(cfg.sweep.storage_path).resolve(), make=False):  # made by Tune, if the sweep starts
        raise UserInputError(
            f"sweep.storage_path={cfg.sweep.storage_path}: cannot write there ({reason}). Choose a writable folder: "
            "sweep.storage_path=<folder> (on a cluster, one every node shares), or paths.root=<folder> for every "
            "output."
        )


def asha_stops_early(settings: dict[str, Any], max_epochs: int) -> bool:
    """ASHA, asked for, with trials longer than its grace period: it may stop the weak ones early."""
    return settings["scheduler"] == "asha" and settings["grace_period"] < max_epochs


def trials_too_short_for_asha(settings: dict[str, Any], max_epochs: int) -> None:
    """A sweep no longer than ASHA's grace period (a smoke test with trainer.max_epochs=1): Ray refuses a longer
    grace period, and at one as long ASHA could stop a weak trial only at its last epoch, before its test. Every trial
    runs to its end and its test instead (as with sweep.scheduler=fifo), said in one line on stderr."""
    if settings["scheduler"] == "asha" and not asha_stops_early(settings, max_epochs):
        print(
            f"warning: sweep.grace_period={settings['grace_period']} is not shorter than trainer.max_epochs="
            f"{max_epochs}: ASHA could stop a trial only at its end, so every trial runs to its end and its test "
            "(as with sweep.scheduler=fifo)",
            file=sys.stderr,
            flush=True,
        )


def check_resources(cfg: DictConfig) -> None:
    """sweep.resources, checked before any work: Ray would otherwise start, the sweep's run open, and the values fail
    inside Tune (a word) or be taken silently (workers_per_trial=0 ran trials in one process)."""
    resources = cfg.sweep.resources
    problems = []
    workers = resources.workers_per_trial
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        problems.append(f"sweep.resources.workers_per_trial={workers!r}: must be an integer >= 1 (e.g. 2)")
    for key, least in (("cpu", "> 0"), ("gpu", ">= 0")):
        value = resources[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (value <= 0 if key == "cpu" else value < 0):
            problems.append(f"sweep.resources.{key}={value!r}: must be a number {least} (e.g. sweep.resources.{key}=1)")
    if problems:
        raise UserInputError("\n".join(problems))


def registration_name(cfg: DictConfig) -> str | None:
    """sweep.register_best, checked before any work."""
    name = cfg.sweep.get("register_best")
    if name is None:
        return None
    if not str(name).strip() or any(character in str(name) for character in "/@"):
        raise UserInputError(
            f"sweep.register_best={name}: give a registered model's name without '/' or '@' (e.g. "
            "sweep.register_best=digits-best), or null to register nothing."
        )
    return str(name)


def best_completed(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial with the best `metric` among those that ran to their test (and so logged their model)."""
    done = [row for row in rows if row["outcome"] == "completed" and row["mlflow_run_id"] and row[metric] is not None]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda row: row[metric])


def register_best(parent: Any, state: SweepState, rows: list[dict[str, Any]], name: str) -> Any:
    """Register the best completed trial's MLflow model as a version of `name`, noted on the parent run."""
    from pipeline.register import register

    metric = state.settings["metric"]
    best = best_completed(rows, metric, state.settings["mode"])
    if best is None:
        raise UserInputError(
            f"sweep.register_best={name}: no trial ran to its test, so none logged a model. Retrain the best config "
            "with pipeline.train and register that run with pipeline.register."
        )
    description = f"Best trial ({metric}={best[metric]:.4f}) of sweep {state.name}, trial {best['trial_id']}"
    version = register(best["mlflow_run_id"], name, state.tracking_uri, description=description)
    parent.client.set_tag(parent.run_id, "best.registered_model", f"{version.name}/{version.version}")
    return version


def run_sweep(cfg: DictConfig, cli_overrides: list[str]) -> dict[str, Any]:
    from pipeline.plots import parallel_coordinates_png
    from pipeline.sweep import space as search_space
    from pipeline.sweep.cluster import check_cluster, check_data_root
    from pipeline.sweep.tracking import open_parent_run, settle_trials
    from pipeline.tracking.provenance import run_tags
    from pipeline.tracking.store import prepare

    registered_name = registration_name(cfg)
    validate(cfg, only=SWEEP_SETTINGS)
    check_resources(cfg)
    check_data_root(cfg)
    resuming = cfg.resume is not None
    if not resuming:
        check_storage(cfg)
    state = SweepState.load(locate(cfg.resume, cfg.sweep.storage_path)) if resuming else new_state(cfg, cli_overrides)
    space = search_space.build(state.params, state.settings["search"], state.base_overrides, compose)
    max_epochs = int(compose(state.base_overrides).trainer.max_epochs)
    trials_too_short_for_asha(state.settings, max_epochs)

    prepare(state.tracking_uri, cfg.logger.http)  # a store that is down fails now, before Ray starts
    ray_startup = _start_ray(cfg)
    check_cluster(cfg, Path(state.folder).parent)  # before the sweep's run is opened: a refusal leaves nothing behind
    what = {"model": cfg.model.name, "dataset": cfg.data.name, "aug": cfg.aug.name}
    tags = run_tags(cfg.paths.output_dir, what, extra=cfg.logger.tags)
    parent = open_parent_run(state, tags=tags, resume=resuming)
    state.parent_run_id = parent.run_id
    state.save()
    parent.log_metric("sweep/ray_startup_s", ray_startup)
    print(
        f"Sweep {state.name}: {state.folder} (MLflow parent run {state.parent_run_id}); Ray up in {ray_startup:.1f} s"
    )

    started = time.perf_counter()
    with parent.recorded_status():
        results = _tuner(state, space, max_epochs, resuming).fit()
        metric = tune_name(state.settings["metric"])
        rows = settle_trials(parent, results, state, metric)
        keys = list(state.params)
        table = Path(state.folder) / "trials.csv"
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial_id"])
            writer.writeheader()
            writer.writerows(rows)
        if not any(result.error is None for result in results):  # nothing to pick a best from
            parent.log_files({"": table})
            failure = SweepFailed.of(state, [result.error for result in results])
            parent.set_tag("failure", str(failure))
            raise failure
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
    # After the sweep's run has ended as it went: a model that cannot be registered does not fail the sweep's record.
    registered = register_best(parent, state, rows, registered_name) if registered_name else None
    return {
        "state": state,
        "best_config": best_config,
        "best_overrides": best_overrides,
        "rows": rows,
        "registered": registered,
    }

"""Sweeps: Ray Tune over the same run(cfg) that pipeline.train calls (`python -m pipeline.sweep`, in __main__).

state     the sweep's state on disk, enough to rebuild every trial or resume the sweep
space     Hydra's sweeper grammar → Ray Tune distributions, checked before Ray starts
trial     one trial: the train config with the trial's values → run(cfg), reporting each epoch
workers   a trial spread over Ray Train workers (DDP), each calling run(cfg)
tracking  the sweep's MLflow parent run and its trials' child runs
driver    Ray started, Tune run, the trials recorded and the best config written
"""

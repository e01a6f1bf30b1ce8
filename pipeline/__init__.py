"""Experiment pipeline for CNN image classifiers."""

import os

# Albumentations asks PyPI for its newest version whenever it is imported, in every process: each command, each Ray
# trial and worker. A training must not reach beyond its own cluster for that (on a node without a route out it waits
# up to 2 s a process); NO_ALBUMENTATIONS_UPDATE turns the check off. Set here, before any module of the pipeline
# imports Albumentations; a value the user set is kept.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

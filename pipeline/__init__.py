"""Experiment pipeline for CNN image classifiers."""

"""Experiments: configuration schema, runner and output layout."""

from scatlas.experiment.config import ExperimentConfig, load_config
from scatlas.experiment.layout import RunLayout
from scatlas.experiment.runner import RunResult, run_experiment

__all__ = ["ExperimentConfig", "RunLayout", "RunResult", "load_config", "run_experiment"]

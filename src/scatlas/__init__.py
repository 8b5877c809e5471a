"""scatlas: learn, transfer and judge representations of single-cell data across batches, donors and studies.

>>> import scatlas as sa
>>> config = sa.load_config("examples/cellbench_5cl.yaml")   # doctest: +SKIP
>>> result = sa.run_experiment(config)                          # doctest: +SKIP
"""

from scatlas import data, metrics, models
from scatlas._errors import ConfigError, InputError, ScatlasError
from scatlas.experiment import ExperimentConfig, RunLayout, load_config, run_experiment

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "InputError",
    "RunLayout",
    "ScatlasError",
    "data",
    "load_config",
    "metrics",
    "models",
    "run_experiment",
]

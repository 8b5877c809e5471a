"""scatlas: learn, transfer and judge representations of single-cell data across batches, donors and studies.

>>> import anndata as ad, scatlas as sa
>>> adata = ad.read_h5ad("../shared/data/symphony_pbmc_3tech.h5ad")          # doctest: +SKIP
>>> model = sa.tl.embed(adata, "fe", batch_key="batch", label_key="cell_type")  # doctest: +SKIP
>>> sa.tl.benchmark(adata, ["X_fe"], label_key="cell_type", batch_key="batch")  # doctest: +SKIP

Submodules load on first use, so ``import scatlas`` (and ``scatlas --help``) does not import
torch, Lightning or scanpy.
"""

from __future__ import annotations

import importlib
from typing import Any

from scatlas._errors import ConfigError, InputError, ScatlasError, UnpairedError

__version__ = "0.1.0"

_SUBMODULES = {"data", "metrics", "models", "tl", "pl", "experiment", "settings"}
_ATTRIBUTES = {
    "ExperimentConfig": "scatlas.experiment",
    "RunLayout": "scatlas.experiment",
    "load_config": "scatlas.experiment",
    "run_experiment": "scatlas.experiment",
    "load_model": "scatlas.tl",
    "ScatlasModel": "scatlas.tl",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"scatlas.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'scatlas' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "InputError",
    "RunLayout",
    "ScatlasError",
    "ScatlasModel",
    "data",
    "experiment",
    "load_config",
    "load_model",
    "metrics",
    "models",
    "pl",
    "run_experiment",
    "tl",
    "UnpairedError",
]

"""The small protocol every model follows, the registry, and the shared neural-model driver.

The runner only knows :class:`SplitData` (what a model gets for one split) and
:class:`EmbeddingModel` (``fit`` / ``embed`` / ``reconstruct``, the latter optional).
Adding a model = one module that subclasses :class:`EmbeddingModel` (or
:class:`NeuralModel` for a PyTorch module), decorates it with :func:`register` and is named in
:attr:`ModelRegistry.modules`.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from torch import nn

from scatlas._errors import ConfigError
from scatlas._io import write_torch
from scatlas.data.loaders import CSRLoader, with_dense_x
from scatlas.data.sources import CSRSource
from scatlas.settings import format_errors
from scatlas.train import TrainConfig, fit_in_process, resolve_device, runs_in_process

if TYPE_CHECKING:
    from scatlas.train import TrainingPlan


@dataclass
class SplitData:
    """A split's preprocessed matrix and codes, handed to a model.

    Attributes
    ----------
    X
        Cells × genes CSR of all cells (preprocessed for this split), or a
        :class:`~scatlas.data.sources.CSRSource` streamed from disk.
    train, val
        Row indices used for fitting and early stopping.
    batch
        Batch code of each cell (``0 .. n_batches-1``).
    batch_names
        Batch name of each code.
    label
        Label code of each cell, or ``None``.
    label_names
        Label name of each code.
    reachability
        ``R[i, j] = 1`` when label ``j`` is label ``i`` or a descendant (Cell Ontology labels), else ``None``.
    genes
        Gene names of ``X``'s columns.
    source
        Source (dataset / study) code of each cell, or ``None`` (one source).
    label_reachability
        ``(n_sources, n_labels, n_labels)``: which classes satisfy each label in each source
        (:func:`scatlas.ontology.source_reachability`), for hierarchical cross-entropy.
    offset
        Added to every cell's dense row at inference (``None``: nothing): e.g. a query's missing
        genes at their reference means (:class:`~scatlas.tl.Annotator`), without storing them in ``X``.
    """

    X: sp.csr_matrix | CSRSource
    train: np.ndarray
    val: np.ndarray
    batch: np.ndarray
    batch_names: list[str]
    label: np.ndarray | None = None
    label_names: list[str] | None = None
    reachability: np.ndarray | None = None
    genes: np.ndarray | None = None
    source: np.ndarray | None = None
    label_reachability: np.ndarray | None = None
    offset: np.ndarray | None = None

    @property
    def n_genes(self) -> int:
        """Number of input features."""
        return self.X.shape[1]

    def sources_of(self, rows: np.ndarray) -> np.ndarray | None:
        """Source codes of the cells ``rows`` (``None`` when the split has one source)."""
        return None if self.source is None else self.source[rows]

    def class_weights(self) -> np.ndarray:
        """Balanced class weights ``n / (K · n_c)`` on the training cells (0 for classes absent there)."""
        assert self.label is not None and self.label_names is not None
        counts = np.bincount(self.label[self.train], minlength=len(self.label_names)).astype(float)
        present = counts > 0
        weights = np.zeros_like(counts)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return weights


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Minibatches in one training epoch (the last partial one is dropped)."""
    return max(1, n_train // batch_size)


def _one_layer(value: Any) -> Any:
    """One width (``hidden=128``, as scvi-tools' ``n_hidden``) is one hidden layer."""
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


#: Hidden layer widths of a network (each at least 1; an empty list: no hidden layer; one number: one layer).
Widths = Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_one_layer)]


class ModelConfig(BaseModel):
    """Fields common to every model entry of an experiment config.

    Attributes
    ----------
    type
        Registry name (``scatlas models`` lists them).
    name
        Directory name in the layout (default: the type in upper case).
    training
        Overrides of the experiment's ``training`` settings for this model only,
        e.g. ``{lr: 1.0e-4}``.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)


class EmbeddingModel(abc.ABC):
    """A model that fits on one split and embeds (and optionally reconstructs) cells."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    #: Name of the latent array in the output layout (``<latent_name>_<split>.npy``).
    latent_name: ClassVar[str] = "latent"
    #: Whether the model needs labels to train.
    needs_labels: ClassVar[bool] = False
    #: Whether embedding a cell needs its batch (so new cells must come from a training batch).
    uses_batch: ClassVar[bool] = False
    #: Whether training uses the batch at all (to remove it from the latent, or to model it); others ignore a batch key.
    batch_aware: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, train: TrainConfig) -> None:
        self.config = config
        #: Training fields the user chose (``None``: all of them, as for a directly built ``TrainConfig``).
        self.user_training = None if train.explicit is None else frozenset(train.explicit) | frozenset(config.training)
        self.train_config = replace(train, **{**self.unset(self.training_defaults()), **config.training})

    def unset(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``settings`` that the user did not set."""
        return {} if self.user_training is None else {k: v for k, v in settings.items() if k not in self.user_training}

    def training_defaults(self) -> dict[str, Any]:
        """Training settings this model defaults to where the user set none (e.g. FE's minibatch size)."""
        return {}

    def sized_training(self, n_train: int) -> dict[str, Any]:
        """Training settings that depend on the number of training cells, applied at :meth:`fit` where the user set none."""
        return {}

    def size_said(self, n_train: int, n_genes: int) -> str | None:
        """Before :meth:`fit`: a line when ``n_train`` cells × ``n_genes`` genes give the model fewer dimensions than asked.

        Raises
        ------
        ConfigError
            Where the model cannot be fitted at that size as configured (more factors than genes).
        """
        return None

    @abc.abstractmethod
    def fit(self, data: SplitData, checkpoint_dir: Path | None = None, resume: bool = False) -> pd.DataFrame | None:
        """Train on ``data.train`` (early-stopping on ``data.val``); return the epoch history or ``None``."""

    def fit_said(self) -> str | None:
        """After :meth:`fit`: a line when the fit ended short of what it aimed at (a solver stopped at its iteration limit)."""
        return None

    @abc.abstractmethod
    def embed(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """Latent coordinates of the cells ``rows``."""

    def reconstruct(self, data: SplitData, rows: np.ndarray) -> np.ndarray | None:
        """Reconstruction of the cells ``rows`` in input space (``None`` if the model has none)."""
        return None

    def params(self) -> dict[str, Any]:
        """Hyper-parameters written to ``model_params.yaml``."""
        return self.config.model_dump(mode="json")

    def save_state(self, directory: Path) -> None:
        """Write what :meth:`load_state` needs to rebuild the fitted model into ``directory``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    def load_state(self, directory: Path, shape: SplitData) -> None:
        """Restore a model written by :meth:`save_state`; ``shape`` has the training data's dimensions."""
        raise NotImplementedError(f"{type(self).__name__} cannot be loaded")


def shape_stub(n_genes: int, batch_names: list[str], label_names: list[str] | None) -> SplitData:
    """An all-zero :class:`SplitData` with given genes, batches and labels, to rebuild a module of those dimensions."""
    n = max(2, len(batch_names), len(label_names or ()))
    rows = np.arange(n)
    return SplitData(
        X=sp.csr_matrix((n, n_genes), dtype=np.float32), train=rows, val=rows[:0], batch=rows % len(batch_names), batch_names=list(batch_names),
        label=rows % len(label_names) if label_names else None, label_names=list(label_names) if label_names else None,
    )


class SklearnState:
    """Saving for models whose fitted state is one scikit-learn estimator, stored in attribute :attr:`estimator_attr`.

    The estimator's constructor parameters go to ``estimator.yaml`` and its public fitted attributes
    (names ending in ``_``) to ``estimator.npz``; nothing is pickled.
    """

    estimator_attr: ClassVar[str]

    def save_state(self, directory: Path) -> None:
        """Write ``estimator.yaml`` and ``estimator.npz``."""
        import yaml

        estimator = getattr(self, self.estimator_attr)
        fitted = {k: np.asarray(v) for k, v in vars(estimator).items() if k.endswith("_") and not k.startswith("_")}
        # a strided view (PCA's components are rows of an F-ordered Vt) is stored F-ordered, which np.load restores:
        # BLAS then sees the layout the fitted estimator had, and the reloaded model gives the same bits
        fitted = {k: v if v.flags.c_contiguous else np.asfortranarray(v) for k, v in fitted.items()}
        (directory / "estimator.yaml").write_text(yaml.safe_dump({"class": type(estimator).__name__, "module": type(estimator).__module__,
                                                                  "params": estimator.get_params()}))
        np.savez(directory / "estimator.npz", **fitted)

    def load_state(self, directory: Path, shape: SplitData) -> None:
        """Rebuild the estimator from ``estimator.yaml`` and ``estimator.npz``."""
        import importlib

        import yaml

        meta = yaml.safe_load((directory / "estimator.yaml").read_text())
        estimator = getattr(importlib.import_module(meta["module"]), meta["class"])(**meta["params"])
        with np.load(directory / "estimator.npz", allow_pickle=False) as arrays:
            for name in arrays.files:
                value = arrays[name]
                setattr(estimator, name, value.item() if value.ndim == 0 else value)
        setattr(self, self.estimator_attr, estimator)


@runtime_checkable
class CounterfactualModel(Protocol):
    """A model that can reconstruct cells as if they came from each batch (scMEDAL-RE)."""

    def counterfactuals(self, data: SplitData, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Batch name → reconstruction of ``rows`` with that batch, in ``data.batch_names`` order."""
        ...


class LatentClassifier(abc.ABC):
    """A model that classifies cells from the latents of other models of the same run (e.g. MEC).

    The runner reads the latents named by :meth:`sources` for each part of a split,
    concatenates them, and calls :meth:`fit_predict`.
    """

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    needs_labels: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, train: TrainConfig) -> None:
        self.config = config
        self.train_config = replace(train, **config.training)

    @staticmethod
    @abc.abstractmethod
    def sources(config: ModelConfig) -> list[str]:
        """Names of the models (or ``obsm:<key>`` entries) whose latents are the features."""

    @abc.abstractmethod
    def fit_predict(
        self, features: dict[str, np.ndarray], labels: dict[str, np.ndarray]
    ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        """Fit on ``features["train"]``; return a metrics table and per-part prediction tables."""

    def params(self) -> dict[str, Any]:
        """Hyper-parameters written to ``model_params.yaml``."""
        return self.config.model_dump(mode="json")


AnyModel = EmbeddingModel | LatentClassifier


class ModelRegistry(Mapping[str, type]):
    """The models by config ``type``.

    A model module registers its classes when it loads (:func:`register`). Looking up a name
    not registered yet, or listing the models, loads every model module first, so that a command
    using one classifier never imports the modules (and Lightning) of the others.
    """

    modules = ("autoencoder", "classifiers", "mec", "mixed_effects", "nmf", "pca")

    def __init__(self) -> None:
        self._models: dict[str, type] = {}

    def add(self, name: str, cls: type) -> None:
        """Register ``cls`` under ``name``."""
        self._models[name] = cls

    def _every(self) -> dict[str, type]:
        for module in self.modules:
            importlib.import_module(f"scatlas.models.{module}")
        return self._models

    def __getitem__(self, name: str) -> type:
        return self._models[name] if name in self._models else self._every()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._models or name in self._every()

    def __iter__(self) -> Iterator[str]:
        return iter(self._every())

    def __len__(self) -> int:
        return len(self._every())


#: Every model a config can name as ``type``.
REGISTRY = ModelRegistry()


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a model to :data:`REGISTRY` under ``name`` (the config's ``type``)."""

    def deco(cls: type) -> type:
        REGISTRY.add(name, cls)
        return cls

    return deco


def validate_entry(entry: dict[str, Any], family: type | None = None) -> ModelConfig:
    """Validate one model entry against its registered model's schema.

    Parameters
    ----------
    entry
        ``{"type": <registered name>, <field>: <value>, ...}``.
    family
        When given, the entry's model must subclass it (e.g. the cell-type classifiers).

    Returns
    -------
    The validated config.

    Raises
    ------
    ValueError
        One line naming an unknown or disallowed type (with those available), or every invalid field.
    """
    kind = entry.get("type")
    model = REGISTRY.get(kind) if isinstance(kind, str) else None
    if model is None or (family is not None and not issubclass(model, family)):
        allowed = sorted(name for name, cls in REGISTRY.items() if family is None or issubclass(cls, family))
        reason = f"unknown model type {kind!r}" if model is None else f"{kind!r} is not a {family.__name__}"  # type: ignore[union-attr]
        raise ValueError(f"{reason}; available: {allowed}")
    try:
        return model.Config.model_validate(entry)
    except ValidationError as exc:
        raise ValueError(f"invalid entry for {kind!r}: {format_errors(exc, model.Config)}") from None


def parse_model_config(entry: dict[str, Any]) -> ModelConfig:
    """Validate one ``models:`` entry of a run config (:func:`validate_entry`); errors are a :class:`ConfigError`."""
    try:
        return validate_entry(entry)
    except ValueError as exc:
        raise ConfigError(f"models: {exc}") from None


def build_model(config: ModelConfig, train: TrainConfig) -> AnyModel:
    """Instantiate the registered model for a validated config."""
    return REGISTRY[config.type](config, train)


class NeuralModel(EmbeddingModel):
    """Driver for models whose maths live in an ``nn.Module`` trained by the engine (:mod:`scatlas.train`).

    Subclasses implement :meth:`build_module` (the ``nn.Module`` with ``loss``,
    ``embed`` and optionally ``reconstruct`` methods that take a batch dict) and may
    override :meth:`build_plan` for special optimisation (such fits always run under Lightning).
    """

    #: The trained network.
    module: nn.Module | None = None
    #: The Lightning plan of the last fit that ran under Lightning (``None`` after an in-process fit).
    plan: TrainingPlan | None = None

    @abc.abstractmethod
    def build_module(self, data: SplitData) -> nn.Module:
        """The ``nn.Module`` for this split's dimensions."""

    def build_plan(self, module: nn.Module) -> TrainingPlan:
        """The Lightning plan training ``module``."""
        from scatlas.train import TrainingPlan

        cfg = self.train_config
        return TrainingPlan(module, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_decay=cfg.lr_decay)

    def covariates(self, data: SplitData) -> dict[str, np.ndarray]:
        """Per-cell integer arrays added to every batch (batch codes, labels when present)."""
        cov = {"batch": data.batch}
        if data.label is not None:
            cov["label"] = data.label
        return cov

    def loader(self, data: SplitData, rows: np.ndarray, shuffle: bool) -> CSRLoader:
        """A minibatch loader over ``rows`` of this split."""
        cfg = self.train_config
        return CSRLoader(data.X, rows, batch_size=cfg.batch_size, shuffle=shuffle, covariates=self.covariates(data), seed=cfg.seed,
                         drop_last=shuffle, chunk_size=cfg.chunk_size, device=resolve_device(cfg.accelerator))

    def fit(self, data: SplitData, checkpoint_dir: Path | None = None, resume: bool = False) -> pd.DataFrame:
        """Train with the shared engine; returns the epoch history.

        A model with the plain plan whose fit needs nothing of Lightning's
        (:func:`~scatlas.train.runs_in_process`) trains in process, with the same result.
        """
        self.train_config = replace(self.train_config, **self.unset(self.sized_training(len(data.train))))
        cfg = self.train_config
        torch.manual_seed(cfg.seed)
        module = self.build_module(data)
        train = self.loader(data, data.train, shuffle=True)
        val = self.loader(data, data.val, shuffle=False) if len(data.val) else None
        if type(self).build_plan is NeuralModel.build_plan and runs_in_process(cfg, checkpoint_dir):
            self.plan, history = None, fit_in_process(module, train, val, cfg)
        else:
            from scatlas.train import fit

            self.plan = self.build_plan(module)
            history = fit(self.plan, train, val, cfg, checkpoint_dir, resume).history
        self.module = module
        return history

    def save_state(self, directory: Path) -> None:
        """Write the trained module's weights to ``module.pt``."""
        if self.module is None:
            raise RuntimeError("fit the model first")
        write_torch(self.module.state_dict(), directory / "module.pt")

    def load_state(self, directory: Path, shape: SplitData) -> None:
        """Rebuild the module for ``shape``'s dimensions and load ``module.pt`` into it (weights only)."""
        module = self.build_module(shape)
        module.load_state_dict(torch.load(directory / "module.pt", map_location="cpu", weights_only=True))
        self.module = module.to(resolve_device(self.train_config.accelerator)).eval()

    @torch.no_grad()
    def apply(self, data: SplitData, rows: np.ndarray, method: str, **kwargs: Any) -> np.ndarray:
        """Run ``module.<method>(batch, **kwargs)`` over ``rows`` in inference mode and stack the results."""
        if self.module is None:
            raise RuntimeError("fit the model first")
        module = self.module.eval()
        device = next(module.parameters()).device
        out: np.ndarray | None = None  # filled in place: no second copy of a multi-million-cell result
        loader = CSRLoader(data.X, rows, batch_size=max(self.train_config.batch_size, 1024), covariates=self.covariates(data),
                           chunk_size=self.train_config.chunk_size, device=device, shard=False)  # every DDP rank embeds all rows
        offset = None if data.offset is None else torch.from_numpy(np.asarray(data.offset, dtype=np.float32)).to(device)
        done = 0
        for batch in loader:
            batch = with_dense_x(batch)
            if offset is not None:
                batch["x"] = batch["x"] + offset
            values = getattr(module, method)(batch, **kwargs).float().cpu().numpy()
            if out is None:
                out = np.empty((len(rows), *values.shape[1:]), dtype=np.float32)
            out[done : done + len(values)] = values
            done += len(values)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def embed(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """Latent coordinates (``module.embed``)."""
        return self.apply(data, rows, "embed")

    def reconstruct(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """Reconstructions (``module.reconstruct``)."""
        return self.apply(data, rows, "reconstruct")

"""Cell-type annotation: train (cross-validated, then a final model), predict new data, evaluate.

``train_annotator`` evaluates a classifier (linear / MLP / TabNet, CE or hierarchical CE over
the Cell Ontology) on every split's test cells the way scTab does — exact and
hierarchy-aware metrics overall, per class and per stratum (assay, dataset, disease, tissue,
tissue_general, batch) — and saves a final model trained on all labelled cells.
``predict_annotations`` maps a query onto that model (genes aligned by name, missing genes
zero-filled) without changing any parameter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scatlas import __version__
from scatlas._describe import described, did_you_mean, listed, settings_line
from scatlas._errors import ConfigError, InputError
from scatlas._io import (atomic_path, check_checkpoint_settings, check_output_dir, check_output_file, check_writable, checkpoints_beside,
                         resumable_training, staged_dir, write_csv, write_npy, write_parquet, write_torch, write_yaml)
from scatlas.data.align import GeneAlignment, checked_query
from scatlas.data.dataset import CellData, DatasetConfig, load_dataset
from scatlas.data.io import cell_chunks, check_chunk_size, get_matrix, named, read_anndata, source_name, string_values, to_csr, view_to_actual
from scatlas.data.preprocess import gene_moments, normalize_log1p, preprocess_split
from scatlas.data.splits import Split, holdout
from scatlas.data.validate import with_values
from scatlas.settings import Seed, SplitConfig, TrainingConfig, parse_settings
from scatlas.data.splits import make_splits
from scatlas.metrics.annotation import annotation_tables, confusion_counts, hierarchical_correct
from scatlas.metrics.stats import fold_summary
from scatlas.models.base import SplitData, build_model, parse_model_config, validate_entry
from scatlas.models.classifiers import CellTypeClassifier, LinearClassifier
from scatlas.ontology import CellOntology, map_author_labels
from scatlas.report.html import Section, mean_ci_table, write_report
from scatlas.tl._labels import LabelSpace, label_space

if TYPE_CHECKING:
    from scatlas.tl._transfer import ReferenceModel, TransferConfig

STRATA = ("assay", "dataset_id", "dataset", "disease", "tissue", "tissue_general")
Log = Callable[[str], None]


#: The classifier presets of both ``annotate`` and ``transfer``, chosen with held-out batches
#: (``benchmarks/transfer_defaults.py``; benchmarks/RESULTS.md). ``linear``, the default for a
#: reference in memory: one-vs-rest logistic regression fitted full-batch by L-BFGS, genes divided
#: by their standard deviation pooled within classes, C = 0.01 (symphony with a chemistry held out
#: 0.947 accuracy / 0.853 macro F1, kang18 ctrl <-> stim 0.920, vs the MLP's 0.937 / 0.904). ``mlp``, the default
#: for a reference streamed from disk (a full-batch fit cannot stream): 256-128 (scTab's 8 × 128
#: MLP assumes millions of cells).
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"type": "linear", "solver": "lbfgs", "output": "ovr", "C": 0.01, "gene_scale": 1.0, "gene_scale_by": "within"},
    "mlp": {"type": "mlp", "hidden": [256, 128], "dropout": 0.3, "training": {"lr": 1e-3, "weight_decay": 0.05}},  # dropout: benchmarks/transfer_defaults.py
    "tabnet": {"type": "tabnet", "training": {"lr": 5e-3, "weight_decay": 0.05}},
}


def default_method(stream: bool) -> str:
    """The :data:`METHODS` preset used when none is named: ``linear`` in memory, ``mlp`` for a streamed reference."""
    return "mlp" if stream else "linear"


def classifier_entry(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """``entry`` if it is a valid classifier model entry (or ``None``: the default), checked before any data is read; else a ``ValueError``."""
    if entry is not None:
        validate_entry(entry, CellTypeClassifier)
    return entry


def resolve_model(entry: dict[str, Any] | None, stream: bool) -> dict[str, Any]:
    """The classifier entry to fit: ``entry``, or the default preset for a reference in memory or streamed (:func:`default_method`).

    A full-batch solver cannot stream: ``solver: lbfgs`` with a streamed reference is a ``ValueError``.
    """
    entry = dict(METHODS[default_method(stream)]) if entry is None else entry
    if stream and entry.get("solver") == "lbfgs":
        raise ValueError("model: solver 'lbfgs' (the linear method) needs the reference in memory; for a streamed one use the mlp method")
    return entry


class AnnotateConfig(BaseModel):
    """Settings of ``scatlas annotate train``.

    Attributes
    ----------
    dataset
        The labelled data (``label_key`` = the readable cell-type column).
    ontology_key
        Column of Cell Ontology ids; when given, classes are CL ids and HCE is available.
    dataset_key
        Column naming each cell's source (dataset / study). A label's meaning for HCE is set per
        source (:func:`~scatlas.ontology.source_reachability`); default: all cells are one source.
    ontology_obo
        Cell Ontology ``.obo`` file for an is_a-only hierarchy (default: the shipped
        ontology's is_a + part_of ancestors).
    label_map
        CSV of two columns (author label, CL id) mapping ``label_key`` values to Cell
        Ontology ids, for data without an ontology column.
    model
        Classifier entry, e.g. :data:`METHODS` ``["mlp"]`` with ``loss: hce`` (default: :func:`default_method`'s preset).
    n_top_genes
        HVGs chosen on each training split (``None``: every gene, as scTab).
    split, training
        Cross-validation scheme and trainer settings.
    strata
        Columns to stratify the evaluation by (default: those of :data:`STRATA` present, and the batch).
    final_model
        Also train the model saved for ``predict`` on all labelled cells (10% for early stopping).
    cross_validate
        Evaluate on the folds of ``split`` first (``False``: fit the final model only).
    call_precision
        Precision the hierarchical calls must reach on held-out cells (sets their threshold).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig
    ontology_key: str | None = None
    dataset_key: str | None = None
    ontology_obo: Path | None = None
    label_map: Path | None = None
    model: dict[str, Any] | None = None
    n_top_genes: int | None = Field(None, gt=0)
    split: SplitConfig = Field(default_factory=SplitConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)  # batch size and epochs: scaled_training
    strata: list[str] | None = None
    final_model: bool = True
    cross_validate: bool = True
    call_precision: float = Field(0.95, gt=0, le=1)
    seed: Seed = 0

    _model = field_validator("model")(classifier_entry)

    @model_validator(mode="after")
    def _default_model(self) -> AnnotateConfig:
        self.model = resolve_model(self.model, self.dataset.stream)
        return self


def _ontology(config: AnnotateConfig) -> CellOntology | None:
    if config.ontology_key is None and config.label_map is None:
        return None
    return CellOntology.from_obo(config.ontology_obo) if config.ontology_obo else CellOntology()


TRANSFER_FILE = "transfer.yaml"
"""The file that makes a saved classifier a transfer's reference model (temperature and unknown thresholds)."""


def model_directory(path: str | Path) -> Path:
    """The folder of a saved classifier: ``path`` itself, its ``model/`` (``scatlas annotate train``'s output) or its ``reference/model/`` (``scatlas transfer``'s)."""
    path = Path(path)
    for candidate in (path, path / "model", path / "reference" / "model"):
        if (candidate / "annotator.yaml").exists():
            return candidate
    return path


@dataclass
class Annotator:
    """A trained classifier with the gene list, classes and preprocessing needed to predict new data.

    ``gene_means``: each model gene's mean over the reference cells, in the model's input
    (log-normalised). A query lacking a gene gets it there for a linear model, whose class
    scores add up gene by gene: the gene keeps its average contribution, which the intercept
    was fitted with (as CellTypist, which drops the missing genes of z-scored data). Networks,
    and models saved without the means, get zeros.
    """

    model: CellTypeClassifier
    genes: np.ndarray
    labels: LabelSpace
    input: str
    meta: dict[str, Any]
    gene_means: np.ndarray | None = None

    def __repr__(self) -> str:
        return described(*self.summary())

    def summary(self, kind: str = "Annotator") -> tuple[str, list[str]]:
        """A heading (``kind``, method, classes, genes, input) and lines (settings, classes, keys, ontology) that describe the model."""
        labels, meta = self.labels, self.meta
        lines = [f"settings: {settings_line(self.model.config)}", f"classes: {listed(labels.names)}"]
        if meta.get("label_key") is not None:
            where = "" if meta.get("dataset") in (None, "<AnnData>") else f" of {meta['dataset']}"
            layer = "" if meta.get("layer") is None else f", layer {meta['layer']!r}"
            lines.append(f"classes from obs column {meta['label_key']!r}{where}{layer}")
        if labels.ontology_version is not None:
            calls = "" if labels.call_threshold is None else (f"; hierarchical calls over {len(labels.call_terms or [])} terms at probability "
                                                                f">= {labels.call_threshold:.3g}")
            lines.append(f"ontology: {labels.ontology_version}; sources: {listed(labels.sources)}{calls}")
        return f"{kind} {self.model.config.type}: {len(labels.classes)} classes x {len(self.genes):,} genes ({self.input} input)", lines

    @property
    def missing_fill(self) -> np.ndarray | None:
        """What a query's missing genes are set to: :attr:`gene_means` for a linear model, else ``None`` (zeros)."""
        return self.gene_means if isinstance(self.model, LinearClassifier) else None

    @property
    def missing_said(self) -> str:
        """How a log line says what a query's missing genes are set to."""
        return "set to 0" if self.missing_fill is None else "set to their reference means"

    def missing_offset(self, alignment: GeneAlignment) -> np.ndarray | None:
        """The :class:`~scatlas.models.base.SplitData` offset that sets a query's missing genes to :attr:`missing_fill` (``None``: they stay 0)."""
        fill = self.missing_fill
        return None if fill is None else alignment.absent_at(fill)

    def split_data(self, X: Any, label: np.ndarray | None = None, rows: tuple[np.ndarray, np.ndarray] | None = None,
                   offset: np.ndarray | None = None) -> SplitData:
        """Wrap a model-ready matrix (and a query's :meth:`missing_offset`) for the model's loaders."""
        n = X.shape[0]
        train, val = rows if rows is not None else (np.arange(0), np.arange(0))
        return SplitData(
            X=X, train=train, val=val, batch=np.zeros(n, dtype=np.int64), batch_names=["all"],
            label=label, label_names=self.labels.classes, reachability=self.labels.reachability, offset=offset,
        )

    def model_input(self, adata: ad.AnnData, layer: str | None, alignment: GeneAlignment, counts: bool | None = None) -> Any:
        """The model's matrix of validated cells: log-normalised when they hold ``counts`` (default: when the model was
        trained on counts; :func:`~scatlas.data.validate.query_counts` decides for a query), aligned to the model's
        genes by ``alignment`` (missing genes 0)."""
        X = to_csr(get_matrix(adata, layer))
        if (self.input == "counts") if counts is None else counts:
            X = normalize_log1p(X)
        return alignment.apply(X)

    def predict_proba(self, X: Any, offset: np.ndarray | None = None) -> np.ndarray:
        """Probabilities of a model-ready matrix (all rows), with a query's :meth:`missing_offset`."""
        return self.model.predict_proba(self.split_data(X, offset=offset), np.arange(X.shape[0]))

    def save(self, directory: Path) -> None:
        """Write ``model.pt``, ``genes.txt``, ``annotator.yaml`` (and ``reachability.npy``)."""
        directory.mkdir(parents=True, exist_ok=True)
        write_torch(self.model.module.state_dict(), directory / "model.pt")
        with atomic_path(directory / "genes.txt") as tmp:
            tmp.write_text("\n".join(self.genes) + "\n")
        if self.labels.reachability is not None:
            write_npy(self.labels.reachability, directory / "reachability.npy")
        if self.gene_means is not None:
            write_npy(self.gene_means, directory / "gene_means.npy")
        if self.labels.per_source is not None:  # what each label meant in each source, as HCE trained with it
            write_npy(self.labels.per_source, directory / "label_reachability.npy")
            write_npy(self.labels.fine, directory / "fine_classes.npy")
            write_npy(self.labels.call_reach, directory / "call_reachability.npy")
            write_npy(self.labels.call_depth, directory / "call_depth.npy")
            write_csv(self.labels.nested, directory / "label_hierarchy.csv")
        write_yaml(
            {
                **self.meta,
                "model": self.model.config.model_dump(mode="json"),
                "training": {k: getattr(self.model.train_config, k) for k in ("batch_size", "max_epochs", "lr", "weight_decay", "patience")},
                "input": self.input,
                "classes": [str(c) for c in self.labels.classes],
                "class_names": [str(c) for c in self.labels.names],
                "ontology": self.labels.ontology_version,
                "sources": list(self.labels.sources),
                "call_threshold": self.labels.call_threshold,
                "call_terms": None if self.labels.call_terms is None else [str(t) for t in self.labels.call_terms],
                "call_names": None if self.labels.call_names is None else [str(t) for t in self.labels.call_names],
                "scatlas_version": __version__,
            },
            directory / "annotator.yaml",
        )

    @classmethod
    def load(cls, directory: str | Path) -> Annotator:
        """Rebuild a saved annotator (CPU or GPU, whatever is available) from ``directory`` or the output folder holding it (:func:`model_directory`)."""
        directory = model_directory(directory)
        meta_path = directory / "annotator.yaml"
        if not directory.exists():
            raise InputError(f"{directory}: model folder not found (give `annotate train`'s or `transfer`'s output folder)")
        if not meta_path.exists():
            embedding = (directory / "scatlas_model.yaml").exists()
            raise InputError(f"{directory}: not a scatlas annotation model (annotator.yaml missing)"
                             + ("; it is an embedding model: scatlas.load_model" if embedding else ""))
        meta = yaml.safe_load(meta_path.read_text())
        genes = np.array((directory / "genes.txt").read_text().split())
        R = np.load(directory / "reachability.npy") if (directory / "reachability.npy").exists() else None
        per_source = np.load(directory / "label_reachability.npy") if (directory / "label_reachability.npy").exists() else None
        fine = np.load(directory / "fine_classes.npy") if (directory / "fine_classes.npy").exists() else None
        calls = {"call_reach": np.load(directory / "call_reachability.npy"), "call_depth": np.load(directory / "call_depth.npy"),
                 "call_terms": meta["call_terms"], "call_names": meta["call_names"]} if (directory / "call_depth.npy").exists() else {}
        labels = LabelSpace(meta["classes"], meta["class_names"], R, meta.get("ontology"), meta.get("sources", ["all"]), per_source, fine,
                            call_threshold=meta.get("call_threshold"), **calls)
        model = build_model(parse_model_config(meta["model"]), TrainingConfig().to_train_config(0, progress=False))
        assert isinstance(model, CellTypeClassifier)
        k = len(labels.classes)
        means = np.load(directory / "gene_means.npy") if (directory / "gene_means.npy").exists() else None
        annotator = cls(model, genes, labels, meta["input"], {k2: v for k2, v in meta.items() if k2 in ("label_key", "ontology_key", "dataset", "layer")},
                        means)
        stub = annotator.split_data(np.zeros((k, len(genes)), dtype=np.float32), np.arange(k), (np.arange(k), np.arange(0)))
        module = model.build_module(stub)
        module.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
        model.module = module.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        return annotator


def _strata(config: AnnotateConfig, data: CellData) -> list[str]:
    if config.strata is not None:
        missing = [c for c in config.strata if c not in data.obs.columns]
        if missing:
            raise InputError(f"{config.dataset.path}: strata columns {missing} not in obs; available: {list(data.obs.columns)}")
        return list(config.strata)
    found = [c for c in STRATA if c in data.obs.columns]
    return found + ([config.dataset.batch_key] if config.dataset.batch_key and config.dataset.batch_key not in found else [])


#: Above this many training cells, minibatches grow (at most :data:`MAX_BATCH`) so that an epoch is at most
#: :data:`STEPS_PER_EPOCH` steps, and epochs shrink so that training sees about :data:`CELL_BUDGET` cells.
SMALL_REFERENCE = 65_536
STEPS_PER_EPOCH = 1024
MAX_BATCH = 4096
CELL_BUDGET = 5_000_000


def scaled_training(training: TrainingConfig, n_train: int) -> tuple[TrainingConfig, str | None]:
    """The minibatch size and epoch limit of a classifier on ``n_train`` cells, where the user set none.

    Up to :data:`SMALL_REFERENCE` cells: minibatches of 64 and at most 100 epochs, early stopping
    deciding (measured on held-out chemistries, ``benchmarks/transfer_defaults.py --grid batch_size``:
    larger minibatches lose 0.005-0.02 accuracy on references of a thousand cells, even with the
    learning rate raised). Above, an epoch of 64-cell steps would take minutes and training hours,
    so the minibatch doubles until an epoch is at most :data:`STEPS_PER_EPOCH` steps (at most
    :data:`MAX_BATCH` cells, as scTab's 2,048 on millions of cells) and the epochs are cut to see
    about :data:`CELL_BUDGET` cells (at least 2). A value the user set is kept.

    Returns
    -------
    The settings to train with, and a one-line account of what was scaled (``None`` when nothing was).
    """
    small = n_train <= SMALL_REFERENCE
    rule = {"batch_size": 64 if small else min(MAX_BATCH, max(64, 1 << int(np.ceil(np.log2(n_train / STEPS_PER_EPOCH))))),
            "max_epochs": 100 if small else min(100, max(2, int(np.ceil(CELL_BUDGET / n_train))))}
    update = {k: rule[k] for k in unset_scaled(training)["training"]}
    scaled = training.model_copy(update=update)
    if small or not update:
        return scaled, None
    return scaled, (f"{n_train:,} training cells: minibatches of {scaled.batch_size:,}, at most {scaled.max_epochs} epochs "
                    "(scaled to the reference size; set --batch-size / --max-epochs to choose)")


def unset_scaled(training: TrainingConfig) -> dict[str, set[str]]:
    """The training fields :func:`scaled_training` decides (those the user left unset), as a
    ``model_dump(exclude=...)`` of a config (the values used go to the model's ``annotator.yaml``)."""
    return {"training": {"batch_size", "max_epochs"} - training.model_fields_set}


def config_record(config: AnnotateConfig | TransferConfig) -> dict[str, Any]:
    """What ``config.yaml`` records of an ``annotate`` / ``transfer`` config: every setting but the training fields
    :func:`scaled_training` decides (:func:`unset_scaled`) and how often checkpoints were written (not a setting of
    the result: a resumed run may use another)."""
    return config.model_dump(mode="json", exclude={"training": unset_scaled(config.training)["training"] | {"checkpoint_interval_s"}})


def fit_classifier(
    model_entry: dict[str, Any],
    training: TrainingConfig,
    seed: int,
    n_top_genes: int | None,
    data: CellData,
    labels: LabelSpace,
    codes: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    workdir: Path | None = None,
    sources: np.ndarray | None = None,
    log: Log | None = None,
    start: tuple[CellTypeClassifier, np.ndarray] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    chosen: Callable[[np.ndarray], None] | None = None,
) -> tuple[CellTypeClassifier, SplitData, np.ndarray]:
    """Preprocess (HVGs on ``train`` when asked), fit a classifier; return it, its split data and genes.

    ``workdir`` receives the epoch history (``history.csv``). ``sources``: each cell's source
    (dataset / study) name, which sets what its label means for hierarchical cross-entropy
    (``None``: one source). The minibatch size and epochs the user left unset follow
    :func:`scaled_training`; ``log`` hears when they were scaled, or that a full-batch fit ignores them.
    ``start``: a full-batch classifier of the same labels and its genes, where a full-batch fit
    starts; the fit keeps those genes (a refit on more cells: what held-out cells calibrated). ``chosen``
    hears the genes before anything is fitted (e.g. to check that the queries hold them). A network trained by minibatches writes ``last.ckpt`` to
    ``checkpoint_dir`` (an ensemble, one per member) and, with ``resume``, continues from it; a
    full-batch fit keeps no checkpoint.
    """
    ignored = training.epochs_set()
    training, scaled = scaled_training(training, len(train))
    columns = None if start is None else pd.Index(data.var_names).get_indexer(start[1])
    prep = preprocess_split(data.lognorm, data.var_names, train, n_top_genes, "none", columns)
    if chosen is not None:
        chosen(prep.genes)
    sdata = SplitData(
        X=prep.X, train=train, val=val, batch=np.asarray(data.batch.codes, dtype=np.int64), batch_names=[str(b) for b in data.batch.categories],
        label=codes, label_names=labels.classes, reachability=labels.reachability, source=labels.source_codes(sources, data.n_cells),
        label_reachability=labels.per_source,
    )
    model = build_model(parse_model_config(model_entry), training.to_train_config(seed, progress=False))
    assert isinstance(model, CellTypeClassifier)
    if log and (said := training.chunk_size_unused(model.config.type, sp.issparse(sdata.X))):  # a streamed source is not a sparse matrix
        log(said)
    if log and model.full_batch and ignored:
        log(f"the linear model is fitted full-batch to convergence: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply "
            "(minibatch training: the mlp method)")
    elif log and scaled and not model.full_batch:
        log(scaled)
    # every fit keeps its last epoch's weights (no best-epoch restore), so a cross-validation fold is fitted as the saved model
    # and the transfer reference are (the best-validation-loss epoch transferred worse to held-out batches: benchmarks/RESULTS.md)
    if start is None:
        history = model.fit(sdata, checkpoint_dir, resume)
    else:
        assert isinstance(model, LinearClassifier) and isinstance(start[0], LinearClassifier)
        history = model.fit(sdata, start=start[0].head())
    if workdir is not None:
        write_csv(history, workdir / "history.csv")
    return model, sdata, prep.genes


def _detailed(data: CellData, rows: np.ndarray, truth: np.ndarray, proba: np.ndarray, labels: LabelSpace, strata: list[str]) -> pd.DataFrame:
    classes = np.asarray(labels.classes)
    best = labels.finest(proba)
    pred = classes[best]
    table = pd.DataFrame({"cell_id": data.cell_ids[rows], "y_true": truth, "y_pred": pred, "confidence": proba[np.arange(len(best)), best]})
    table["correct"] = table["y_true"] == table["y_pred"]
    if labels.reachability is not None:
        table["correct_hierarchical"] = hierarchical_correct(truth, pred, labels.classes, labels.reachability)
    calls = labels.calls(proba)
    if calls is not None:  # the call is right when it is the truth or an ancestor of it
        table["y_call"] = calls["id"].to_numpy()
        table["call_correct"] = labels.calls_right(calls["id"].to_numpy(), labels.codes(truth))
        table["call_depth"] = calls["depth"].to_numpy()
    for column in strata:
        table[column] = string_values(data.obs[column])[rows]
    probs = pd.DataFrame(proba, columns=[f"p_{c}" for c in labels.classes])
    return pd.concat([table, probs], axis=1)


def write_evaluation(table: pd.DataFrame, labels: LabelSpace, strata: list[str], out: Path, title: str = "") -> pd.DataFrame:
    """Write the metric tables and figures of a detailed-results table; return the overall table."""
    tables = annotation_tables(table["y_true"].to_numpy(), table["y_pred"].to_numpy(), labels.classes, labels.reachability, table[strata] if strata else None)
    names = dict(zip(labels.classes, labels.names, strict=True))
    per_class = tables["per_class"]
    if any(c != n for c, n in names.items()):  # CL ids: put the readable name beside each
        per_class.insert(1, "name", per_class["label"].map(names).fillna(per_class["label"]))
    for name, frame in tables.items():
        write_csv(frame, out / f"{name}_metrics.csv")
    write_parquet(table, out / "detailed_results.parquet")
    if "call_correct" in table:
        write_csv(pd.DataFrame([{"threshold": labels.call_threshold, "accuracy": table["call_correct"].mean(), "mean_depth": table["call_depth"].mean(),
                                 "exact_share": (table["y_call"] == table["y_true"]).mean(), "n_cells": len(table)}]), out / "hierarchical_calls.csv")
    from scatlas.plot.figures import confusion_heatmap, per_class_bars  # matplotlib loads only when a figure is drawn

    y_true, y_pred = table["y_true"].map(names).to_numpy(), table["y_pred"].map(names).to_numpy()
    write_csv(confusion_counts(y_true, y_pred).reset_index(), out / "confusion_matrix.csv")
    confusion_heatmap(y_true, y_pred, out / "confusion_matrix.png", title)
    per_class_bars(per_class.assign(label=per_class["label"].map(names).fillna(per_class["label"])), out / "per_class_f1.png", title=title)
    return tables["overall"]


def refit_full_batch(model_entry: dict[str, Any], training: TrainingConfig, seed: int, data: CellData, labels: LabelSpace,
                     codes: np.ndarray, rows: np.ndarray, sources: np.ndarray | None,
                     first: tuple[CellTypeClassifier, np.ndarray]) -> tuple[CellTypeClassifier, SplitData, np.ndarray]:
    """A full-batch classifier fitted again on ``rows`` (its training cells and the held-out ones), cheap and deterministic.

    As scikit-learn's ``CalibratedClassifierCV(ensemble=False)``: held-out cells chose what the
    caller keeps (a temperature, thresholds) on the first fit (``first``: the model and its
    genes), and then join the final fit, which starts from the first fit's weights on its genes.
    """
    return fit_classifier(model_entry, training, seed, None, data, labels, codes, rows, rows[:0], sources=sources, start=first)


def reference_means(model: CellTypeClassifier, sdata: SplitData) -> np.ndarray | None:
    """Each model gene's mean over every cell of ``sdata`` (the model's input), for a linear model (:attr:`Annotator.gene_means`); else ``None``."""
    return gene_moments(sdata.X)[0].astype(np.float32) if isinstance(model, LinearClassifier) else None


def _final_model(config: AnnotateConfig, data: CellData, labels: LabelSpace, codes: np.ndarray, key: str, out: Path, log: Log,
                 checkpoint_dir: Path | None = None, resume: bool = False) -> None:
    train, val = holdout(np.arange(data.n_cells), 0.1, config.seed, codes)
    sources = string_values(data.obs[config.dataset_key]) if config.dataset_key else None
    train, val = np.sort(train), np.sort(val)
    model, sdata, genes = fit_classifier(config.model, config.training, config.seed, config.n_top_genes, data, labels, codes, train, val, sources=sources, log=log,
                                         checkpoint_dir=checkpoint_dir, resume=resume)
    labels = labels.with_call_threshold(model.predict_proba(sdata, val), codes[val], config.call_precision, sdata.sources_of(val))
    if model.full_batch:
        model, sdata, genes = refit_full_batch(config.model, config.training, config.seed, data, labels, codes, np.arange(data.n_cells),
                                               sources, (model, genes))
        kept = ", keeping the hierarchical-call threshold set on the held-out cells" if labels.call_threshold is not None else ""
        log(f"refitted on all {data.n_cells} cells (a full-batch fit){kept}")
    meta = {"label_key": key, "dataset": str(config.dataset.path), "layer": config.dataset.layer}
    Annotator(model, genes, labels, data.input, meta, reference_means(model, sdata)).save(out / "model")


def _cross_validate(config: AnnotateConfig, data: CellData, labels: LabelSpace, codes: np.ndarray, truth: np.ndarray, stage: Path, log: Log,
                    checkpoints: Path | None = None, resume: bool = False) -> pd.DataFrame:
    """Fit and evaluate on every fold of ``config.split``; write per-fold and pooled tables; return the mean ± 95% CI table.

    Fold ``i``'s network checkpoints to ``checkpoints / splits_<i>`` (``resume``: continues from there)."""
    strata = _strata(config, data)
    sources = string_values(data.obs[config.dataset_key]) if config.dataset_key else None
    split_data = CellData(data.name, data.lognorm, data.var_names, data.obs, data.batch, pd.Categorical(truth))
    splits: list[Split] = make_splits(config.split, config.split.group_key or config.dataset.batch_key, split_data, log)
    pooled, folds = [], []
    for split in splits:
        log(f"split {split.number}/{len(splits)}: {parse_model_config(config.model).type} ({len(split.train)} train, {len(split.val)} val, {len(split.test)} test cells)")
        fold_dir = stage / f"splits_{split.number}"
        model, sdata, genes = fit_classifier(config.model, config.training, config.seed, config.n_top_genes, data, labels, codes, split.train, split.val,
                                             fold_dir, sources, log, checkpoint_dir=checkpoints / f"splits_{split.number}" if checkpoints else None,
                                             resume=resume)
        fold_labels = labels.with_call_threshold(model.predict_proba(sdata, split.val), codes[split.val], config.call_precision, sdata.sources_of(split.val))
        if model.full_batch:  # as the saved model: the validation cells set the threshold, then join the fit
            model, sdata, _ = refit_full_batch(config.model, config.training, config.seed, data, labels, codes,
                                               np.sort(np.concatenate([split.train, split.val])), sources, (model, genes))
            kept = ", keeping the hierarchical-call threshold" if fold_labels.call_threshold is not None else ""
            log(f"split {split.number}: refitted on its {len(split.train) + len(split.val)} training and validation cells{kept}")
        table = _detailed(data, split.test, truth[split.test], model.predict_proba(sdata, split.test), fold_labels, strata)
        folds.append(write_evaluation(table, fold_labels, strata, fold_dir, f"split {split.number}").assign(split=split.number))
        pooled.append(table.assign(split=split.number))
    write_evaluation(pd.concat(pooled, ignore_index=True), labels, strata, stage, "all test cells")
    fold_table = pd.concat(folds, ignore_index=True)
    write_csv(fold_table, stage / "fold_metrics.csv")
    summary = fold_summary(fold_table.drop(columns=["split", "n_cells"]), by=["evaluation"])
    write_csv(summary, stage / "fold_metrics_95CI.csv")
    return summary


def said_once(log: Log) -> Log:
    """``log`` that passes each distinct line once."""
    said: set[str] = set()

    def once(line: str) -> None:
        if line not in said:
            said.add(line)
            log(line)

    return once


def train_annotator(config: AnnotateConfig, out: str | Path, overwrite: bool = False, log: Log = print, resume: bool = False) -> pd.DataFrame:
    """Cross-validate a cell-type classifier, write every evaluation table, and save the final model.

    Parameters
    ----------
    config
        What to train and how to evaluate.
    out
        Output directory (written to a temporary sibling, then renamed).
    overwrite
        Replace an existing ``out``.
    log
        Receives progress lines.
    resume
        Continue the networks' training from the checkpoints an interrupted run kept beside ``out``
        (one per fold and one for the final model; :func:`~scatlas._io.resumable_training`).

    Returns
    -------
    Mean ± 95% CI over folds of the overall metrics (exact and hierarchical).
    """
    if config.dataset.label_key is None and config.ontology_key is None:
        raise ConfigError("annotate: give a label key (and optionally an ontology key)")
    ontology = _ontology(config)
    if parse_model_config(config.model).loss == "hce" and ontology is None:  # type: ignore[attr-defined]
        raise ConfigError("annotate: --loss hce needs --ontology-key (a column of Cell Ontology ids) or --label-map")
    if config.label_map is not None and (config.ontology_key or not config.dataset.label_key):
        raise ConfigError("annotate: --label-map maps --label-key values to CL ids; do not combine it with --ontology-key")
    if not (config.cross_validate or config.final_model):
        raise ConfigError("annotate: nothing to do (no cross-validation and no final model)")
    check_output_dir(out, overwrite, (config.dataset.path,))
    log = said_once(log)  # what every fold's fit says alike (settings that do not apply) is said once
    with resumable_training(checkpoints_beside(out), resume, overwrite, log) as checkpoints:
        key = config.ontology_key or (f"{config.dataset.label_key}_cl_id" if config.label_map else config.dataset.label_key)
        data = load_dataset(config.dataset, extra_keys=tuple(k for k in (config.ontology_key, config.split.group_key, config.dataset_key) if k), log=log)
        if config.label_map is not None:
            data.obs[key] = map_author_labels(data.obs[config.dataset.label_key].astype(str), config.label_map, ontology)
        truth = string_values(data.obs[key])
        names = string_values(data.obs[config.dataset.label_key]) if config.dataset.label_key else None
        sources = string_values(data.obs[config.dataset_key]) if config.dataset_key else None
        labels = label_space(truth, names, ontology, where=f"{config.dataset.path}: obs column {key!r}: ", sources=sources, log=log)
        codes = labels.codes(truth)
        check_checkpoint_settings(checkpoints, config.model_dump(mode="json"), data.cell_ids, data.var_names, resume)
        with staged_dir(out, overwrite, (config.dataset.path,)) as stage:
            summary = _cross_validate(config, data, labels, codes, truth, stage, log, checkpoints, resume) if config.cross_validate else pd.DataFrame()
            if config.final_model:
                log("final model on all labelled cells")
                _final_model(config, data, labels, codes, key, stage, log, checkpoints / "final", resume)
            write_yaml({**config_record(config), "ontology": labels.ontology_version}, stage / "config.yaml")
            sections = []
            if config.cross_validate:
                sections = [Section("Test cells: mean ± 95% CI half-width over folds", [mean_ci_table(summary, "evaluation", ("accuracy", "macro_f1", "weighted_f1"))],
                                    note="↑ higher is better. exact: the predicted class is the truth; hierarchical: the truth or one of its "
                                         "Cell Ontology descendants counts as right (scTab). Every fold: fold_metrics.csv."),
                            Section("Per class (all test cells)", [pd.read_csv(stage / "per_class_metrics.csv")], [stage / "per_class_f1.png", stage / "confusion_matrix.png"]),
                            *[Section(f"By {c}", [pd.read_csv(stage / f"per_{c}_metrics.csv")]) for c in _strata(config, data)]]
            if len(labels.nested):
                write_csv(labels.nested, stage / "label_hierarchy.csv")
                sections.append(Section("Labels that nest in the Cell Ontology, and what each means per source", [labels.nested]))
            if sections:
                write_report(stage / "report.html", f"Annotation: {parse_model_config(config.model).type} + {parse_model_config(config.model).loss}",  # type: ignore[attr-defined]
                             sections, f"{config.dataset.path} · {labels.ontology_version or 'no ontology'}")
        return summary


def no_counts(X: Any) -> np.ndarray:
    """Which cells (rows of a model-ready matrix, non-negative as validated) have no counts in any of the model's genes."""
    return np.asarray(X.sum(axis=1)).ravel() == 0


def no_counts_said(source: str, n: int, n_cells: int) -> str:
    """The one line saying that ``n`` cells of ``source`` have no counts in the model's genes, called by an annotator without flags."""
    return (f"{source}: {n} of {n_cells} cells have no counts in the model's genes: their calls rest on the model's intercepts alone "
            "(a transfer's reference model flags them unknown)")


UNKNOWN_REASONS = {"unknown_low_confidence": "low confidence", "unknown_far_from_reference": "far from reference", "unknown_no_counts": "no counts"}
"""The flag columns of a reference model's calls (``predictions.csv``) and the words ``<key>_unknown_reason`` uses for them."""


def unknown_reasons(flags: pd.DataFrame) -> np.ndarray:
    """Each cell's reasons for being unknown, joined by ``' & '`` (``None`` for a known cell), from the :data:`UNKNOWN_REASONS` columns of ``flags``."""
    reasons = np.full(len(flags), "", dtype=object)
    for column, words in UNKNOWN_REASONS.items():
        on = flags[column].to_numpy(dtype=bool)
        reasons[on] = [f"{r} & {words}" if r else words for r in reasons[on]]
    reasons[reasons == ""] = None
    return reasons


def unknown_said(source: str, flags: pd.DataFrame) -> str:
    """One line: how many of a reference model's calls (``flags``: :meth:`~scatlas.tl.ReferenceModel.unknown`'s columns) are unknown, and why."""
    counts = {column: int(flags[column].sum()) for column in UNKNOWN_REASONS}
    words = {**UNKNOWN_REASONS, "unknown_no_counts": "no counts in the model's genes"}
    why = ", ".join(f"{n} {words[column]}" for column, n in counts.items() if n)
    n_unknown = int(flags["unknown"].sum())
    several = "; a cell may have several reasons" if sum(counts.values()) > n_unknown else ""
    return f"{source}: {n_unknown} of {len(flags)} cells unknown" + (f" ({why}{several})" if why else "")


def write_calls(adata: ad.AnnData, key: str, labels: LabelSpace, proba: np.ndarray, log: Log, flags: pd.DataFrame | None = None,
                rows: np.ndarray | None = None) -> None:
    """Write a classifier's calls into ``adata`` under the keys ``annotate`` and ``transfer`` share.

    ``obs['<key>_pred']`` (finest-class call, class id), ``obs['<key>_pred_label']`` (its readable
    name), ``obs['<key>_pred_score']`` (its probability), ``obsm['<key>_proba']`` (cells × classes)
    and ``uns['<key>_classes']``. A reference model's ``flags`` (its calls' ``unknown`` columns
    and ``latent_distance``, as :meth:`~scatlas.tl.ReferenceModel.calls` makes them) add
    ``obs['<key>_unknown']``, ``obs['<key>_unknown_reason']`` (:func:`unknown_reasons`) and
    ``obs['<key>_latent_distance']`` (to the nearest reference class centroid). ``rows``: the
    positions in ``adata`` of ``proba``'s cells (default: every cell, in order); any other cell
    (e.g. an all-zero one the fit left out) gets no call (missing values) and counts as unknown,
    for the reason ``'no call'``. A view is first given data of its own (:func:`~scatlas.data.io.view_to_actual`, a line to ``log``).
    """
    view_to_actual(adata, log)
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    best = labels.finest(proba)

    def column(values: np.ndarray, missing: Any = None) -> np.ndarray:
        full = np.full(adata.n_obs, missing, dtype=object if missing is None else np.asarray(values).dtype)
        full[rows] = values
        return full

    adata.obs[f"{key}_pred"] = pd.Categorical(column(np.asarray(labels.classes)[best]))
    adata.obs[f"{key}_pred_label"] = pd.Categorical(column(np.asarray(labels.names)[best]))
    adata.obs[f"{key}_pred_score"] = column(proba[np.arange(len(best)), best], np.nan)
    if flags is not None:
        adata.obs[f"{key}_unknown"] = column(flags["unknown"].to_numpy(dtype=bool), True)
        reasons = column(unknown_reasons(flags))
        reasons[np.setdiff1d(np.arange(adata.n_obs), rows)] = "no call"
        adata.obs[f"{key}_unknown_reason"] = pd.Categorical(reasons)
        adata.obs[f"{key}_latent_distance"] = column(flags["latent_distance"].to_numpy(dtype=np.float64), np.nan)
    calls = labels.calls(proba)
    if calls is not None:
        adata.obs[f"{key}_pred_hierarchical"] = pd.Categorical(column(calls["id"].to_numpy()))
        adata.obs[f"{key}_pred_hierarchical_label"] = pd.Categorical(column(calls["name"].to_numpy()))
    full = np.full((adata.n_obs, proba.shape[1]), np.nan, dtype=np.float32)
    full[rows] = proba
    adata.obsm[f"{key}_proba"] = full
    adata.uns[f"{key}_classes"] = [str(c) for c in labels.classes]


def annotate(adata: ad.AnnData, model: Annotator | ReferenceModel | str | Path, *, layer: str | None = None, gene_key: str | None = None, min_overlap: float = 0.5,
             chunk_size: int = 100_000, log: Log = print) -> Annotator:
    """Annotate the cells of ``adata`` with a trained classifier; calls and probabilities go into ``adata``.

    Parameters
    ----------
    adata
        Query cells (counts or log-normalised, as the model was trained); genes are aligned by name
        and missing ones set to their reference means (a linear model) or 0 (a network; see :class:`Annotator`).
    model
        An :class:`Annotator`, a :class:`~scatlas.tl.ReferenceModel` (what :func:`transfer` returns), or
        a directory holding either: what ``scatlas annotate train`` or ``scatlas transfer`` wrote,
        or :meth:`ReferenceModel.save`'s. A reference model gives the calls, calibrated confidences
        and unknown flags the transfer gave (``obs['<key>_unknown']``, ``_unknown_reason`` and ``_latent_distance`` too).
    layer
        Layer holding the matrix (``"raw"``: ``.raw``, see :func:`~scatlas.data.get_matrix`); default:
        the layer the model was trained on when ``adata`` has it, else ``.X``.
    gene_key
        Column of ``adata.var`` holding the gene names the model uses (e.g. Ensembl ids beside
        symbols, as scanpy's ``gene_symbols``); default: ``adata.var_names``.
    min_overlap
        Smallest share of the model's genes the query must have.
    chunk_size
        Cells mapped at a time when ``adata`` is backed (``anndata.read_h5ad(path, backed="r")``):
        its matrix is read from the file chunk by chunk, never whole.
    log
        Receives the matrix read (when it is the training layer) and the gene-overlap line.

    Returns
    -------
    The annotator used. ``adata`` gains the keys of :func:`write_calls` (``<label_key>_pred`` ...;
    ``_unknown``, ``_unknown_reason`` and ``_latent_distance`` with a reference model) and ``uns['scatlas_gene_overlap']``.

    Examples
    --------
    >>> sa.tl.annotate(query, "annotator/model")       # doctest: +SKIP
    >>> sa.tl.annotate(new_cells, "transfer_out")        # a transfer's reference model, saved  # doctest: +SKIP
    >>> query.obs["cell_type_pred_label"].value_counts()   # doctest: +SKIP
    """
    from scatlas.tl._transfer import ReferenceModel  # the transfer's model builds on this module

    check_chunk_size(chunk_size)  # before the lines about the query, so that a refusal is one line
    with named([(adata, "query")]):  # lines and errors call an in-memory AnnData "query", as tl.transfer does
        loaded = model
        if not isinstance(model, (Annotator, ReferenceModel, str, os.PathLike)):
            raise ConfigError(f"model: a saved model's folder, an Annotator or a ReferenceModel, not {type(model).__name__}"
                             + (" (to learn from a labelled reference, sa.tl.transfer(reference, query, label_key=...))" if isinstance(model, ad.AnnData) else ""))
        if not isinstance(model, (Annotator, ReferenceModel)):
            directory = model_directory(model)
            loaded = ReferenceModel.load(directory) if (directory / TRANSFER_FILE).exists() else Annotator.load(directory)
        reference = loaded if isinstance(loaded, ReferenceModel) else None
        annotator = loaded.annotator if isinstance(loaded, ReferenceModel) else loaded
        layer, counts, alignment, said = checked_query(adata, layer, annotator.meta.get("layer"), annotator.input, annotator.genes, min_overlap, gene_key,
                                                       "the model was trained",
                                                       "choose them with `layer` / `--layer`")
        for line in said:  # once the query passed its checks, so that bad input gets its one line alone
            log(line)
        log(alignment.said(source_name(adata), annotator.missing_said))
        offset = annotator.missing_offset(alignment)

        empty: list[np.ndarray] = []

        def calls(X: Any) -> tuple[np.ndarray, pd.DataFrame | None]:
            empty.append(no_counts(X))
            if reference is None:
                return annotator.predict_proba(X, offset), None
            proba, distance = reference.scores(X, offset)
            return proba, reference.unknown(proba, distance, empty[-1])

        parts = [calls(annotator.model_input(part, layer, alignment, counts)) for part in cell_chunks(adata, chunk_size)]
        flags = None if reference is None else pd.concat([f for _, f in parts], ignore_index=True)
        if flags is not None:
            log(unknown_said(source_name(adata), flags))
        elif n_empty := int(np.concatenate(empty).sum()):  # a reference model's line above counts them
            log(no_counts_said(source_name(adata), n_empty, adata.n_obs))
        key = annotator.meta.get("label_key") or "cell_type"
        write_calls(adata, key, annotator.labels, np.concatenate([p for p, _ in parts]), log, flags)
        adata.uns["scatlas_gene_overlap"] = {k: str(v) for k, v in alignment.report().items()}
        adata.uns["scatlas_annotation"] = {"model": str(model) if isinstance(model, (str, Path)) else "<in memory>",
                                           "ontology": str(annotator.labels.ontology_version), "version": __version__}
        return annotator


def predict_annotations(model_dir: str | Path, query: str | Path, out: str | Path, layer: str | None = None, min_overlap: float = 0.5,
                        stream: bool = False, chunk_size: int | None = None, gene_key: str | None = None, overwrite: bool = False,
                        log: Log = print) -> ad.AnnData:
    """Annotate a query file with a saved model (:func:`annotate`); write ``out`` (``.h5ad``) atomically.

    ``out`` is the query with the calls added; with ``stream`` the query's matrix is never
    loaded (read ``chunk_size`` cells at a time, default 100,000) and ``out`` holds the results
    only: ``obs`` with the calls, the genes, the probabilities in ``.obsm`` and no matrix. An
    existing ``out`` is refused unless ``overwrite``, and the query itself always.
    """
    check_output_file(out, ".h5ad", overwrite, inputs=(query,))
    adata = read_anndata(query, backed=stream)
    annotate(adata, model_dir, layer=layer, gene_key=gene_key, min_overlap=min_overlap, log=log, **({"chunk_size": chunk_size} if chunk_size else {}))
    if chunk_size is not None and not stream:  # once the query passed its checks, so that a refusal is one line
        log(f"{query}: chunk_size does not apply (the query was loaded whole; --stream maps it chunk by chunk)")
    if stream:
        adata = ad.AnnData(obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=dict(adata.uns))
    adata.uns.pop("scatlas_source", None)
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return adata


def evaluate_annotations(
    predictions: str | Path, truth_key: str, out: str | Path, pred_key: str | None = None, ontology: Literal["auto", "none"] = "auto",
    log: Log = print,
) -> pd.DataFrame:
    """Evaluate predictions stored in an ``.h5ad`` against a truth column; write tables and figures to ``out``.

    With ``ontology='auto'`` and CL ids on both sides, hierarchy-aware rows are added. Cells
    without a true label or without a call (missing values) are left out, and ``log`` hears how many.
    """
    check_writable(out)
    adata = read_anndata(predictions)
    if pred_key is None:
        found = [c for c in adata.obs.columns if c.endswith("_pred")]
        if len(found) != 1:
            raise InputError(f"{predictions}: give --pred-key; prediction columns found: {found}")
        pred_key = found[0]
    if pred_key == truth_key:
        raise ConfigError(f"{predictions}: the truth and prediction columns are both {truth_key!r}; the predictions are e.g. <key>_pred")
    for key in (truth_key, pred_key):
        if key not in adata.obs:
            raise InputError(f"{predictions}: obs column {key!r} not found{did_you_mean(key, adata.obs.columns)}; available: {list(adata.obs.columns)}")
    source = Path(predictions).name
    kept = (with_values(adata.obs[truth_key], source, truth_key, "no true label", "the evaluation", log)
            & with_values(adata.obs[pred_key], source, pred_key, "no call", "the evaluation", log))
    if not kept.any():
        raise InputError(f"{predictions}: no cell has both a true label ({truth_key!r}) and a call ({pred_key!r})")
    adata = adata[kept] if not kept.all() else adata
    truth = string_values(adata.obs[truth_key])
    pred = string_values(adata.obs[pred_key])
    if not set(truth) & set(pred):
        raise InputError(f"{predictions}: obs columns {truth_key!r} and {pred_key!r} share no label (truth e.g. {sorted(set(truth))[:3]}, "
                         f"predictions e.g. {sorted(set(pred))[:3]}); compare ids with ids and names with names "
                         f"(predict writes <key>_pred with the model's classes and <key>_pred_label with readable names)")
    cl = ontology == "auto" and all(v.startswith("CL:") for v in set(truth) | set(pred))
    labels = label_space(np.concatenate([truth, pred]), None, CellOntology() if cl else None)
    table = pd.DataFrame({"cell_id": adata.obs_names.astype(str), "y_true": truth, "y_pred": pred})
    strata = [c for c in STRATA if c in adata.obs.columns]
    for column in strata:
        table[column] = string_values(adata.obs[column])
    out = Path(out)
    return write_evaluation(table, labels, strata, out, str(Path(predictions).name))


def load_annotate_config(values: dict[str, Any]) -> AnnotateConfig:
    """Validate CLI/API settings into a :class:`AnnotateConfig` with readable errors."""
    return parse_settings(AnnotateConfig, values)

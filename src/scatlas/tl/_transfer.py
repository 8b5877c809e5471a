"""Label transfer from a labelled reference to unlabelled queries.

The reference model is learned once, on reference cells only; each query is then mapped
through the frozen model. Consequences: the reference's predictions are bit-identical
whatever queries are passed, and the same seed gives the same query predictions.

Outputs per dataset (``reference`` and one folder per query file stem):
``predictions.csv`` (``cell_id, predicted, confidence, unknown`` + its three reasons and the
latent distance), ``probabilities.parquet`` (calibrated), and with labels ``metrics.csv``,
``per_class_metrics.csv`` and ``confusion_matrix.csv`` (cells of each true label called each
label; ``report.html`` shows it shaded by row; ``confusion_matrix.png`` too with ``figures``).
``calibration.csv`` holds the expected calibration error before and after temperature scaling on
held-out reference cells, and the distance cut-off with the number of reference cells it was set on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scatlas._describe import described
from scatlas._errors import ConfigError, InputError
from scatlas._io import (ChunkedTable, check_checkpoint_settings, check_output_dir, checkpoint_path, checkpoints_beside, resumable_training,
                         staged_dir, write_csv, write_npy, write_yaml)
from scatlas.tl._annotation import (METHODS, TRANSFER_FILE, Annotator, classifier_entry, config_record, default_method, fit_classifier,
                                    model_directory, no_counts, reference_means, refit_full_batch, resolve_model, unknown_said, write_calls)
from scatlas.tl._labels import LabelSpace, label_space
from scatlas.data.dataset import CellData, DatasetConfig, cell_data, load_dataset
from scatlas.data.io import cell_chunks, get_var, named, on_disk, read_anndata, source_name, string_values, var_name
from scatlas.data.align import GeneAlignment, align_genes, checked_query
from scatlas.data.sources import as_source
from scatlas.data.splits import holdout
from scatlas.data.loaders import STREAM_CHUNK
from scatlas.data.validate import check_obs_keys, resolve_input, with_values
from scatlas.models.base import SplitData
from scatlas.models.classifiers import CellTypeClassifier
from scatlas.settings import Seed, TrainingConfig, check_keywords, parse_settings
from scatlas.metrics.annotation import confusion_counts, overall_metrics, per_class_metrics
from scatlas.metrics.calibration import expected_calibration_error, fit_temperature, softmax
from scatlas.metrics.stats import conformal_cutoff
from scatlas.ontology import CellOntology
from scatlas.report.html import Section, write_report

Log = Callable[[str], None]


class TransferConfig(BaseModel):
    """Settings of ``scatlas transfer``.

    Attributes
    ----------
    reference
        The labelled reference (``label_key`` required).
    queries
        Query ``.h5ad`` files (distinct file stems: each names an output folder).
    ontology_key
        Reference column of Cell Ontology ids (classes become CL ids; enables ``loss: hce``).
    dataset_key
        Reference column naming each cell's source (study); sets each label's meaning for HCE.
    query_label_key
        Query column with known labels (evaluation mode).
    query_layer
        Layer holding the queries' matrices; default: the reference's layer where a query has it,
        else ``.X``.
    query_gene_key
        Column of each query's ``.var`` holding the gene names the reference uses (e.g. Ensembl
        ids beside symbols); default: the queries' ``var_names``.
    model
        Classifier entry, e.g. :data:`METHODS` ``["mlp"]`` with ``loss: ce|hce`` (default:
        :func:`~scatlas.tl._annotation.default_method`'s preset).
    calibration_fraction, val_fraction
        Reference cells held out for calibration / early stopping.
    confidence_threshold
        Calibrated max probability under which a cell is called ``unknown``.
    distance_quantile
        A cell farther from every reference class centroid (in the model's latent space)
        than the conformal cut-off at this level of the held-out reference cells' distances
        (:func:`~scatlas.metrics.conformal_cutoff`) is called ``unknown``: a cell like the
        reference's is flagged with probability at most ``1 − distance_quantile``. The linear
        model's latent is its input, fitted to no cell, so every reference cell counts as held
        out, its own class's centroid taken without it (leave-one-out: the cut-off then depends
        on no seed); a network's are the calibration cells. 1 turns the distance flag off.
    min_overlap
        Smallest share of the model's genes a query must have.
    call_precision
        Precision the hierarchical calls must reach on the held-out calibration cells (sets their threshold).
    query_chunk_size
        Query cells mapped at a time; a query file (or a backed AnnData in :func:`transfer`) is
        read this many cells at a time, never whole, and its outputs are written chunk by chunk.
    """

    model_config = ConfigDict(extra="forbid")

    reference: DatasetConfig
    queries: list[Path] = Field(default_factory=list)
    ontology_key: str | None = None
    dataset_key: str | None = None
    query_label_key: str | None = None
    query_layer: str | None = None
    query_gene_key: str | None = None
    model: dict[str, Any] | None = None
    n_top_genes: int | None = Field(None, gt=0)
    training: TrainingConfig = Field(default_factory=TrainingConfig)  # batch size and epochs: scaled_training
    calibration_fraction: float = Field(0.2, gt=0, lt=0.5)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    confidence_threshold: float = Field(0.5, ge=0, le=1)
    distance_quantile: float = Field(0.99, gt=0, le=1)
    min_overlap: float = Field(0.5, ge=0, le=1)
    call_precision: float = Field(0.95, gt=0, le=1)
    query_chunk_size: int = Field(STREAM_CHUNK, ge=1)
    seed: Seed = 0

    _model = field_validator("model")(classifier_entry)

    @model_validator(mode="after")
    def _default_model(self) -> TransferConfig:
        self.model = resolve_model(self.model, self.reference.stream)
        return self


@dataclass
class ReferenceModel:
    """The frozen reference classifier with its calibration and unknown-detection settings.

    :meth:`save` writes it (``scatlas transfer`` writes ``reference/model``); :func:`scatlas.tl.annotate`
    (``scatlas annotate predict``) maps new cells through a saved one later, with the same calls,
    calibrated confidences and unknown flags as the transfer gave.
    """

    annotator: Annotator
    temperature: float
    centroids: np.ndarray
    distance_threshold: float
    confidence_threshold: float

    def __repr__(self) -> str:
        head, lines = self.annotator.summary("ReferenceModel")
        return described(head, [*lines, f"calibration: temperature {self.temperature:.3g}; unknown below confidence "
                                                 f"{self.confidence_threshold:.3g} or beyond latent distance {self.distance_threshold:.3g}"])

    def save(self, directory: str | Path) -> Path:
        """Write the classifier (:meth:`Annotator.save`), ``centroids.npy`` and ``transfer.yaml`` (temperature, thresholds) to ``directory``."""
        directory = Path(directory)
        self.annotator.save(directory)
        write_npy(self.centroids, directory / "centroids.npy")
        write_yaml({"temperature": self.temperature, "distance_threshold": self.distance_threshold, "confidence_threshold": self.confidence_threshold},
                   directory / TRANSFER_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceModel:
        """Rebuild a saved reference model: ``directory`` as :meth:`save` wrote it, or the output folder of ``scatlas transfer``."""
        directory = model_directory(directory)
        if not (directory / TRANSFER_FILE).exists():
            raise InputError(f"{directory}: not a saved transfer reference model ({TRANSFER_FILE} missing; an `annotate train` model loads as an Annotator)")
        settings = yaml.safe_load((directory / TRANSFER_FILE).read_text())
        return cls(Annotator.load(directory), float(settings["temperature"]), np.load(directory / "centroids.npy"),
                   float(settings["distance_threshold"]), float(settings["confidence_threshold"]))

    def scores(self, X: Any, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities of a model-ready matrix (with a query's :meth:`Annotator.missing_offset`), and each cell's latent distance to its nearest class centroid."""
        model, rows = self.annotator.model, np.arange(X.shape[0])
        sdata = self.annotator.split_data(X, offset=offset)
        return softmax(model.predict_logits(sdata, rows), self.temperature), centroid_distances(model, sdata, rows, self.centroids)

    def unknown(self, proba: np.ndarray, distance: np.ndarray, empty: np.ndarray, best: np.ndarray | None = None) -> pd.DataFrame:
        """Each cell's ``unknown`` flag and why: ``unknown_low_confidence`` (the finest call's probability under the
        confidence threshold), ``unknown_far_from_reference`` (``distance``, to the nearest class centroid, beyond the
        distance threshold), ``unknown_no_counts`` (``empty``, :func:`no_counts` of the model-ready matrix: such a call
        rests on the intercepts alone); and ``latent_distance``.

        ``best``: the finest-class calls of ``proba`` when the caller has them already.
        """
        best = self.annotator.labels.finest(proba) if best is None else best
        low, far = proba[np.arange(len(best)), best] < self.confidence_threshold, distance > self.distance_threshold
        return pd.DataFrame({"unknown": low | far | empty, "unknown_low_confidence": low, "unknown_far_from_reference": far,
                             "unknown_no_counts": empty, "latent_distance": distance})

    def predict(self, X: Any, cell_ids: np.ndarray, offset: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Predictions (:meth:`calls`) and calibrated probabilities of a model-ready matrix (with a query's :meth:`Annotator.missing_offset`)."""
        proba, distance = self.scores(X, offset)
        probabilities = pd.concat([pd.DataFrame({"cell_id": cell_ids}), pd.DataFrame(proba, columns=list(self.annotator.labels.names))], axis=1)
        return self.calls(proba, distance, no_counts(X), cell_ids), probabilities

    def calls(self, proba: np.ndarray, distance: np.ndarray, empty: np.ndarray, cell_ids: np.ndarray) -> pd.DataFrame:
        """Each cell's finest-class call, confidence, unknown flags and latent distance (:meth:`unknown`) and, with an ontology,
        hierarchical call, from its calibrated probabilities, its distance to the nearest class centroid and whether it has no counts."""
        labels = self.annotator.labels
        best = labels.finest(proba)
        predictions = pd.concat([pd.DataFrame({"cell_id": cell_ids, "predicted": np.asarray(labels.names)[best],
                                               "confidence": proba[np.arange(len(best)), best]}),
                                 self.unknown(proba, distance, empty, best)], axis=1)
        if labels.reachability is not None:
            predictions.insert(2, "predicted_id", np.asarray(labels.classes)[best])
        hierarchical = labels.calls(proba)
        if hierarchical is not None:
            predictions["hierarchical"] = hierarchical["name"].to_numpy()
            predictions["hierarchical_id"] = hierarchical["id"].to_numpy()
            predictions["hierarchical_depth"] = hierarchical["depth"].to_numpy()
        return predictions


def _compact(predictions: pd.DataFrame, labels: LabelSpace) -> pd.DataFrame:
    """A chunk's predictions without cell ids, label columns as categoricals over the label space (concatenates as such)."""
    categories = {"predicted": labels.names, "hierarchical": labels.call_names or labels.names, "predicted_id": labels.classes,
                  "hierarchical_id": labels.call_terms or labels.classes}
    compact = predictions.drop(columns=["cell_id"])
    return compact.astype({c: pd.CategoricalDtype(list(v)) for c, v in categories.items() if c in compact})


def predict_query(model: ReferenceModel, adata: ad.AnnData, read: tuple[str | None, bool], config: TransferConfig,
                  sink: Callable[[pd.DataFrame, pd.DataFrame], None] | None = None, name: str | None = None,
                  log: Log = print) -> tuple[pd.DataFrame, GeneAlignment]:
    """Map a validated query through the frozen reference model: ``chunk_size`` cells at a time read from the file of a
    backed AnnData (host memory flat in its size), in one piece otherwise. ``read``: the query's layer and whether it
    holds counts to log-normalise (:func:`check_queries`).

    Each chunk's predictions and probabilities go to ``sink`` (e.g. appended to files); returned
    are the compact predictions of every cell (:func:`_compact`) and the gene alignment
    (``config``'s ``min_overlap`` and ``query_gene_key``). ``log`` gets the gene overlap, how
    many cells are unknown and why (:func:`~scatlas.tl._annotation.unknown_said`), for the
    query ``name`` (default: its file's name).
    """
    annotator = model.annotator
    layer, counts = read
    alignment = query_alignment(adata, layer, annotator.genes, config)
    offset, kept = annotator.missing_offset(alignment), []
    for part in cell_chunks(adata, config.query_chunk_size):  # each cell's result does not depend on the chunking
        predictions, probabilities = model.predict(annotator.model_input(part, layer, alignment, counts), part.obs_names.astype(str).to_numpy(), offset)
        if sink is not None:
            sink(predictions, probabilities)
        kept.append(_compact(predictions, annotator.labels))
    compact, name = pd.concat(kept, ignore_index=True), name or source_name(adata)
    log(alignment.said(f"{name} ({adata.n_obs} cells)", annotator.missing_said))
    log(unknown_said(name, compact))
    return compact, alignment


DISTANCE_ROWS = 1024
"""Cells per step of :func:`nearest_centroid_distance`: its float64 temporaries stay in cache (at 10,000 cells × 1,000 genes,
one step over all cells took 3–9× longer, most of it writing fresh memory)."""


def nearest_centroid_distance(embedding: np.ndarray, centroids: np.ndarray, own: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Euclidean distance of each cell to its nearest class centroid, in float64.

    ``own``: each cell's class (its centroid's row) and that class's number of cells ``n``, when
    the cells are those the centroids were computed from. Each cell's own class centroid is then
    taken without the cell (leave-one-out), which multiplies its distance to it by ``n / (n - 1)``
    exactly; a class of one cell has no centroid left.

    The cells go in near-equal steps of at most :data:`DISTANCE_ROWS` (none under half of it when
    there are more). A cell's distance does not depend on the other cells of its step, except
    for the last bits of BLAS's products, which may depend on a step's size; on the development
    machine, steps this size gave the bits of one step over all cells.
    """
    squared, cross = (centroids**2).sum(1)[None, :], np.ascontiguousarray(np.asarray(centroids, dtype=np.float64).T)
    n = len(embedding)
    edges = np.linspace(0, n, -(-n // DISTANCE_ROWS) + 1).astype(int)
    out = np.empty(n)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        e = np.asarray(embedding[a:b], dtype=np.float64)
        distance = np.sqrt(np.maximum((e**2).sum(1)[:, None] + squared - 2 * e @ cross, 0))
        if own is not None:
            at, size = (np.arange(b - a), own[0][a:b]), own[1][a:b]
            distance[at] = np.where(size > 1, distance[at] * size / np.maximum(size - 1, 1), np.inf)
        out[a:b] = distance.min(1)
    return out


def _evaluate(y_true: np.ndarray, predictions: pd.DataFrame, labels: LabelSpace, out: Path, title: str, figures: bool = False,
              labelled: np.ndarray | None = None, log: Log = print) -> dict[str, float]:
    """Metrics on cells whose label the reference knows; unseen labels reported (one line to ``log``), never mapped. The confusion
    matrix (every labelled cell) is a table, and with ``figures`` also a figure. ``labelled``: which cells have a
    label (the others are left out and counted as ``n_cells_unlabelled``; ``unknown_fraction`` is over every cell)."""
    labelled = np.ones(len(y_true), dtype=bool) if labelled is None else labelled
    unknown_fraction = float(predictions["unknown"].mean())
    y_true, predictions = y_true[labelled], predictions[labelled]
    known = np.isin(y_true, labels.names)
    unseen = pd.Series(y_true[~known]).value_counts()
    if len(unseen):
        write_csv(unseen.rename_axis("label").reset_index(name="n_cells"), out / "unseen_labels.csv")
        hint = (f"; none is one of the model's classes (e.g. {str(labels.names[0])!r}): compare names with names and ids with ids"
                if not known.any() else "")
        log(f"{title}: {int((~known).sum())} of {len(y_true)} labelled cells have labels the reference lacks (e.g. {unseen.index[0]!r}): "
            f"not scored, listed in unseen_labels.csv{hint}")
    pred = predictions["predicted"].to_numpy().astype(str)
    metrics = overall_metrics(y_true[known], pred[known])
    metrics["unknown_fraction"] = unknown_fraction
    if "hierarchical" in predictions and labels.reachability is not None:  # a call is right when it is the truth or an ancestor of it
        right = labels.calls_right(predictions["hierarchical_id"].to_numpy()[known], pd.Index(labels.names).get_indexer(y_true[known]))
        metrics["hierarchical_call_accuracy"] = float(right.mean()) if known.any() else float("nan")
        metrics["hierarchical_call_depth"] = float(predictions["hierarchical_depth"].to_numpy()[known].mean()) if known.any() else float("nan")
    metrics["n_cells_unseen_label"] = float((~known).sum())
    metrics["n_cells_unlabelled"] = float((~labelled).sum())
    write_csv(pd.DataFrame([metrics]), out / "metrics.csv")
    write_csv(per_class_metrics(y_true[known], pred[known]), out / "per_class_metrics.csv")
    write_csv(confusion_counts(y_true, pred).reset_index(), out / "confusion_matrix.csv")
    if figures:
        from scatlas.plot.figures import confusion_heatmap  # matplotlib loads only when a figure is drawn

        confusion_heatmap(y_true, pred, out / "confusion_matrix.png", f"{title}: true (rows) vs predicted, row-normalised")
    return metrics


def _query_stems(queries: list[Path]) -> list[str]:
    stems = [q.stem for q in queries]
    duplicated = sorted({s for s in stems if stems.count(s) > 1} | ({"reference"} & set(stems)))
    if duplicated:
        raise ConfigError(f"transfer: query file names must have distinct stems other than 'reference' (output folders); repeated: {duplicated}")
    return stems


REFERENCE_TRAINING = {"reference", "ontology_key", "dataset_key", "model", "n_top_genes", "training", "calibration_fraction", "val_fraction", "seed"}
"""The :class:`TransferConfig` fields that decide the reference network's weights (the queries and thresholds do not)."""


def fit_reference(config: TransferConfig, data: CellData, log: Log = print,
                  sink: Callable[[pd.DataFrame, pd.DataFrame], None] | None = None, checkpoint_dir: Path | None = None,
                  resume: bool = False, chosen: Callable[[np.ndarray], None] | None = None,
                  ) -> tuple[ReferenceModel, pd.DataFrame, np.ndarray, np.ndarray, pd.DataFrame]:
    """Fit the reference classifier, its temperature and its unknown thresholds on ``data`` alone.

    ``chosen`` hears the model's genes before anything is fitted (:func:`query_genes_check`).

    A network writes its training checkpoint to ``checkpoint_dir`` and, with ``resume``, continues
    from it, after checking that the settings that decide its weights are those it was written with
    (:func:`~scatlas._io.check_checkpoint_settings`).

    ``data`` may be streamed (:attr:`~scatlas.data.DatasetConfig.stream`): then no step holds more
    than ``config.query_chunk_size`` cells' inputs, latents or probabilities at once. Every
    reference cell is then predicted, that many cells at a time; each chunk's predictions (with
    the cell's role: train / val / calibration) and probabilities go to ``sink``.

    Returns
    -------
    The frozen reference model; the compact predictions of every reference cell (as
    :func:`predict_query` returns them, with ``reference_split``); the compact predictions of the
    held-out calibration cells, their calls and confidences by a model that did not train on them
    (a full-batch model is refitted on every cell, the held-out ones too, so its own calls on them
    are not held out) and their distance flags by centroids without them
    (:func:`left_out_distances` for a full-batch model, whose centroids all cells set; else the
    training cells'), and their true labels (names); the calibration table.
    """
    ontology = CellOntology() if config.ontology_key else None
    key = config.ontology_key or config.reference.label_key
    truth = string_values(data.obs[key])
    names = string_values(data.obs[config.reference.label_key]) if config.reference.label_key else None
    sources = string_values(data.obs[config.dataset_key]) if config.dataset_key else None
    labels = label_space(truth, names, ontology, where=f"{config.reference.path}: obs column {key!r}: ", sources=sources, log=log)
    codes = labels.codes(truth)
    rows = np.arange(data.n_cells)
    fit_rows, calib = holdout(rows, config.calibration_fraction, config.seed, codes, min_count=5)
    train, val = holdout(fit_rows, config.val_fraction / (1 - config.calibration_fraction), config.seed, codes[fit_rows], min_count=5)
    train, val, calib = np.sort(train), np.sort(val), np.sort(calib)
    log(f"reference: {data.n_cells} cells, {len(labels.classes)} classes; {len(train)} train, {len(val)} val, {len(calib)} calibration cells")
    if checkpoint_dir is not None:
        check_checkpoint_settings(checkpoint_dir, config.model_dump(mode="json", include=REFERENCE_TRAINING), data.cell_ids, data.var_names, resume)
    model, sdata, genes = fit_classifier(config.model, config.training, config.seed, config.n_top_genes, data, labels, codes, train, val, sources=sources,
                                         log=log, checkpoint_dir=checkpoint_dir, resume=resume, chosen=chosen)
    logits = model.predict_logits(sdata, calib)
    calib_sources = sdata.sources_of(calib)
    target = labels.satisfying(codes[calib], calib_sources)  # a coarse label is satisfied by its finer classes
    fitted = fit_temperature(logits, target)
    before = expected_calibration_error(softmax(logits), target)
    scaled = expected_calibration_error(softmax(logits, fitted), target)
    # the NLL-optimal temperature is kept only if it also lowers the held-out ECE
    temperature, after = (fitted, scaled) if scaled <= before else (1.0, before)
    labels = labels.with_call_threshold(softmax(logits, temperature), codes[calib], config.call_precision, calib_sources)
    calibration = pd.DataFrame([{"cells": len(calib), "temperature_fitted": fitted, "ece_with_fitted": scaled, "temperature": temperature, "ece_before": before, "ece_after": after}])
    log(f"calibration on {len(calib)} held-out reference cells: temperature {temperature:.3f} (fitted {fitted:.3f}), ECE {before:.4f} -> {after:.4f}")
    unseen = None  # the held-out cells' probabilities by the fit that did not see them, when they join the final fit
    if model.full_batch:
        unseen = softmax(logits, temperature)
        model, sdata, genes = refit_full_batch(config.model, config.training, config.seed, data, labels, codes, rows, sources, (model, genes))
        kept = "temperature and hierarchical-call threshold" if labels.call_threshold is not None else "temperature"
        log(f"refitted on all {data.n_cells} cells (a full-batch fit), keeping the {kept} set on the held-out cells; "
            "the distance cut-off comes from every cell, each left out of its class's centroid")
        # its latent is its input, fitted to no cell: each reference cell's distance to the centroids without it is a held-out one
        centroids, distances = left_out_distances(model, sdata, rows, codes)
        calib_distances = distances[calib]
    else:  # a network's latent was fitted to its training cells: only the held-out cells' distances are held out
        centroids = class_centroids(model, sdata, train, codes[train])
        distances = calib_distances = centroid_distances(model, sdata, calib, centroids)
    threshold = conformal_cutoff(distances, config.distance_quantile)
    calibration = calibration.assign(distance_cells=len(distances), distance_threshold=threshold)
    annotator = Annotator(model, genes, labels, data.input, {"label_key": key, "dataset": str(config.reference.path), "layer": config.reference.layer},
                          reference_means(model, sdata))
    reference = ReferenceModel(annotator, temperature, centroids, threshold, config.confidence_threshold)
    role = np.full(data.n_cells, "train", dtype=object)
    role[val], role[calib] = "val", "calibration"
    source, kept = as_source(sdata.X), []
    for lo in range(0, data.n_cells, config.query_chunk_size):
        hi = min(lo + config.query_chunk_size, data.n_cells)
        predictions, probabilities = reference.predict(source.read(lo, hi), data.cell_ids[lo:hi])
        predictions.insert(1, "reference_split", pd.Categorical(role[lo:hi], categories=["train", "val", "calibration"]))
        if sink is not None:
            sink(predictions, probabilities)
        kept.append(_compact(predictions, labels))
    everyone = pd.concat(kept, ignore_index=True)
    held_out = everyone.iloc[calib].reset_index(drop=True)
    if unseen is not None:  # their calls and confidences from the first fit, their distances to centroids without them
        held_out = _compact(reference.calls(unseen, calib_distances, held_out["unknown_no_counts"].to_numpy(), data.cell_ids[calib]),
                            labels)
    return reference, everyone, held_out, np.asarray(labels.names)[codes[calib]], calibration


LATENT_VALUES = 2**24
"""Latent values held at once when embedding for centroids and distances (a linear model's latent is its genes:
100,000 cells of a 20,000-gene reference at once would be 8 GB, and twice that in float64)."""


def latent_blocks(n: int, width: int) -> Iterator[slice]:
    """Consecutive slices of ``n`` cells whose latents (``width`` values each) hold about :data:`LATENT_VALUES` values: whole
    multiples of 1,024 cells, the inference minibatch, so the minibatches are those of one pass over all cells."""
    step = max(1024, LATENT_VALUES // max(width, 1) // 1024 * 1024)
    return (slice(a, min(a + step, n)) for a in range(0, n, step))


def class_centroids(model: CellTypeClassifier, sdata: SplitData, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mean latent of the cells ``rows`` of each class among ``codes`` (classes in code order), embedded in :func:`latent_blocks`."""
    present, where = np.unique(codes, return_inverse=True)
    sums: np.ndarray | None = None
    for block in latent_blocks(len(rows), sdata.X.shape[1]):
        latent = model.embed(sdata, rows[block]).astype(np.float64)
        members = sp.csr_matrix((np.ones(len(latent)), (where[block], np.arange(len(latent)))), shape=(len(present), len(latent)))
        sums = members @ latent + (0 if sums is None else sums)
    assert sums is not None
    return (sums / np.bincount(where)[:, None]).astype(np.float32)


def centroid_distances(model: CellTypeClassifier, sdata: SplitData, rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each cell of ``rows``'s latent distance to its nearest class centroid, embedded in :func:`latent_blocks`."""
    parts = [nearest_centroid_distance(model.embed(sdata, rows[block]), centroids) for block in latent_blocks(len(rows), centroids.shape[1])]
    return np.concatenate(parts) if parts else np.zeros(0)


def left_out_distances(model: CellTypeClassifier, sdata: SplitData, rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The class centroids of the cells ``rows`` (:func:`class_centroids`), and each of those cells' distance to its nearest
    centroid with its own class's centroid taken without it (:func:`nearest_centroid_distance`'s ``own``): what a held-out
    cell's distance would be, for every cell, where the latent was not fitted to them (a linear model's latent is its input)."""
    centroids = class_centroids(model, sdata, rows, codes)
    _, cls = np.unique(codes, return_inverse=True)
    own = (cls, np.bincount(cls)[cls])
    parts = [nearest_centroid_distance(model.embed(sdata, rows[block]), centroids, (own[0][block], own[1][block]))
             for block in latent_blocks(len(rows), centroids.shape[1])]
    return centroids, np.concatenate(parts)


def check_queries(queries: Sequence[ad.AnnData], config: TransferConfig, data: CellData, log: Log = print) -> list[tuple[str | None, bool]]:
    """Refuse, before the reference trains, a query with bad values or repeated names, or sharing too few of the reference's genes.

    Returns
    -------
    How to read each query: its layer (``query_layer`` if set, else the reference's layer where
    the query has it, else ``.X``: :func:`~scatlas.data.io.trained_layer`) and whether it holds
    counts to log-normalise (:func:`~scatlas.data.align.checked_query`: a reference of counts
    reads a query of log1p counts per 10,000 as it is). A query read from the reference's layer,
    or read as it is, gets a line in ``log``.
    """
    reads = []
    said: list[str] = []
    classes = set(string_values(data.obs[config.reference.label_key])) if config.query_label_key and config.reference.label_key else set()
    for q in queries:
        layer, counts, _, lines = checked_query(q, config.query_layer, config.reference.layer, data.input, data.var_names,
                                                config.min_overlap, config.query_gene_key, "the reference",
                                                "choose them with `query_layer` / `--query-layer`")
        said += lines
        reads.append((layer, counts))
        truth = set(q.obs[config.query_label_key].dropna().astype(str)) if classes else set()
        if truth and not truth & classes:  # an evaluation that could score no cell, found before the reference trains
            raise InputError(f"{source_name(q)}: obs column {config.query_label_key!r} shares no label with the reference's "
                             f"{config.reference.label_key!r} (query e.g. {sorted(truth)[:3]}, reference e.g. {sorted(classes)[:3]}); "
                             "compare names with names and ids with ids")
    for line in said:  # once every query passed
        log(line)
    return reads


def query_genes_check(queries: Sequence[ad.AnnData], reads: Sequence[tuple[str | None, bool]], config: TransferConfig) -> Callable[[np.ndarray], None]:
    """A check of every query's genes against the model's genes (``reads``: :func:`check_queries`' layers), for
    :func:`fit_reference`'s ``chosen``: with ``n_top_genes`` the model keeps some of the reference's genes, and a query
    sharing enough of the reference's but too few of those is refused before the reference trains, not after."""
    def check(genes: np.ndarray) -> None:
        for q, (layer, _) in zip(queries, reads, strict=True):
            alignment = query_alignment(q, layer, genes, config, min_overlap=0.0)
            if alignment.fraction < config.min_overlap:
                raise InputError(f"{source_name(q)}: only {alignment.n_shared} of the {len(genes)} genes the model keeps "
                                 f"(the reference's top {config.n_top_genes} highly variable genes, n_top_genes) are in the query "
                                 f"({alignment.fraction:.1%}), below the minimum {config.min_overlap:.0%}, though it holds enough of the "
                                 f"reference's genes; missing e.g. {alignment.missing[:5]}: raise n_top_genes or leave it out (every gene)")
    return check


def query_alignment(adata: ad.AnnData, layer: str | None, genes: np.ndarray, config: TransferConfig,
                    min_overlap: float | None = None) -> GeneAlignment:
    """The query's genes (read from ``layer``) matched to ``genes`` by ``config``'s ``query_gene_key`` (and ``min_overlap``,
    default ``config``'s: :func:`~scatlas.data.align.align_genes` refuses fewer shared)."""
    return align_genes(get_var(adata, layer), genes, config.min_overlap if min_overlap is None else min_overlap, source_name(adata),
                       config.query_gene_key, var_name(adata, layer))


def checked_reference(load: Callable[[Log], CellData], queries: Sequence[ad.AnnData], config: TransferConfig, log: Log,
                      said: Sequence[str] = ()) -> tuple[CellData, list[tuple[str | None, bool]]]:
    """The reference loaded (``load``) and the queries checked (:func:`check_queries`) before a notice of either is
    logged: a bad query gets its one line alone. ``said``: lines to log first (how ``input="auto"`` decided).

    Returns
    -------
    The reference's cells and how to read each query (:func:`check_queries`).
    """
    pending = list(said)
    data = load(pending.append)
    reads = check_queries(queries, config, data, pending.append)
    for line in pending:
        log(line)
    return data, reads


def run_transfer(config: TransferConfig, out: str | Path, overwrite: bool = False, log: Log = print, figures: bool = False,
                 resume: bool = False) -> pd.DataFrame:
    """Learn the reference model, map every query, write predictions, calibration and metrics (``figures``: also
    each confusion matrix as a PNG, which takes matplotlib, about 0.5 s; the report shows the tables either way).

    A network's training checkpoint is kept beside ``out`` until the outputs are written
    (:func:`~scatlas._io.resumable_training`); ``resume`` continues it.

    Returns
    -------
    Summary table: one row per dataset (``reference`` = its held-out calibration cells).
    """
    if config.reference.label_key is None:
        raise ConfigError("transfer: the reference needs --label-key")
    stems = _query_stems(config.queries)
    queries = [read_anndata(q, backed=True) for q in config.queries]  # fail on a missing/corrupt query before training; X stays on disk
    if config.query_label_key:
        for q in queries:
            check_obs_keys(q, [config.query_label_key], missing_ok=True)  # unlabelled cells are mapped, and left out of the evaluation
    inputs = (config.reference.path, *config.queries)
    check_output_dir(out, overwrite, inputs)
    with resumable_training(checkpoints_beside(out), resume, overwrite, log) as checkpoints:
        data, reads = checked_reference(lambda say: load_dataset(config.reference, extra_keys=tuple(k for k in (config.ontology_key, config.dataset_key) if k),
                                                                  log=say), queries, config, log)
        return _write_transfer(config, data, queries, reads, stems, Path(out), inputs, overwrite, log, figures, checkpoints, resume)


def _write_transfer(config: TransferConfig, data: CellData, queries: list[ad.AnnData], reads: list[tuple[str | None, bool]], stems: list[str],
                    out: Path, inputs: tuple[Path, ...], overwrite: bool, log: Log, figures: bool, checkpoints: Path, resume: bool) -> pd.DataFrame:
    """:func:`run_transfer`'s outputs, staged: the reference model, then every query, the summary and the report."""
    with staged_dir(out, overwrite, inputs) as stage:
        ref_dir = stage / "reference"
        with ChunkedTable(ref_dir / "predictions.csv") as csv, ChunkedTable(ref_dir / "probabilities.parquet") as parquet:
            reference, _, held_out, held_out_truth, calibration = fit_reference(config, data, log, lambda p, q: (csv.write(p), parquet.write(q)),
                                                                                checkpoints, resume, query_genes_check(queries, reads, config))
        write_csv(calibration, stage / "calibration.csv")
        metrics = _evaluate(held_out_truth, held_out, reference.annotator.labels, ref_dir, "reference, held-out cells", figures, log=log)
        summary = [{"dataset": "reference (held-out cells)", "n_cells": len(held_out), **metrics}]
        reference.save(ref_dir / "model")
        for stem, adata, read in zip(stems, queries, reads, strict=True):
            qdir = stage / stem
            with ChunkedTable(qdir / "predictions.csv") as csv, ChunkedTable(qdir / "probabilities.parquet") as parquet:
                pred, alignment = predict_query(reference, adata, read, config, lambda p, q: (csv.write(p), parquet.write(q)), stem, log)
            write_csv(pd.DataFrame([alignment.report()]), qdir / "gene_overlap.csv")
            row: dict[str, Any] = {"dataset": stem, "n_cells": adata.n_obs, "unknown_fraction": float(pred["unknown"].mean())}
            if config.query_label_key:
                labelled = with_values(adata.obs[config.query_label_key], stem, config.query_label_key, "no true label", "the evaluation", log)
                row.update(_evaluate(string_values(adata.obs[config.query_label_key]), pred, reference.annotator.labels, qdir, stem, figures,
                                     labelled, log))
            summary.append(row)
        table = pd.DataFrame(summary)
        table["n_cells"] = table["n_cells"].astype(int)
        write_csv(table, stage / "summary.csv")
        write_yaml(config_record(config), stage / "config.yaml")
        sections = [Section("Summary", [table]), Section("Calibration and distance cut-off (held-out reference cells)", [pd.read_csv(stage / "calibration.csv")])]
        for name, folder in [("reference (held-out cells)", stage / "reference"), *((s, stage / s) for s in stems)]:
            if (folder / "confusion_matrix.csv").exists():
                sections.append(Section(f"{name}: true (rows) vs predicted", heatmaps=[pd.read_csv(folder / "confusion_matrix.csv", index_col=0)],
                                        figures=[folder / "confusion_matrix.png"]))
        write_report(stage / "report.html", "Label transfer", sections, f"reference {config.reference.path}")
    return table


def transfer(
    reference: ad.AnnData,
    query: ad.AnnData | Sequence[ad.AnnData] | Mapping[str, ad.AnnData] | None = None,
    *,
    label_key: str,
    ontology_key: str | None = None,
    layer: str | None = None,
    query_layer: str | None = None,
    query_gene_key: str | None = None,
    input: Literal["auto", "counts", "lognorm"] = "auto",
    method: str | None = None,
    loss: Literal["ce", "hce"] = "ce",
    ensemble: int = 1,
    dataset_key: str | None = None,
    seed: int = 0,
    log: Log = print,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    **settings: Any,
) -> ReferenceModel:
    """Learn labels on ``reference`` and transfer them to each query; calls go into every AnnData.

    The reference model, its calibration and its unknown thresholds are fitted on reference cells
    only, so the reference's own predictions never depend on the query.

    Parameters
    ----------
    reference
        Labelled cells. A backed one is streamed from its file (never loaded), as with ``--stream``.
    query
        One or more AnnData to annotate (genes aligned by name; missing ones set to their
        reference means for the linear model, to 0 for networks): one, a list (called
        ``query 1``, ``query 2``, ... in lines and errors), a dict whose keys name them, or ``None``
        (the reference model alone, for :func:`~scatlas.tl.annotate` later). A backed
        one (``anndata.read_h5ad(path, backed="r")``) is mapped ``query_chunk_size`` cells at a
        time from its file, never loaded whole.
    label_key
        Reference cell-type column; with ``ontology_key``, the readable names of the CL ids.
    ontology_key
        Reference column of Cell Ontology ids (classes become CL ids; enables ``loss="hce"`` in ``model``).
    layer, query_layer
        Layers holding the reference's / queries' matrices (``"raw"``: ``.raw``, see
        :func:`~scatlas.data.get_matrix`). Default: ``.X`` for the reference; for a query, the
        reference's layer when the query has it, else ``.X``.
    query_gene_key
        Column of each query's ``.var`` holding the gene names the reference uses (e.g. Ensembl
        ids beside symbols, as scanpy's ``gene_symbols``); default: the queries' ``var_names``.
    input
        ``counts``, ``lognorm`` or ``auto`` (counts when the reference holds whole numbers).
    method
        Classifier: ``linear``, ``mlp`` or ``tabnet`` (see :data:`METHODS`); default ``linear``
        for a reference in memory, ``mlp`` for a backed one.
    loss
        ``ce`` or ``hce`` (hierarchical cross-entropy over the Cell Ontology; needs ``ontology_key``).
    ensemble
        Networks averaged (each with its own seed and early-stopping cells): steadier from seed to
        seed, about ``ensemble`` times the training time (``benchmarks/RESULTS.md``).
    dataset_key
        Reference column naming each cell's source study; a label's HCE meaning is set per source.
    seed
        Seeds the held-out cells and the training.
    log
        Receives one line per step.
    checkpoint_dir, resume
        Where a network writes its training checkpoint, and whether to continue from it, as in
        :func:`~scatlas.tl.embed` (the full-batch linear model keeps none).
    **settings
        Other fields of :class:`TransferConfig` (``confidence_threshold``, ``n_top_genes``, ...);
        training settings as keywords, as :func:`~scatlas.tl.embed` takes them (``max_epochs=20``,
        ``batch_size=128``; or together as ``training={...}``; a full-batch linear model says which
        do not apply); ``model`` (a whole classifier entry, as in ``scatlas models``) replaces
        ``method`` / ``loss`` / ``ensemble`` and cannot be combined with them.

    Returns
    -------
    The frozen :class:`ReferenceModel`. Each AnnData gains ``obs['<key>_pred']``, ``_pred_label``,
    ``_pred_score`` (calibrated confidence), ``_unknown``, ``_unknown_reason``, ``_latent_distance``
    (:func:`~scatlas.tl._annotation.write_calls`), ``obsm['<key>_proba']`` and
    ``uns['<key>_classes']``, with ``key = ontology_key or label_key``; the reference also gets
    ``obs['<key>_reference_split']`` (train / val / calibration: the cells that set the temperature,
    the call threshold and a network's distance cut-off; the full-batch linear model is then refitted on every cell, so its calls on them
    are not held-out predictions: ``scatlas transfer``'s summary scores them by the first fit). Reference cells the fit leaves
    out (all-zero cells, and cells without a label: each with a notice) get no call and count as
    unknown; to call the unlabelled ones, pass the reference among the queries too.
    ``model.save(dir)`` keeps the reference model; ``sa.tl.annotate(new, dir)`` maps new cells
    through it later with the same calls, confidences and unknown flags.

    Examples
    --------
    >>> ref = ad.read_h5ad("../shared/data/zheng17_sorted_pbmc_reference.h5ad")   # doctest: +SKIP
    >>> query = ad.read_h5ad("../shared/data/zheng17_frozen_pbmc_donorA_query.h5ad")  # doctest: +SKIP
    >>> sa.tl.transfer(ref, query, label_key="cell_type", ontology_key="cell_type_ontology_term_id")  # doctest: +SKIP
    """
    if method is not None and method not in METHODS:
        raise ConfigError(f"transfer: unknown method {method!r}; available: {sorted(METHODS)}")
    checkpoints = checkpoint_path(checkpoint_dir, resume)
    if "model" in settings and (method, loss, ensemble) != (None, "ce", 1):
        raise ConfigError("transfer: pass either `model` (a whole classifier entry, e.g. {'type': 'mlp', 'loss': 'hce', 'ensemble': 3}) "
                          "or `method` / `loss` / `ensemble`, not both")
    roles = query_roles(query)
    queries = [q for q, _ in roles]
    check_keywords(settings, [*(k for k in TransferConfig.model_fields if k not in ("reference", "queries")), *TrainingConfig.model_fields], "transfer: ")
    training = {k: settings.pop(k) for k in list(settings) if k in TrainingConfig.model_fields and k not in TransferConfig.model_fields}
    if training:
        settings["training"] = {**settings.get("training", {}), **training}
    with named([*roles, (reference, "reference")]):  # the reference's name wins when it is also a query
        counts, decided = resolve_input(reference, layer, input)
        values = {"reference": {"name": "reference", "path": source_name(reference), "label_key": label_key, "layer": layer,
                                "input": "counts" if counts else "lognorm"},
                  "ontology_key": ontology_key, "dataset_key": dataset_key, "query_layer": query_layer,
                  "query_gene_key": query_gene_key, "model": {**METHODS[method or default_method(on_disk(reference))], "loss": loss, "ensemble": ensemble},
                  "seed": seed, **settings}
        config = load_transfer_config(values)
        data, reads = checked_reference(lambda say: cell_data(reference, "reference", label_key=label_key, layer=layer, counts=counts,
                                                               extra_keys=(ontology_key, config.dataset_key), stream=on_disk(reference),
                                                               unlabelled="leave_out", log=say), queries, config, log, [decided] if decided else [])
        parts: list[np.ndarray] = []
        model, predictions, _, _, _ = fit_reference(config, data, log, lambda _, proba: parts.append(proba.drop(columns=["cell_id"]).to_numpy()),
                                                    checkpoints, resume, query_genes_check(queries, reads, config))
        key = ontology_key or label_key
        labels = model.annotator.labels
        fitted = pd.Index(reference.obs_names.astype(str)).get_indexer(data.obs.index)  # all-zero and unlabelled cells were left out (logged)
        write_calls(reference, key, labels, np.concatenate(parts), log, predictions, fitted)
        split = np.full(reference.n_obs, None, dtype=object)
        split[fitted] = predictions["reference_split"].to_numpy()
        reference.obs[f"{key}_reference_split"] = pd.Categorical(split)
        for q, read in zip(queries, reads, strict=True):
            parts = []
            pred, _ = predict_query(model, q, read, config, lambda _, proba: parts.append(proba.drop(columns=["cell_id"]).to_numpy()), log=log)
            write_calls(q, key, labels, np.concatenate(parts), log, pred)
    return model


def query_roles(query: Any) -> list[tuple[ad.AnnData, str]]:
    """Each query of :func:`transfer` with the name its lines and errors use: ``query`` for one, ``query 1``, ``query 2``... for a
    list, the keys of a dict; none for ``None``."""
    if query is None:
        return []
    if isinstance(query, ad.AnnData):
        query = [query]
    if isinstance(query, Mapping):
        pairs = [(q, str(name)) for name, q in query.items()]
    elif isinstance(query, Sequence) and not isinstance(query, str):
        pairs = [(q, "query" if len(query) == 1 else f"query {i}") for i, q in enumerate(query, 1)]
    else:
        pairs = None
    if pairs is None or not all(isinstance(q, ad.AnnData) for q, _ in pairs):
        raise ConfigError(f"query: an AnnData, a list of them, a dict of them by name, or None; not {type(query).__name__}"
                          + (" (read files with anndata.read_h5ad(path, backed='r'))" if isinstance(query, (str, Path)) or pairs else ""))
    return pairs


def load_transfer_config(values: dict[str, Any]) -> TransferConfig:
    """Validate CLI/API settings into a :class:`TransferConfig` with readable errors."""
    return parse_settings(TransferConfig, values)


__all__ = ["METHODS", "ReferenceModel", "TransferConfig", "fit_reference", "load_transfer_config", "run_transfer", "transfer"]

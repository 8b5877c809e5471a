"""Cell-type annotation: train (cross-validated, then a final model), predict new data, evaluate.

``train_annotator`` evaluates a classifier (linear / MLP / TabNet, CE or hierarchical CE over
the Cell Ontology) on every split's test cells the way scTab does — exact and
hierarchy-aware metrics overall, per class and per stratum (assay, dataset, disease, tissue,
tissue_general, batch) — and saves a final model trained on all labelled cells.
``predict_annotations`` maps a query onto that model (genes aligned by name, missing genes
zero-filled) without changing any parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from sklearn.model_selection import train_test_split

from scatlas import __version__
from scatlas._errors import ConfigError, InputError
from scatlas._io import atomic_path, staged_dir, write_csv, write_npy, write_parquet, write_yaml
from scatlas.data.align import GeneAlignment, align_genes
from scatlas.data.dataset import CellData, DatasetConfig, load_dataset
from scatlas.data.io import get_matrix, read_h5ad, source_name, to_csr
from scatlas.data.preprocess import normalize_log1p, preprocess_split
from scatlas.data.splits import Split
from scatlas.data.validate import check_matrix
from scatlas.settings import SplitConfig, TrainingConfig, parse_settings
from scatlas.data.splits import make_splits
from scatlas.metrics.annotation import annotation_tables, hierarchical_correct
from scatlas.metrics.stats import fold_summary
from scatlas.models.base import SplitData, build_model, parse_model_config
from scatlas.models.classifiers import CellTypeClassifier
from scatlas.ontology import CellOntology, map_author_labels, reachability
from scatlas.plot.figures import confusion_heatmap, per_class_bars
from scatlas.report.html import Section, write_report

STRATA = ("assay", "dataset_id", "dataset", "disease", "tissue", "tissue_general")
Log = Callable[[str], None]


class AnnotateConfig(BaseModel):
    """Settings of ``scatlas annotate train``.

    Attributes
    ----------
    dataset
        The labelled data (``label_key`` = the readable cell-type column).
    ontology_key
        Column of Cell Ontology ids; when given, classes are CL ids and HCE is available.
    ontology_obo
        Cell Ontology ``.obo`` file for an is_a-only hierarchy (default: the shipped
        ontology's is_a + part_of ancestors).
    label_map
        CSV of two columns (author label, CL id) mapping ``label_key`` values to Cell
        Ontology ids, for data without an ontology column.
    model
        Classifier entry, e.g. ``{type: mlp, loss: hce}``.
    n_top_genes
        HVGs chosen on each training split (``None``: every gene, as scTab).
    split, training
        Cross-validation scheme and trainer settings.
    strata
        Columns to stratify the evaluation by (default: those of :data:`STRATA` present, and the batch).
    final_model
        Also train the model saved for ``predict`` on all labelled cells (10% for early stopping).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig
    ontology_key: str | None = None
    ontology_obo: Path | None = None
    label_map: Path | None = None
    model: dict[str, Any] = Field(default_factory=lambda: {"type": "mlp", "loss": "ce"})
    n_top_genes: int | None = None
    split: SplitConfig = Field(default_factory=SplitConfig)
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig(max_epochs=100, batch_size=64, patience=10))
    strata: list[str] | None = None
    final_model: bool = True
    seed: int = 0


@dataclass
class LabelSpace:
    """Class order, readable names and the ontology hierarchy of an annotation model."""

    classes: list[str]
    names: list[str]
    reachability: np.ndarray | None
    ontology_version: str | None

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Integer code of each label (−1 for labels outside the class set)."""
        return np.asarray(pd.Categorical(np.asarray(values, dtype=str), categories=self.classes).codes, dtype=np.int64)


def label_space(values: np.ndarray, names: np.ndarray | None, ontology: CellOntology | None, where: str = "") -> LabelSpace:
    """Sorted classes of ``values``; with an ontology, validated CL ids and their reachability matrix."""
    classes = sorted(set(np.asarray(values, dtype=str)))
    if ontology is None:
        return LabelSpace(classes, classes, None, None)
    ontology.check_terms(classes, where=where)
    lookup = dict(zip(np.asarray(values, dtype=str), np.asarray(names, dtype=str), strict=True)) if names is not None else {}
    readable = [lookup.get(c) or ontology.label(c) for c in classes]
    return LabelSpace(classes, readable, reachability(classes, ontology), ontology.version)


def _ontology(config: AnnotateConfig) -> CellOntology | None:
    if config.ontology_key is None and config.label_map is None:
        return None
    return CellOntology.from_obo(config.ontology_obo) if config.ontology_obo else CellOntology()


@dataclass
class Annotator:
    """A trained classifier with the gene list, classes and preprocessing needed to predict new data."""

    model: CellTypeClassifier
    genes: np.ndarray
    labels: LabelSpace
    input: str
    meta: dict[str, Any]

    def split_data(self, X: Any, label: np.ndarray | None = None, rows: tuple[np.ndarray, np.ndarray] | None = None) -> SplitData:
        """Wrap a model-ready matrix for the model's loaders."""
        n = X.shape[0]
        train, val = rows if rows is not None else (np.arange(0), np.arange(0))
        return SplitData(
            X=X, train=train, val=val, batch=np.zeros(n, dtype=np.int64), batch_names=["all"],
            label=label, label_names=self.labels.classes, reachability=self.labels.reachability,
        )

    def prepare(self, adata: ad.AnnData, layer: str | None = None, min_overlap: float = 0.5) -> tuple[Any, GeneAlignment]:
        """Validate, align genes (zero-fill missing ones) and log-normalise a query."""
        source = str(adata.uns.get("scatlas_source", "query"))
        check_matrix(adata, layer=layer, require_counts=self.input == "counts")
        alignment = align_genes(adata.var_names.to_numpy(), self.genes, min_overlap, source)
        X = to_csr(get_matrix(adata, layer))
        if self.input == "counts":
            X = normalize_log1p(X)
        return alignment.apply(X), alignment

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities of a model-ready matrix (all rows)."""
        return self.model.predict_proba(self.split_data(X), np.arange(X.shape[0]))

    def save(self, directory: Path) -> None:
        """Write ``model.pt``, ``genes.txt``, ``annotator.yaml`` (and ``reachability.npy``)."""
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.pt") as tmp:
            torch.save(self.model.plan.module.state_dict(), tmp)
        with atomic_path(directory / "genes.txt") as tmp:
            tmp.write_text("\n".join(self.genes) + "\n")
        if self.labels.reachability is not None:
            write_npy(self.labels.reachability, directory / "reachability.npy")
        write_yaml(
            {
                **self.meta,
                "model": self.model.config.model_dump(mode="json"),
                "input": self.input,
                "classes": [str(c) for c in self.labels.classes],
                "class_names": [str(c) for c in self.labels.names],
                "ontology": self.labels.ontology_version,
                "scatlas_version": __version__,
            },
            directory / "annotator.yaml",
        )

    @classmethod
    def load(cls, directory: str | Path) -> Annotator:
        """Rebuild a saved annotator (CPU or GPU, whatever is available)."""
        directory = Path(directory)
        meta_path = directory / "annotator.yaml"
        if not meta_path.exists():
            raise InputError(f"{directory}: not a scatlas annotation model (annotator.yaml missing)")
        meta = yaml.safe_load(meta_path.read_text())
        genes = np.array((directory / "genes.txt").read_text().split())
        R = np.load(directory / "reachability.npy") if (directory / "reachability.npy").exists() else None
        labels = LabelSpace(meta["classes"], meta["class_names"], R, meta.get("ontology"))
        model = build_model(parse_model_config(meta["model"]), TrainingConfig().to_train_config(0, progress=False))
        assert isinstance(model, CellTypeClassifier)
        k = len(labels.classes)
        annotator = cls(model, genes, labels, meta["input"], {k2: v for k2, v in meta.items() if k2 in ("label_key", "ontology_key", "dataset")})
        stub = annotator.split_data(np.zeros((k, len(genes)), dtype=np.float32), np.arange(k), (np.arange(k), np.arange(0)))
        module = model.build_module(stub)
        module.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
        model.plan = model.build_plan(module)
        if torch.cuda.is_available():
            model.plan.to("cuda")
        return annotator


def _strata(config: AnnotateConfig, data: CellData) -> list[str]:
    if config.strata is not None:
        missing = [c for c in config.strata if c not in data.obs.columns]
        if missing:
            raise InputError(f"{config.dataset.path}: strata columns {missing} not in obs; available: {list(data.obs.columns)}")
        return list(config.strata)
    found = [c for c in STRATA if c in data.obs.columns]
    return found + ([config.dataset.batch_key] if config.dataset.batch_key and config.dataset.batch_key not in found else [])


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
) -> tuple[CellTypeClassifier, SplitData, np.ndarray]:
    """Preprocess (HVGs on ``train`` when asked), fit a classifier; return it, its split data and genes."""
    prep = preprocess_split(data.lognorm, data.var_names, train, n_top_genes, "none")
    sdata = SplitData(
        X=prep.X, train=train, val=val, batch=np.asarray(data.batch.codes, dtype=np.int64), batch_names=[str(b) for b in data.batch.categories],
        label=codes, label_names=labels.classes, reachability=labels.reachability,
    )
    model = build_model(parse_model_config(model_entry), training.to_train_config(seed, progress=False))
    assert isinstance(model, CellTypeClassifier)
    history = model.fit(sdata, workdir / "checkpoints" if workdir else None)
    if workdir is not None:
        write_csv(history, workdir / "history.csv")
    return model, sdata, prep.genes


def _detailed(data: CellData, rows: np.ndarray, truth: np.ndarray, proba: np.ndarray, labels: LabelSpace, strata: list[str]) -> pd.DataFrame:
    classes = np.asarray(labels.classes)
    pred = classes[proba.argmax(1)]
    table = pd.DataFrame({"cell_id": data.cell_ids[rows], "y_true": truth, "y_pred": pred, "confidence": proba.max(1)})
    table["correct"] = table["y_true"] == table["y_pred"]
    if labels.reachability is not None:
        table["correct_hierarchical"] = hierarchical_correct(truth, pred, labels.classes, labels.reachability)
    for column in strata:
        table[column] = data.obs[column].astype(str).to_numpy()[rows]
    probs = pd.DataFrame(proba, columns=[f"p_{c}" for c in labels.classes])
    return pd.concat([table, probs], axis=1)


def write_evaluation(table: pd.DataFrame, labels: LabelSpace, strata: list[str], out: Path, title: str = "") -> pd.DataFrame:
    """Write the metric tables and figures of a detailed-results table; return the overall table."""
    tables = annotation_tables(table["y_true"].to_numpy(), table["y_pred"].to_numpy(), labels.classes, labels.reachability, table[strata] if strata else None)
    for name, frame in tables.items():
        write_csv(frame, out / f"{name}_metrics.csv")
    write_parquet(table, out / "detailed_results.parquet")
    names = dict(zip(labels.classes, labels.names, strict=True))
    confusion_heatmap(table["y_true"].map(names).to_numpy(), table["y_pred"].map(names).to_numpy(), out / "confusion_matrix.png", title)
    per_class_bars(tables["per_class"].assign(label=lambda d: d["label"].map(names)), out / "per_class_f1.png", title=title)
    return tables["overall"]


def _final_model(config: AnnotateConfig, data: CellData, labels: LabelSpace, codes: np.ndarray, key: str, out: Path) -> None:
    rows = np.arange(data.n_cells)
    counts = np.bincount(codes, minlength=len(labels.classes))
    stratify = codes if counts[counts > 0].min() >= 2 else None
    train, val = train_test_split(rows, test_size=0.1, random_state=config.seed, stratify=stratify)
    model, _, genes = fit_classifier(config.model, config.training, config.seed, config.n_top_genes, data, labels, codes, np.sort(train), np.sort(val))
    meta = {"label_key": key, "dataset": str(config.dataset.path)}
    Annotator(model, genes, labels, config.dataset.input, meta).save(out / "model")


def train_annotator(config: AnnotateConfig, out: str | Path, overwrite: bool = False, log: Log = print) -> pd.DataFrame:
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
    key = config.ontology_key or (f"{config.dataset.label_key}_cl_id" if config.label_map else config.dataset.label_key)
    data = load_dataset(config.dataset, extra_keys=tuple(k for k in (config.ontology_key, config.split.group_key) if k))
    if config.label_map is not None:
        data.obs[key] = map_author_labels(data.obs[config.dataset.label_key].astype(str), config.label_map, ontology)
    truth = data.obs[key].astype(str).to_numpy()
    names = data.obs[config.dataset.label_key].astype(str).to_numpy() if config.dataset.label_key else None
    labels = label_space(truth, names, ontology, where=f"{config.dataset.path}: obs column {key!r}: ")
    codes = labels.codes(truth)
    strata = _strata(config, data)
    split_data = CellData(data.name, data.lognorm, data.var_names, data.obs, data.batch, pd.Categorical(truth))
    splits: list[Split] = make_splits(config.split, config.split.group_key or config.dataset.batch_key, split_data)
    with staged_dir(out, overwrite) as stage:
        pooled, folds = [], []
        for split in splits:
            log(f"split {split.number}/{len(splits)}: {parse_model_config(config.model).type} ({len(split.train)} train, {len(split.val)} val, {len(split.test)} test cells)")
            fold_dir = stage / f"splits_{split.number}"
            model, sdata, _ = fit_classifier(config.model, config.training, config.seed, config.n_top_genes, data, labels, codes, split.train, split.val, fold_dir)
            proba = model.predict_proba(sdata, split.test)
            table = _detailed(data, split.test, truth[split.test], proba, labels, strata)
            overall = write_evaluation(table, labels, strata, fold_dir, f"split {split.number}")
            folds.append(overall.assign(split=split.number))
            pooled.append(table.assign(split=split.number))
        write_evaluation(pd.concat(pooled, ignore_index=True), labels, strata, stage, "all test cells")
        fold_table = pd.concat(folds, ignore_index=True)
        write_csv(fold_table, stage / "fold_metrics.csv")
        summary = fold_summary(fold_table.drop(columns=["split", "n_cells"]), by=["evaluation"])
        write_csv(summary, stage / "fold_metrics_95CI.csv")
        if config.final_model:
            log("final model on all labelled cells")
            _final_model(config, data, labels, codes, key, stage)
        write_yaml({**config.model_dump(mode="json"), "ontology": labels.ontology_version}, stage / "config.yaml")
        write_report(
            stage / "report.html", f"Annotation: {parse_model_config(config.model).type} + {parse_model_config(config.model).loss}",  # type: ignore[attr-defined]
            [Section("Test cells: mean and 95% CI over folds", [summary]),
             Section("Per class (all test cells)", [pd.read_csv(stage / "per_class_metrics.csv")], [stage / "per_class_f1.png", stage / "confusion_matrix.png"]),
             *[Section(f"By {c}", [pd.read_csv(stage / f"per_{c}_metrics.csv")]) for c in strata]],
            f"{config.dataset.path} · {labels.ontology_version or 'no ontology'}",
        )
    return summary


def write_calls(adata: ad.AnnData, key: str, classes: np.ndarray, names: np.ndarray, proba: np.ndarray, unknown: np.ndarray | None = None) -> None:
    """Write a classifier's calls into ``adata`` under the keys ``annotate`` and ``transfer`` share.

    ``obs['<key>_pred']`` (class id), ``obs['<key>_pred_label']`` (readable name),
    ``obs['<key>_pred_score']`` (max probability), ``obs['<key>_unknown']`` (when given),
    ``obsm['<key>_proba']`` (cells × classes) and ``uns['<key>_classes']``.
    """
    best = proba.argmax(1)
    adata.obs[f"{key}_pred"] = pd.Categorical(np.asarray(classes)[best])
    adata.obs[f"{key}_pred_label"] = pd.Categorical(np.asarray(names)[best])
    adata.obs[f"{key}_pred_score"] = proba.max(1)
    if unknown is not None:
        adata.obs[f"{key}_unknown"] = np.asarray(unknown, dtype=bool)
    adata.obsm[f"{key}_proba"] = proba.astype(np.float32)
    adata.uns[f"{key}_classes"] = [str(c) for c in classes]


def annotate(adata: ad.AnnData, model: Annotator | str | Path, *, layer: str | None = None, min_overlap: float = 0.5, log: Log = print) -> Annotator:
    """Annotate the cells of ``adata`` with a trained classifier; calls and probabilities go into ``adata``.

    Parameters
    ----------
    adata
        Query cells (counts or log-normalised, as the model was trained); genes are aligned by name
        and missing ones set to 0.
    model
        An :class:`Annotator` or the directory ``scatlas annotate train`` wrote (its ``model/``).
    layer
        Layer holding the matrix (default ``.X``).
    min_overlap
        Smallest share of the model's genes the query must have.
    log
        Receives the gene-overlap line.

    Returns
    -------
    The annotator used. ``adata`` gains the keys of :func:`write_calls` (``<label_key>_pred`` ...)
    and ``uns['scatlas_gene_overlap']``.

    Examples
    --------
    >>> sa.tl.annotate(query, "annotator/model")       # doctest: +SKIP
    >>> query.obs["cell_type_pred_label"].value_counts()   # doctest: +SKIP
    """
    annotator = model if isinstance(model, Annotator) else Annotator.load(model)
    X, alignment = annotator.prepare(adata, layer, min_overlap)
    report = alignment.report()
    log(f"genes: {report['shared_genes']} of the model's {report['model_genes']} found in {source_name(adata)} ({report['fraction_of_model_genes']:.1%}); missing ones set to 0")
    proba = annotator.predict_proba(X)
    key = annotator.meta.get("label_key") or "cell_type"
    write_calls(adata, key, np.asarray(annotator.labels.classes), np.asarray(annotator.labels.names), proba)
    adata.uns["scatlas_gene_overlap"] = {k: str(v) for k, v in report.items()}
    adata.uns["scatlas_annotation"] = {"model": str(model) if not isinstance(model, Annotator) else "<in memory>",
                                       "ontology": str(annotator.labels.ontology_version), "version": __version__}
    return annotator


def predict_annotations(model_dir: str | Path, query: str | Path, out: str | Path, layer: str | None = None, min_overlap: float = 0.5, log: Log = print) -> ad.AnnData:
    """Annotate a query file with a saved model (:func:`annotate`); write ``out`` (``.h5ad``) atomically."""
    adata = read_h5ad(query)
    annotate(adata, model_dir, layer=layer, min_overlap=min_overlap, log=log)
    adata.uns.pop("scatlas_source", None)
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return adata


def evaluate_annotations(
    predictions: str | Path, truth_key: str, out: str | Path, pred_key: str | None = None, ontology: Literal["auto", "none"] = "auto"
) -> pd.DataFrame:
    """Evaluate predictions stored in an ``.h5ad`` against a truth column; write tables and figures to ``out``.

    With ``ontology='auto'`` and CL ids on both sides, hierarchy-aware rows are added.
    """
    adata = read_h5ad(predictions)
    if pred_key is None:
        found = [c for c in adata.obs.columns if c.endswith("_pred")]
        if len(found) != 1:
            raise InputError(f"{predictions}: give --pred-key; prediction columns found: {found}")
        pred_key = found[0]
    for key in (truth_key, pred_key):
        if key not in adata.obs:
            raise InputError(f"{predictions}: obs column {key!r} not found; available: {list(adata.obs.columns)}")
    truth = adata.obs[truth_key].astype(str).to_numpy()
    pred = adata.obs[pred_key].astype(str).to_numpy()
    cl = ontology == "auto" and all(v.startswith("CL:") for v in set(truth) | set(pred))
    labels = label_space(np.concatenate([truth, pred]), None, CellOntology() if cl else None)
    table = pd.DataFrame({"cell_id": adata.obs_names.astype(str), "y_true": truth, "y_pred": pred})
    strata = [c for c in STRATA if c in adata.obs.columns]
    for column in strata:
        table[column] = adata.obs[column].astype(str).to_numpy()
    out = Path(out)
    return write_evaluation(table, labels, strata, out, str(Path(predictions).name))


def load_annotate_config(values: dict[str, Any]) -> AnnotateConfig:
    """Validate CLI/API settings into a :class:`AnnotateConfig` with readable errors."""
    return parse_settings(AnnotateConfig, values)

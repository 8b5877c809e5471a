"""``tl.embed``: fit any registered embedding model on all cells of an AnnData; the fitted-model object.

One implementation serves the Python API, ``scatlas embed``, ``scatlas nmf`` and the model
objects reloaded from disk: :func:`fit_all_cells` fits a model on a prepared matrix with a seeded
held-out fraction for early stopping, :class:`ScatlasModel` carries everything needed to embed new
cells (genes, input kind, scaling, batch and label names) and saves / reloads it without pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from pydantic import Field

from scatlas import __version__
from scatlas._describe import described, listed, settings_line
from scatlas._errors import ConfigError, InputError
from scatlas._io import check_checkpoint_settings, checkpoint_path, staged_dir, write_csv
from scatlas.data.align import GeneAlignment, checked_query
from scatlas.data.dataset import cell_data, whole_backed
from scatlas.data.io import get_matrix, get_var, matrix_name, on_disk, record_input, source_name, to_csr, view_to_actual
from scatlas.data.preprocess import GeneScaler, ScaledSource, ScaleKind, highly_variable_genes, normalize_log1p, preprocess_split
from scatlas.data.loaders import STREAM_CHUNK
from scatlas.data import splits
from scatlas.data.sources import AnnDataCSRSource
from scatlas.data.validate import InputKind, resolve_input, validate
from scatlas.models.base import REGISTRY, EmbeddingModel, LatentClassifier, NeuralModel, SplitData, build_model, parse_model_config, shape_stub, steps_per_epoch
from scatlas.settings import Seed, Strict, TrainingConfig, check_keywords, parse_settings

Log = Callable[[str], None]
MODEL_FILE = "scatlas_model.yaml"


def _silent(_: str) -> None:
    """A log that drops its lines."""


def holdout(n: int, fraction: float, seed: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and held-out rows of ``n`` cells, ``fraction`` held out (seeded) for early stopping.

    Rows where the boolean mask ``exclude`` is true (all-zero cells) are in neither.
    """
    rows = np.arange(n) if exclude is None else np.flatnonzero(~exclude)
    if fraction <= 0 or len(rows) < 10:
        return rows, np.arange(0)
    train, val = splits.holdout(rows, fraction, seed)
    return np.sort(train), np.sort(val)


def categorical_codes(values: pd.Series | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer codes and string category names of a column (categories sorted, as pandas does)."""
    column = pd.Series(values).astype("category")
    return column.cat.codes.to_numpy().astype(np.int64), [str(c) for c in column.cat.categories]


def all_cells_split(X: Any, obs: pd.DataFrame, batch_key: str | None, label_key: str | None, genes: np.ndarray, train: np.ndarray,
                    val: np.ndarray) -> SplitData:
    """All cells of ``X`` as one :class:`SplitData`, batch and label codes from ``obs``."""
    batch, batch_names = categorical_codes(obs[batch_key]) if batch_key else (np.zeros(len(obs), dtype=np.int64), ["all"])
    label, label_names = categorical_codes(obs[label_key]) if label_key else (None, None)
    return SplitData(X=X, train=train, val=val, batch=batch, batch_names=batch_names, label=label, label_names=label_names, genes=genes)


def streamed_split(adata: ad.AnnData, batch_key: str | None, label_key: str | None, layer: str | None, counts: bool, n_top_genes: int | None,
                   scale: ScaleKind, val_fraction: float, seed: int, chunk_size: int, log: Log, notices: Sequence[str] = ()) -> tuple[SplitData, Preprocessing]:
    """All cells of a backed AnnData as model input streamed from its file; ``X`` is never loaded.

    The file is validated in chunks (``notices`` are logged once it passed, so bad input gets its
    one line alone); highly variable genes (scanpy's ``seurat`` genes of the training cells, as in
    memory) and the per-gene scaling come from streamed passes over the training cells,
    ``chunk_size`` cells at a time; every later read normalises (counts), subsets and scales one
    chunk. Host memory holds ``obs``, per-gene statistics and a few chunks.
    """
    summary = validate(adata, batch_key=batch_key, label_key=label_key, layer=layer, require_counts=counts, lognorm=not counts)
    assert summary is not None
    for line in notices:
        log(line)
    notice = summary.notice()
    if notice:
        log(notice)
    train, val = holdout(adata.n_obs, val_fraction, seed, exclude=summary.empty_cells)
    path = whole_backed(adata)
    source = AnnDataCSRSource(path, layer=layer, normalize=counts)
    genes = highly_variable_genes(source, train, n_top_genes, chunk_size) if n_top_genes else np.flatnonzero(~summary.empty_genes)
    if len(genes) < source.shape[1]:
        source = AnnDataCSRSource(path, layer=layer, normalize=counts, genes=genes)
    scaler = GeneScaler(scale).fit_streamed(source, train, chunk_size)
    names = get_var(adata, layer).index.to_numpy().astype(str)[genes]
    X = source if scale == "none" else ScaledSource(source, scaler)
    return all_cells_split(X, adata.obs, batch_key, label_key, names, train, val), Preprocessing(names, counts, layer, scaler)


def split_options(model: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate keyword options into the model's entry (``{"type": model, ...}``) and training settings; refuse others (naming the closest)."""
    check_keywords(options, [*(k for k in REGISTRY[model].Config.model_fields if k != "type"), *TrainingConfig.model_fields], f"{model}: ")
    training = {k: v for k, v in options.items() if k in TrainingConfig.model_fields}
    entry = {"type": model, **{k: v for k, v in options.items() if k not in TrainingConfig.model_fields}}
    return entry, training


def fit_all_cells(data: SplitData, entry: dict[str, Any], training: dict[str, Any], seed: int = 0, progress: bool = False,
                  log: Log = _silent, checkpoint_dir: Path | None = None, resume: bool = False) -> tuple[EmbeddingModel, pd.DataFrame]:
    """Build and fit a registered embedding model on ``data`` (``data.val`` only for early stopping).

    When the model sizes its training to the number of cells (``fe`` / ``fec`` on small data), one
    line of ``log`` says what it chose. A network writes ``last.ckpt`` to ``checkpoint_dir`` and,
    with ``resume``, continues from it (:meth:`~scatlas.models.base.NeuralModel.fit`).

    Returns
    -------
    The fitted model and its epoch history (empty for models trained without epochs).
    """
    kind = entry.get("type")
    if kind in REGISTRY and issubclass(REGISTRY[kind], LatentClassifier):
        raise ConfigError(f"model {kind!r} classifies other models' latents; it is only available in `scatlas run`")
    config = parse_model_config(entry)
    if REGISTRY[config.type].needs_labels and data.label is None:
        raise ConfigError(f"model {config.type!r} needs labels: pass label_key")
    settings = parse_settings(TrainingConfig, training, "training: ")
    model = build_model(config, settings.to_train_config(seed, progress))
    assert isinstance(model, EmbeddingModel)
    said = model.size_said(len(data.train), data.n_genes)
    if said:
        log(said)
    unused = settings.epochs_set() if not isinstance(model, NeuralModel) else []
    if unused:
        log(f"{config.type}: {', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply (it is fitted by scikit-learn, not by epochs"
            + ("; max_iter bounds its iterations)" if "max_iter" in type(config).model_fields else ")"))
    if said := settings.chunk_size_unused(config.type, sp.issparse(data.X)):  # a streamed source is not a sparse matrix
        log(said)
    sized = model.unset(model.sized_training(len(data.train)))
    if sized:
        cfg = model.train_config
        log(f"{config.type}: {len(data.train):,} training cells are {steps_per_epoch(len(data.train), cfg.batch_size)} minibatches an epoch, so "
            f"{', '.join(f'{k} {v}' for k, v in sized.items())} (counted in minibatches; set patience / max_epochs to override)")
    history = model.fit(data, checkpoint_dir, resume)
    if said := model.fit_said():
        log(said)
    return model, history if history is not None else pd.DataFrame()


@dataclass
class Preprocessing:
    """How raw cells become a model's input: genes (by name), input kind, layer and per-gene scaling."""

    genes: np.ndarray
    counts: bool
    layer: str | None
    scaler: GeneScaler

    def transform(self, adata: ad.AnnData, min_overlap: float = 0.5, gene_key: str | None = None,
                  log: Log = _silent) -> tuple[sp.csr_matrix, GeneAlignment]:
        """Validate ``adata``, align its genes by name (``var_names`` or ``.var[gene_key]``; missing ones zero), normalise and scale.

        A model of counts reads a query of log1p counts per 10,000 as it is, with a line to ``log``
        (:func:`~scatlas.data.align.checked_query`, the check the annotation models make).

        Raises
        ------
        InputError
            For bad values, or fewer than ``min_overlap`` of the model's genes in ``adata``.
        """
        _, counts, alignment, said = checked_query(adata, self.layer, self.layer, "counts" if self.counts else "lognorm", self.genes, min_overlap,
                                                   gene_key, "the model was trained", f"put them in {matrix_name(adata, self.layer)}, which it reads as it was trained")
        for line in said:
            log(line)
        X = to_csr(get_matrix(adata, self.layer))
        if counts:
            X = normalize_log1p(X)
        return self.scaler.transform(alignment.apply(X)), alignment


@dataclass
class ScatlasModel:
    """A fitted scatlas embedding model with what it needs to embed new cells (scvi-tools style).

    Made by :func:`scatlas.tl.embed` or :func:`scatlas.load_model`.

    Attributes
    ----------
    model
        The fitted :class:`~scatlas.models.base.EmbeddingModel`.
    prep
        Genes, input kind and scaling of the training data.
    batch_key, label_key
        The ``obs`` columns used in training.
    key
        The ``.obsm`` key of the latent.
    history
        One row per epoch (losses on training and held-out cells); empty for PCA / NMF.
    data
        The training cells as the model saw them (``None`` after :func:`~scatlas.load_model`).
    """

    model: EmbeddingModel
    prep: Preprocessing
    batch_key: str | None
    label_key: str | None
    key: str
    batch_names: list[str]
    label_names: list[str] | None
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict[str, Any] = field(default_factory=dict)
    data: SplitData | None = None
    log: Log = field(default=print, repr=False)

    @property
    def name(self) -> str:
        """Registry name of the model (``ae``, ``fe``, ...)."""
        return self.model.config.type

    def __repr__(self) -> str:
        prep = self.prep
        batches = f"{self.batch_key!r} ({len(self.batch_names)} batches: {listed(self.batch_names)})" if self.batch_key else "None"
        labels = f"{self.label_key!r} ({len(self.label_names or [])} labels)" if self.label_key else "None"
        epochs = f"{len(self.history)} epochs" if len(self.history) else "not trained by epochs"
        cells = "none kept (loaded from disk)" if self.data is None else f"{self.data.X.shape[0]:,} kept"
        return described(f"ScatlasModel {self.name} -> obsm[{self.key!r}]", [
            f"settings: {settings_line(self.model.config)}",
            f"genes: {len(prep.genes):,} ({'counts' if prep.counts else 'log-normalised'} input, layer {prep.layer!r}, scaling {prep.scaler.kind})",
            f"batch_key: {batches}; label_key: {labels}",
            f"training: {epochs}, seed {self.model.train_config.seed}; training cells: {cells}",
        ])

    def split_for(self, adata: ad.AnnData | None, min_overlap: float = 0.5, gene_key: str | None = None) -> SplitData:
        """The model's view of ``adata`` (genes aligned by name, see :meth:`Preprocessing.transform`; batch codes of the training batches).

        ``None`` gives the training cells. New cells from a batch the model never saw are refused by
        models that embed with the batch (``re``, ``cond_aenmf``); others ignore the batch.
        """
        if adata is None:
            if self.data is None:
                raise InputError("this model was loaded from disk: pass the AnnData to embed")
            return self.data
        batch = np.zeros(adata.n_obs, dtype=np.int64)
        if self.batch_key is not None and self.batch_key in adata.obs:
            values = adata.obs[self.batch_key].astype(str).to_numpy()
            known = pd.Index(self.batch_names)
            batch = known.get_indexer(values)
            unseen = sorted(set(values[batch < 0]))
            if unseen and type(self.model).uses_batch:
                raise InputError(f"{source_name(adata)}: obs column {self.batch_key!r} has batches the {self.name} model was not trained on: "
                                 f"{unseen[:5]} (known: {self.batch_names[:10]}); {self.name} embeds with the batch")
            batch = np.maximum(batch, 0)
        elif type(self.model).uses_batch and len(self.batch_names) > 1:
            raise InputError(f"{source_name(adata)}: obs column {self.batch_key!r} not found; the {self.name} model embeds with the batch")
        X, alignment = self.prep.transform(adata, min_overlap, gene_key, self.log)
        if alignment.n_shared < alignment.n_model_genes:
            self.log(alignment.said(source_name(adata), "set to 0"))
        rows = np.arange(adata.n_obs)
        return SplitData(X=X, train=rows[:0], val=rows[:0], batch=batch.astype(np.int64), batch_names=self.batch_names, genes=self.prep.genes)

    def get_latent_representation(self, adata: ad.AnnData | None = None, min_overlap: float = 0.5, gene_key: str | None = None) -> np.ndarray:
        """Latent coordinates of the training cells, or of ``adata`` (genes aligned by name).

        Parameters
        ----------
        adata
            New cells (raw counts or log-normalised, as in training; a model of counts also reads log1p counts
            per 10,000 as they are, with a line); ``None``: the training cells.
        min_overlap
            Smallest share of the model's genes that ``adata`` must hold.
        gene_key
            Column of ``adata.var`` holding the gene names the model uses (e.g. Ensembl ids beside
            symbols); default: ``adata.var_names``.

        Returns
        -------
        Cells × latent dimensions, float32.
        """
        data = self.split_for(adata, min_overlap, gene_key)
        return self.model.embed(data, np.arange(data.X.shape[0]))

    def get_counterfactual(self, batch: str, adata: ad.AnnData | None = None, min_overlap: float = 0.5, gene_key: str | None = None) -> np.ndarray:
        """Reconstructions of the cells "as if from batch ``batch``" (``re`` only).

        Parameters
        ----------
        batch
            One of the training batches.
        adata, min_overlap, gene_key
            As for :meth:`get_latent_representation`.

        Returns
        -------
        Cells × the model's genes (``self.prep.genes``), in its input space.
        """
        counterfactual = getattr(self.model, "counterfactual", None)
        if counterfactual is None:
            raise ConfigError(f"model {self.name!r} has no counterfactual reconstructions; use 're'")
        if str(batch) not in self.batch_names:
            raise InputError(f"batch {batch!r} is not one the model was trained on: {self.batch_names[:10]}")
        data = self.split_for(adata, min_overlap, gene_key)
        return counterfactual(data, np.arange(data.X.shape[0]), str(batch))

    def loadings(self) -> np.ndarray | None:
        """Genes × factors loading matrix W of factor models (``nmf``, ``aenmf``, ``cond_aenmf``), else ``None``."""
        loadings = getattr(self.model, "loadings", None)
        return loadings() if loadings is not None else None

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the model to ``directory`` (settings YAML, genes, weights; no pickles), atomically.

        Reload it with :func:`scatlas.load_model`.
        """
        meta = {
            "scatlas_version": __version__, "model": self.model.config.model_dump(mode="json"), "training": self.settings.get("training", {}),
            "seed": self.model.train_config.seed, "key": self.key, "batch_key": self.batch_key, "label_key": self.label_key,
            "batch_names": self.batch_names, "label_names": self.label_names, "input": "counts" if self.prep.counts else "lognorm",
            "layer": self.prep.layer, "scale": self.prep.scaler.kind, "n_genes": len(self.prep.genes),
        }
        with staged_dir(directory, overwrite=overwrite) as stage:
            (stage / MODEL_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
            (stage / "genes.txt").write_text("\n".join(map(str, self.prep.genes)) + "\n")
            scaler = self.prep.scaler
            if scaler.kind != "none":
                np.savez(stage / "scaler.npz", **{k: v for k, v in {"center": scaler.center_, "scale": scaler.scale_}.items() if v is not None})
            if len(self.history):
                write_csv(self.history, stage / "history.csv")
            self.model.save_state(stage)
        return Path(directory)


def load_model(directory: str | Path) -> ScatlasModel:
    """Reload a model written by :meth:`ScatlasModel.save` (or ``scatlas embed``).

    Examples
    --------
    >>> model = scatlas.load_model("symphony_fe")          # doctest: +SKIP
    >>> query.obsm["X_fe"] = model.get_latent_representation(query)   # doctest: +SKIP
    """
    directory = Path(directory)
    meta_path = directory / MODEL_FILE
    if not meta_path.exists():
        from scatlas.tl._annotation import model_directory  # only to name what the folder holds instead

        classifier = (model_directory(directory) / "annotator.yaml").exists()
        raise InputError(f"{directory}: not a saved scatlas model ({MODEL_FILE} missing)"
                         + ("; it holds a cell-type classifier: scatlas.tl.annotate(adata, folder)" if classifier else ""))
    meta = yaml.safe_load(meta_path.read_text())
    genes = np.array((directory / "genes.txt").read_text().split("\n")[:-1])
    scaler = GeneScaler(meta.get("scale", "none"))
    if (directory / "scaler.npz").exists():
        with np.load(directory / "scaler.npz") as arrays:
            scaler.center_ = arrays["center"] if "center" in arrays.files else None
            scaler.scale_ = arrays["scale"]
    entry = dict(meta["model"])
    if entry.get("type") in ("fe", "fec"):
        entry.setdefault("decoder_batch", False)  # saved before FE's decoder could read the batch
    config = parse_model_config(entry)
    settings = parse_settings(TrainingConfig, meta.get("training", {}), f"{meta_path}: training: ")
    model = build_model(config, settings.to_train_config(meta.get("seed", 0), progress=False))
    assert isinstance(model, EmbeddingModel)
    model.load_state(directory, shape_stub(len(genes), meta["batch_names"], meta.get("label_names")))
    history = pd.read_csv(directory / "history.csv") if (directory / "history.csv").exists() else pd.DataFrame()
    return ScatlasModel(model, Preprocessing(genes, meta["input"] == "counts", meta.get("layer"), scaler), meta.get("batch_key"), meta.get("label_key"),
                        meta["key"], meta["batch_names"], meta.get("label_names"), history, {"training": meta.get("training", {})})


def _plain(value: Any) -> Any:
    """``value`` with ``None`` entries dropped (h5ad cannot store them) and tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def default_model(adata: ad.AnnData, batch_key: str | None) -> str:
    """``fe`` when ``batch_key`` names a column of two or more batches (the measured best at removing them, README
    "Which model for integration"), else ``ae``."""
    return "fe" if several_batches(adata, batch_key) else "ae"


def several_batches(adata: ad.AnnData, batch_key: str | None) -> bool:
    """Whether ``batch_key`` names a column of two or more batches (or a column ``adata`` lacks, which validation then names)."""
    return batch_key is not None and (batch_key not in adata.obs or adata.obs[batch_key].nunique() > 1)


class EmbedArguments(Strict):
    """The ranges of :func:`embed`'s own numeric and named arguments (checked before anything is read)."""

    n_top_genes: int | None = Field(ge=0)
    scale: ScaleKind
    val_fraction: float = Field(ge=0, lt=1)
    seed: Seed


def embed(
    adata: ad.AnnData,
    model: str | None = None,
    *,
    batch_key: str | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    input: InputKind = "auto",
    key_added: str | None = None,
    n_top_genes: int | None = 2000,
    scale: ScaleKind = "none",
    max_epochs: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    log: Log = print,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    **model_options: Any,
) -> ScatlasModel:
    """Fit a scatlas embedding model on all cells of ``adata`` and write its latent into it.

    Like scanpy's ``tl`` functions, ``adata`` is annotated in place and nothing else in it
    changes: the latent goes to ``adata.obsm[key_added or "X_<model>"]``, the settings and the genes
    used to ``adata.uns["scatlas"][key]``, and a factor model's loadings W to
    ``adata.varm["W_<model>"]`` (zero for genes the model did not use, as scanpy's PCs).

    A backed AnnData (``anndata.read_h5ad(path, backed="r")``, a CSR ``X``) is streamed from
    its file and never loaded: validation, gene selection, scaling statistics, training and the
    latent read ``chunk_size`` cells at a time (default 100,000; host memory flat in the number
    of cells, up to the latent itself and ``obs``). Minibatches then come from one chunk at a
    time, so the latent differs from the in-memory fit's (same genes, same held-out cells).

    Parameters
    ----------
    adata
        Cells × genes; raw counts or log-normalised values in ``.X`` or ``layer``.
    model
        A registered embedding model: ``pca``, ``ae``, ``aec``, ``fe``, ``fec``, ``re``, ``nmf``,
        ``aenmf``, ``cond_aenmf`` (``scatlas models`` lists their options). Default: ``fe`` when
        ``batch_key`` names two or more batches (it removes them), else ``ae``; ``log`` says which.
    batch_key
        Batch / donor column of ``obs`` (``None``: one batch). A model that ignores the batch (``ae``,
        ``aec``, ``pca``, ``nmf``, ``aenmf``) keeps any batch effect in its latent; ``log`` says so.
    label_key
        Cell-type column, for the supervised models (``aec``, ``fec``) and stratified metrics.
    layer
        Layer holding the matrix (default ``.X``; ``"raw"``: ``.raw`` with its own genes, see
        :func:`~scatlas.data.get_matrix`; ``.varm`` then holds the model genes ``.var`` has).
    input
        ``counts`` (normalised + log1p here), ``lognorm`` (used as is) or ``auto`` (counts when every
        value of the first cells is a whole number).
    key_added
        ``.obsm`` key of the latent (default ``X_<model>``).
    n_top_genes
        Highly variable genes, chosen on the training cells (scanpy's ``seurat`` flavour); ``None``: all genes.
    scale
        Per-gene scaling: ``none``, ``maxabs`` (scMEDAL's min-max) or ``standard``.
    max_epochs
        Upper bound on training epochs (default 100, with early stopping on the held-out cells; ``fe`` / ``fec`` on
        small data allow 3,000 minibatches and wait 500 for early stopping, see ``ScMEDALFE.sized_training``).
    val_fraction
        Share of cells held out, seeded, for early stopping only.
    seed
        Seeds the held-out cells, weights, dropout and shuffling: same seed, same latent (CPU).
    progress
        Show a progress bar.
    log
        Receives one line per notice: the model chosen, how the matrix was read, cells or genes left out (default
        ``print``, as :func:`transfer`; ``lambda _: None`` silences them). The returned model says the gene overlap of
        new cells through it too.
    checkpoint_dir
        Where a network writes ``last.ckpt`` while it trains (weights, optimiser, loop and random
        states; at the end of an epoch at most every ``checkpoint_interval_s`` seconds, default 60,
        and when training ends), beside this call's settings (:func:`~scatlas._io.check_checkpoint_settings`).
        ``None``: no checkpoints (models without epochs, e.g. ``pca``, never write one).
    resume
        Continue from ``checkpoint_dir``'s ``last.ckpt`` where there is one: on CPU the latent then
        equals an uninterrupted fit's to the bit. Refused when the settings, cells or genes differ
        from those the checkpoint was written with.
    **model_options
        The model's hyper-parameters (e.g. ``latent_dim=30``, ``adversary_weight=1.0``) and
        training settings (``batch_size``, ``lr``, ``patience``, ``accelerator``, ...).

    Returns
    -------
    The fitted :class:`ScatlasModel` (``get_latent_representation``, ``history``, ``save``).

    Examples
    --------
    >>> import anndata as ad, scanpy as sc, scatlas as sa
    >>> adata = ad.read_h5ad("../shared/data/symphony_pbmc_3tech.h5ad")       # doctest: +SKIP
    >>> model = sa.tl.embed(adata, "fe", batch_key="batch", label_key="cell_type")  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_fe"); sc.tl.umap(adata)               # doctest: +SKIP
    """
    parse_settings(EmbedArguments, {"n_top_genes": n_top_genes, "scale": scale, "val_fraction": val_fraction, "seed": seed})
    notices: list[str] = []  # said once the data passed validation, so that bad input gets its one line alone
    if model is None:
        model = default_model(adata, batch_key)
        notices.append(f"model: {model} (the default {'with a batch key of several batches: it removes them' if model == 'fe' else 'without a batch key'}; "
                       "`model` / --model to choose)")
    if model not in REGISTRY:
        raise ConfigError(f"unknown model {model!r}; available: {sorted(k for k, v in REGISTRY.items() if not issubclass(v, LatentClassifier))}")
    if batch_key is not None and issubclass(REGISTRY[model], EmbeddingModel) and not REGISTRY[model].batch_aware:
        instead = "cond_aenmf conditions its factors on it" if model in ("nmf", "aenmf") else "fe removes it; README \"Which model for integration\""
        notices.append(f"{model} does not use the batch key {batch_key!r}: its latent keeps any batch effect ({instead})")
    if not several_batches(adata, batch_key) and issubclass(REGISTRY[model], EmbeddingModel) and REGISTRY[model].batch_aware:
        notices.append(f"{model} models the batch, but {'no batch key was given' if batch_key is None else f'obs column {batch_key!r} holds one batch'}: "
                       "with one batch there is no batch effect to remove or model (`batch_key` / --batch-key names the batch column)")
    checkpoint_dir = checkpoint_path(checkpoint_dir, resume)
    counts, decided = resolve_input(adata, layer, input)
    notices += [decided] if decided else []
    entry, training = split_options(model, model_options)
    if max_epochs is not None:
        training["max_epochs"] = max_epochs
    if on_disk(adata):
        training["chunk_size"] = training.get("chunk_size") or STREAM_CHUNK
        sdata, prep = streamed_split(adata, batch_key, label_key, layer, counts, n_top_genes, scale, val_fraction, seed, training["chunk_size"], log, notices)
    else:
        data = cell_data(adata, batch_key=batch_key, label_key=label_key, layer=layer, counts=counts, drop_empty_cells=False, log=log)
        for line in notices:
            log(line)
        train, val = holdout(data.n_cells, val_fraction, seed, exclude=data.empty_cells)
        split = preprocess_split(data.lognorm, data.var_names, train, n_top_genes, scale)
        sdata = all_cells_split(split.X, data.obs, batch_key, label_key, split.genes, train, val)
        prep = Preprocessing(split.genes, counts, layer, split.scaler)
    if checkpoint_dir is not None:
        settings = {"model": _plain(entry), "training": _plain(training), "seed": seed, "batch_key": batch_key, "label_key": label_key, "layer": layer,
                    "counts": counts, "scale": scale, "n_top_genes": n_top_genes, "val_fraction": val_fraction, "streamed": on_disk(adata)}
        check_checkpoint_settings(checkpoint_dir, settings, adata.obs_names, prep.genes, resume)
    fitted, history = fit_all_cells(sdata, entry, training, seed, progress, log, checkpoint_dir, resume)
    key = key_added or f"X_{model}"
    recorded = {k: v for k, v in training.items() if k != "checkpoint_interval_s"}  # how often checkpoints were kept is not a setting of the result
    result = ScatlasModel(fitted, prep, batch_key, label_key, key, sdata.batch_names, sdata.label_names, history, {"training": recorded}, sdata, log)
    write_results(adata, result)
    return result


def write_results(adata: ad.AnnData, result: ScatlasModel) -> None:
    """Write a fitted model's latent, loadings and settings into ``adata`` (``.obsm``, ``.varm``, ``.uns["scatlas"]``; a view is
    first given data of its own, :func:`~scatlas.data.io.view_to_actual`)."""
    view_to_actual(adata, result.log)
    adata.obsm[result.key] = result.get_latent_representation()
    W = result.loadings()
    if W is not None:  # over .var's genes: those of the model's genes (e.g. of .raw) that .var lacks have no row there
        rows = adata.var_names.get_indexer(result.prep.genes)
        full = np.zeros((adata.n_vars, W.shape[1]), dtype=np.float32)
        full[rows[rows >= 0]] = W[rows >= 0]
        adata.varm[f"W_{result.key.removeprefix('X_')}"] = full
    store = dict(adata.uns.get("scatlas", {}))
    store[result.key] = _plain({
        "model": result.model.config.model_dump(mode="json"), "training": result.settings.get("training", {}), "seed": result.model.train_config.seed,
        "batch_key": result.batch_key, "label_key": result.label_key, "layer": result.prep.layer,
        "input": "counts" if result.prep.counts else "lognorm", "scale": result.prep.scaler.kind, "genes": [str(g) for g in result.prep.genes],
        "epochs": len(result.history), "version": __version__,
    })
    adata.uns["scatlas"] = store


def counterfactual(adata: ad.AnnData, model: ScatlasModel, batch: str, layer_added: str | None = None, gene_key: str | None = None) -> str:
    """Reconstruct every cell of ``adata`` "as if from batch ``batch``" with a fitted ``re`` model; write it as a layer.

    The reconstruction lives in the model's input space (log-normalised, scaled as in training)
    over the model's genes; other genes of the layer are 0.

    Parameters
    ----------
    adata
        Cells to reconstruct; the layer goes into ``adata.layers``.
    model
        A fitted ``re`` model.
    batch
        One of the model's training batches.
    layer_added
        Name of the layer (default ``<key>_as_<batch>``).
    gene_key
        Column of ``adata.var`` holding the gene names the model uses (e.g. Ensembl ids beside
        symbols); default: ``adata.var_names``.

    Returns
    -------
    The layer's name.

    Examples
    --------
    >>> model = sa.tl.embed(adata, "re", batch_key="batch")                 # doctest: +SKIP
    >>> sa.tl.counterfactual(adata, model, "10x 5'")                         # doctest: +SKIP
    'X_re_as_10x 5''
    """
    recon = model.get_counterfactual(batch, adata, gene_key=gene_key)
    if gene_key is not None and gene_key not in adata.var:
        raise InputError(f"{source_name(adata)}: var column {gene_key!r} not found (the layer goes beside .X, over adata.var)")
    view_to_actual(adata, model.log)
    columns = pd.Index(adata.var[gene_key].astype(str) if gene_key else adata.var_names).get_indexer(model.prep.genes)
    full = np.zeros((adata.n_obs, adata.n_vars), dtype=np.float32)
    full[:, columns[columns >= 0]] = recon[:, columns >= 0]
    name = layer_added or f"{model.key}_as_{batch}"
    adata.layers[name] = full
    return name


def results_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """The cells' annotations a results-only AnnData keeps: every obs column (so the file can be scored or plotted by any of
    them, e.g. ``scatlas benchmark --label-key``), with string cell names."""
    kept = obs.copy()
    kept.index = kept.index.astype(str)
    return kept


def results_anndata(adata: ad.AnnData) -> ad.AnnData:
    """A results-only AnnData: ``adata``'s obs (:func:`results_obs`), its genes, what scatlas wrote to obsm / varm / uns,
    and the file ``adata`` was read from (:func:`record_input`)."""
    out = ad.AnnData(obs=results_obs(adata.obs), var=pd.DataFrame(index=adata.var_names.astype(str)))
    for k in adata.uns.get("scatlas", {}):
        out.obsm[k] = adata.obsm[k]
        w = f"W_{k.removeprefix('X_')}"
        if w in adata.varm:
            out.varm[w] = adata.varm[w]
    out.uns["scatlas"] = adata.uns["scatlas"]
    record_input(out, adata)
    return out

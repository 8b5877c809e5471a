"""Profile aggregation: summarise each sample's cells into one profile, learned vs mean vs median.

A sample is a well, a donor × cell type, or any group of cells (``sample_key``); its
``label_key`` (compound, cell type, ...) defines what retrieval should find. Evaluation holds
out whole batches (plates, donors): the model never sees their cells; every profile is then
ranked against all others (positives: same label from another batch when a batch key is
given) and the mAP is averaged over the held-out batches' queries, for each seed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scatlas._describe import did_you_mean
from scatlas._errors import InputError, UnpairedError
from scatlas._io import atomic_path, check_checkpoint_settings, check_output_dir, staged_dir, write_csv, write_parquet, write_torch, write_yaml
from scatlas.data.io import get_matrix, get_var, on_disk, read_anndata, string_values, to_csr
from scatlas.data.dataset import file_source, whole_backed
from scatlas.data.loaders import host_tensor
from scatlas.data.preprocess import fit_gene_pca, highly_variable_genes, map_rows, normalize_log1p
from scatlas.data.sources import InMemoryCSR
from scatlas.data.validate import InputKind, resolve_input, validate
from scatlas.settings import Seed, distinct, parse_settings
from scatlas.metrics.retrieval import average_precision
from scatlas.metrics.stats import fold_summary
from scatlas.models.aggregation import SetAggregator
from scatlas.report.html import Section, write_report
from scatlas.train import TrainConfig, TrainingPlan, fit

Log = Callable[[str], None]


@dataclass
class CellTable:
    """Per-cell features with the metadata of each cell."""

    X: np.ndarray
    obs: pd.DataFrame
    source: str = "<cells>"
    features: list[str] | None = None  # the features' names (genes, PC1..PCk), when known


@dataclass
class Aggregation:
    """What :func:`run_aggregation` found.

    Attributes
    ----------
    summary
        ``metrics_95CI``: per retrieval task and method, mean ± 95% CI over seeds of the held-out mAP.
    metrics
        The same scores per seed.
    samples
        One row per sample: its sample, label, batch and group values, and ``held_out`` (a test query).
    profiles
        ``mean``, ``median`` (samples × features, of the per-batch scaled features) and ``learned``
        (samples × the set model's output, by the first seed's model).
    settings
        The settings of the result (``config.yaml``'s).
    """

    summary: pd.DataFrame
    metrics: pd.DataFrame
    samples: pd.DataFrame
    profiles: dict[str, np.ndarray]
    settings: dict[str, Any]


class AggregateConfig(BaseModel):
    """Settings of ``scatlas aggregate``.

    Attributes
    ----------
    sample_key, label_key, batch_key, group_key
        Columns: sample (well), label (compound / cell type), batch (plate / donor; positives
        must come from another batch and whole batches are held out), optional group label
        (mechanism of action) for a second retrieval task.
    features
        For ``.h5ad`` input: an ``.obsm`` key, ``pca:<k>`` (log-normalised HVGs → PCA), or
        ``None`` for ``.X`` (or ``layer``). Tables use every numeric non-metadata column.
    layer
        For ``.h5ad`` input, the matrix of ``pca:<k>`` or of the features themselves: a layer
        (``raw``: ``.raw``, as scanpy's ``use_raw``; default ``.X``).
    input
        What that matrix holds for ``pca:<k>``: ``counts`` (normalised + log1p first),
        ``lognorm`` (used as it is) or ``auto`` (counts when its values are whole numbers; a line
        says which), as the other commands.
    normalize
        Per-batch feature normalisation: ``standard``, ``mad`` (robust: median / 1.4826·MAD) or ``none``.
    sphering
        ZCA-whiten features (fitted on training cells) with regularisation ``sphering_reg``.
    test_fraction
        Share of batches held out for testing (at least one).
    seeds
        Training seeds, or their number ``n`` (seeds ``0 … n − 1``, as ``--seeds n``); the report gives
        mean and 95% CI over them.
    width, head_width, out_width, pooling, temperature
        Model (published: 2048, 256, 2048, sum, 0.1).
    labels_per_batch, views
        Labels per step and views per label.
    cells_mean, cells_sd, cells_min
        Cells per view ~ Normal(mean, sd²) clipped at ``cells_min`` (redrawn each step);
        ``None`` = published (1500, 800, 100) when samples hold ≥ 1,000 cells, else scaled
        to the median sample size.
    chunk_size
        Cells read at a time by the streamed passes over an on-disk matrix (``pca:<k>`` or ``.X``
        of a backed file); host memory holds one such chunk, not the cells' genes.
    checkpoint_interval_s
        Seconds between a seed's training checkpoints when it keeps them (``checkpoint_dir``); not
        a setting of the result, so neither ``config.yaml`` nor a resume compares it.
    """

    model_config = ConfigDict(extra="forbid")

    sample_key: str
    label_key: str
    batch_key: str | None = None
    group_key: str | None = None
    features: str | None = None
    layer: str | None = None
    input: InputKind = "auto"
    normalize: Literal["standard", "mad", "none"] = "standard"
    sphering: bool = False
    sphering_reg: float = Field(1e-2, gt=0)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    seeds: Annotated[list[Seed], distinct("each seed once (a repeated seed trains the same model again)")] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1)
    width: int = Field(2048, ge=1)
    head_width: int = Field(256, ge=1)
    out_width: int = Field(2048, ge=1)
    pooling: Literal["sum", "mean"] = "sum"
    temperature: float = Field(0.1, gt=0)
    labels_per_batch: int = Field(18, ge=2)
    views: int = Field(4, ge=2)
    cells_mean: float | None = Field(None, gt=0)
    cells_sd: float | None = Field(None, ge=0)
    cells_min: int | None = Field(None, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(20, ge=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    chunk_size: int = Field(65_536, gt=0)
    checkpoint_interval_s: float = Field(60.0, ge=0)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):  # a number of seeds, as the command's --seeds
            if value < 1:
                raise ValueError(f"{value}: train at least one seed (a number n means seeds 0 … n-1; or give a list)")
            return list(range(value))
        return value

    @field_validator("features")
    @classmethod
    def _features(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("pca:") and not (value[4:].isdigit() and int(value[4:]) >= 1):
            raise ValueError(f"{value!r}: pca:<k> takes a whole number of components k >= 1, e.g. 'pca:50'")
        return value

    @model_validator(mode="after")
    def _distinct_columns(self) -> AggregateConfig:
        if self.batch_key is not None and self.batch_key == self.label_key:
            raise ValueError(f"batch_key and label_key are both {self.label_key!r}: a sample's positives (its label) must come from other batches, "
                             "so no sample would have one; the batch is e.g. the plate or donor, the label what replicates share")
        if self.group_key is not None and self.group_key in (self.label_key, self.batch_key):
            raise ValueError(f"group_key {self.group_key!r} repeats the label or batch key; it names a coarser label (e.g. mechanism of action)")
        return self


def read_cells(path: str | Path, config: AggregateConfig, stream: bool = False, log: Log = print) -> CellTable:
    """Per-cell features from an ``.h5ad`` (``.X`` or a layer, an ``.obsm`` key or ``pca:<k>``) or a CSV/parquet table.

    With ``stream`` an ``.h5ad``'s or ``.zarr``'s matrix is never loaded: an ``.obsm`` key is read alone, and
    ``pca:<k>`` comes from streamed passes (highly variable genes, then an exact PCA of them), so
    host memory holds the cells' features, not their genes. ``log`` receives how ``input="auto"`` decided.
    """
    path = Path(path)
    keys = [k for k in (config.sample_key, config.label_key, config.batch_key, config.group_key) if k]
    if path.suffix in (".h5ad", ".zarr"):
        return cells_from_anndata(read_anndata(path, backed=stream), config, str(path), log)
    if path.name.endswith((".csv", ".csv.gz", ".parquet")):
        if config.layer is not None or config.input != "auto" or config.features is not None:
            raise InputError(f"{path}: a table's numeric columns are its features; features, layer and input apply to .h5ad / .zarr files")
        if stream:
            log(f"{path}: a table is read whole (streaming applies to .h5ad / .zarr files)")
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        meta = [c for c in table.columns if c in keys or c.startswith("Metadata_") or not pd.api.types.is_numeric_dtype(table[c])]
        return checked_cells(table[meta].copy(), table.drop(columns=meta).to_numpy(dtype=np.float32), config, str(path))
    raise InputError(f"{path}: expected .h5ad, .zarr, .csv(.gz) or .parquet")


def cells_from_anndata(adata: ad.AnnData, config: AggregateConfig, source: str = "<AnnData>", log: Log = print) -> CellTable:
    """Per-cell features of an AnnData: the matrix (``.X`` or ``config.layer``), an ``.obsm`` key or ``pca:<k>``
    (``config.features``), after :func:`~scatlas.data.validate.validate`; ``log`` receives how ``input="auto"`` decided."""
    pca = config.features is not None and config.features.startswith("pca:")
    if not pca and config.input != "auto":
        raise InputError(f"{source}: input {config.input!r} applies to pca:<k> features (it says whether to log-normalise the matrix first); "
                         f"features {config.features or '.X'!r} are used as they are")
    if config.features is not None and not pca and config.layer is not None:
        raise InputError(f"{source}: layer {config.layer!r} is not read: the features are .obsm[{config.features!r}]")
    if config.features is None:  # before any pass over the cells
        check_dense_fits((adata.n_obs, len(get_var(adata, config.layer))), source)
    counts, decided = resolve_input(adata, config.layer, config.input) if pca else (False, None)
    validate(adata, batch_key=config.batch_key, label_key=config.label_key, extra_keys=[config.sample_key, config.group_key], layer=config.layer,
             require_counts=counts, lognorm=pca and not counts, check_values=pca or config.features is None)
    cells = checked_cells(adata.obs.copy(), _h5ad_features(adata, config, source, counts), config, source)
    if config.features is None:
        cells.features = list(get_var(adata, config.layer).index.astype(str))
    elif pca:
        cells.features = [f"PC{i + 1}" for i in range(cells.X.shape[1])]
    if decided:
        log(f"{decided} for {config.features}")
    if pca and cells.X.shape[1] < int(config.features[4:]):  # type: ignore[index]
        log(f"{config.features}: {cells.X.shape[1]} components, at most the highly variable genes and the cells less one")
    return cells


def checked_cells(obs: pd.DataFrame, X: np.ndarray, config: AggregateConfig, source: str) -> CellTable:
    """A :class:`CellTable` after checking that the configured columns exist and hold no missing values, and the features are finite."""
    keys = list(dict.fromkeys(k for k in (config.sample_key, config.label_key, config.batch_key, config.group_key) if k))
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise InputError(f"{source}: columns {missing} not found{did_you_mean(missing[0], obs.columns)}; available: {list(obs.columns)[:30]}")
    bad = {k: int(obs[k].isna().sum()) for k in keys if obs[k].isna().any()}
    if bad:
        raise InputError(f"{source}: " + ", ".join(f"column {k!r} has {n} missing values" for k, n in bad.items())
                         + f" (of {len(obs)} rows): every cell needs a sample, label and batch; drop those rows or fill them")
    if not np.isfinite(X).all():
        raise InputError(f"{source}: features contain NaN or infinite values")
    return CellTable(np.asarray(X, dtype=np.float32), obs.reset_index(drop=True), source)


def _h5ad_features(adata: ad.AnnData, config: AggregateConfig, source: str, counts: bool) -> np.ndarray:
    """The per-cell features ``config.features`` names (``counts``: log-normalise the matrix of ``pca:<k>`` first); a
    backed AnnData's matrix is read in chunks, never loaded."""
    features = config.features
    if features is not None and not features.startswith("pca:"):
        if features not in adata.obsm:
            raise InputError(f"{source}: obsm key {features!r} not found{did_you_mean(features, adata.obsm)}; available: {list(adata.obsm)}")
        return np.asarray(adata.obsm[features])
    if features is None:
        X = _matrix(adata, config.layer, normalize=False)
        return map_rows(X, X.shape[1], lambda block: block.toarray(), config.chunk_size)
    lognorm = _matrix(adata, config.layer, normalize=counts)
    lognorm = lognorm.with_genes(highly_variable_genes(lognorm, np.arange(adata.n_obs), 2000, config.chunk_size))
    return fit_gene_pca(lognorm, int(features[4:]), chunk_size=config.chunk_size).transform(lognorm, config.chunk_size)


def check_dense_fits(shape: tuple[int, int], source: str, memory: int | None = None) -> None:
    """Refuse to hold a matrix of ``shape`` as dense float32 features when that takes over half the machine's memory (``memory`` bytes)."""
    need = shape[0] * shape[1] * 4
    memory = memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory / 2:
        raise InputError(f"{source}: its {shape[0]:,} cells x {shape[1]:,} genes as dense features take {need / 1e9:.1f} GB, over half of this machine's "
                         f"{memory / 1e9:.0f} GB; aggregate fewer features, e.g. features 'pca:50' (--features pca:50) or an .obsm key")


def _matrix(adata: ad.AnnData, layer: str | None, normalize: bool) -> Any:
    """The matrix (``.X`` or ``layer``; log-normalised when ``normalize``) as a source: in memory, or for a backed AnnData read from its file in chunks."""
    if on_disk(adata):
        return file_source(whole_backed(adata), layer=layer, normalize=normalize)
    X = to_csr(get_matrix(adata, layer))
    return InMemoryCSR(normalize_log1p(X) if normalize else X)


@dataclass
class ScaledFeatures:
    """Per-cell features scaled within each batch (and optionally ZCA-whitened), computed for the rows asked for.

    Only the features, each cell's batch and the per-batch statistics are held, so no scaled copy
    of the cells × features matrix ever exists: indexing ``[rows]`` (any shape of row indices)
    returns the scaled float32 features of those cells.
    """

    X: np.ndarray
    group: np.ndarray | None = None
    center: np.ndarray | None = None
    scale: np.ndarray | None = None
    whitening: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Cells × features."""
        return self.X.shape  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """Always float32."""
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, rows: Any) -> np.ndarray:
        x = self.X[rows]
        if self.group is not None:
            g = self.group[rows]
            x = (x - self.center[g]) / self.scale[g]  # type: ignore[index]
        if self.whitening is not None:
            mean, W = self.whitening
            x = ((x - mean) @ W).astype(np.float32)
        return x


def scale_per_batch(X: np.ndarray, batch: np.ndarray | None, method: str) -> ScaledFeatures:
    """Standardise (or robust-scale: median / 1.4826·MAD) every feature within each batch.

    Parameters
    ----------
    X
        Cells × features (float32; other dtypes are converted).
    batch
        Each cell's batch (``None``: one batch).
    method
        ``standard``, ``mad`` or ``none``.

    Returns
    -------
    The scaled features, computed when indexed (a feature without spread within a batch is only centred).
    """
    X = np.asarray(X, dtype=np.float32)
    if method == "none":
        return ScaledFeatures(X)
    groups = np.zeros(len(X), dtype=np.int64) if batch is None else pd.factorize(batch)[0]
    centers, scales = [], []
    for rows in rows_by_sample(groups).values():
        x = X[rows]
        if method == "mad":
            center = np.median(x, axis=0)
            scale = 1.4826 * np.median(np.abs(x - center), axis=0)
        else:
            center, scale = x.mean(0), x.std(0)
        centers.append(center)
        scales.append(np.where(scale > 0, scale, 1.0))
    return ScaledFeatures(X, groups, np.stack(centers), np.stack(scales))


def zca_matrix(X: np.ndarray | ScaledFeatures, rows: np.ndarray, reg: float, chunk_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ZCA whitening matrix ``U (Λ + reg)^{-1/2} Uᵀ`` of the cells ``rows`` of ``X``.

    The mean and the covariance (``n − 1`` in the denominator, as :func:`numpy.cov`) are
    accumulated in float64, ``chunk_size`` cells at a time, so no copy of those cells is held.
    """
    n, width = len(rows), X.shape[1]
    total = np.zeros(width)
    for start in range(0, n, chunk_size):
        total += X[rows[start : start + chunk_size]].sum(0, dtype=np.float64)
    mean = (total / n).astype(np.float32)
    scatter = np.zeros((width, width))
    for start in range(0, n, chunk_size):
        centred = X[rows[start : start + chunk_size]].astype(np.float64) - mean
        scatter += centred.T @ centred
    vals, vecs = np.linalg.eigh(scatter / max(n - 1, 1))
    return mean, (vecs / np.sqrt(vals + reg)) @ vecs.T


class ViewSampler:
    """Training batches: ``labels_per_batch`` labels × ``views`` views of N cells (N redrawn per step).

    Each view samples N cells with replacement from one or two samples of its label.
    """

    def __init__(self, X: ScaledFeatures, sample_cells: dict[Any, np.ndarray], sample_label: dict[Any, int], config: AggregateConfig, cells: tuple[float, float, int], seed: int) -> None:
        self.X = X
        self.by_label: dict[int, list[np.ndarray]] = {}
        for sample, rows in sample_cells.items():
            self.by_label.setdefault(sample_label[sample], []).append(rows)
        self.labels = sorted(self.by_label)
        self.config, self.cells, self.seed = config, cells, seed
        self.per_batch = min(config.labels_per_batch, len(self.labels))
        self.steps = max(4, math.ceil(len(self.labels) / self.per_batch))
        self._epoch = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Draw the views of epoch ``epoch`` next (the trainer calls it before each epoch, so a resumed fit draws the same views)."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng((self.seed, self._epoch))
        self._epoch += 1
        mean, sd, low = self.cells
        for _ in range(self.steps):
            n = int(max(low, round(rng.normal(mean, sd))))
            n += n % 2
            labels = rng.choice(self.labels, self.per_batch, replace=False)
            rows, targets = [], []
            for label in labels:
                pools = self.by_label[label]
                for _ in range(self.config.views):
                    chosen = rng.choice(len(pools), min(len(pools), int(rng.integers(1, 3))), replace=False)
                    pool = np.concatenate([pools[i] for i in chosen])
                    rows.append(rng.choice(pool, n, replace=True))
                    targets.append(label)
            yield {"x": host_tensor(self.X[np.stack(rows)]), "label": torch.as_tensor(targets)}


class SampleLoader:
    """One batch per sample with all its cells (validation and inference)."""

    def __init__(self, X: ScaledFeatures, sample_cells: dict[Any, np.ndarray], sample_label: dict[Any, int]) -> None:
        self.X, self.samples, self.sample_label = X, list(sample_cells.items()), sample_label

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample, rows in self.samples:
            yield {"x": host_tensor(self.X[rows])[None], "label": torch.as_tensor([self.sample_label[sample]])}


class AggregationPlan(TrainingPlan):
    """Contrastive training with the validation mAP (same-label retrieval among validation samples) logged as ``val_map``."""

    def on_validation_epoch_start(self) -> None:
        """Allocate the validation profiles (one row per validation sample, filled as in :func:`learned_profiles`)."""
        super().on_validation_epoch_start()
        n = int(sum(self.trainer.num_val_batches))
        self._val_profiles = np.empty((n, self.module.out_width), dtype=np.float32)
        self._val_labels = np.empty(n, dtype=np.int64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Profile of one validation sample (all its cells)."""
        self._val_profiles[batch_idx] = self.module.profile(batch["x"][0]).float().cpu().numpy()
        self._val_labels[batch_idx] = int(batch["label"][0])

    def on_validation_epoch_end(self) -> None:
        """Log ``val_map``."""
        feats = self._val_profiles
        meta = pd.DataFrame({"label": self._val_labels})
        try:
            ap = average_precision(meta, feats, ["label"], [], [], ["label"])["average_precision"].to_numpy()
        except UnpairedError:  # no two validation samples share a label
            ap = np.array([np.nan])
        self.log("val_map", float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0, prog_bar=True)
        super().on_validation_epoch_end()


def _cells_per_view(config: AggregateConfig, sizes: np.ndarray) -> tuple[float, float, int]:
    median = float(np.median(sizes))
    if config.cells_mean is not None:
        return config.cells_mean, config.cells_sd or config.cells_mean / 2, config.cells_min or 2
    if median >= 1000:
        return 1500.0, 800.0, 100
    return median, median / 2, max(2, int(median // 4))


def train_aggregator(X: ScaledFeatures, sample_ids: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray, config: AggregateConfig, seed: int,
                     checkpoint_dir: Path | None = None, resume: bool = False) -> SetAggregator:
    """Fit the set model on the features ``X`` of the samples ``train`` (checkpoint with the best mAP on ``val``).

    Its training checkpoint goes to ``checkpoint_dir``; ``resume`` continues from it (on CPU to the bit).
    """
    rows_of = rows_by_sample(sample_ids)
    label_of = pd.Series(labels).groupby(sample_ids, sort=False).first().to_dict()
    train_cells = {s: rows_of[s] for s in train}
    sampler = ViewSampler(X, train_cells, label_of, config, _cells_per_view(config, np.array([len(r) for r in train_cells.values()])), seed)
    torch.manual_seed(seed)
    module = SetAggregator(X.shape[1], config.width, config.head_width, config.out_width, config.pooling, config.temperature)
    plan = AggregationPlan(module, lr=config.lr, weight_decay=config.weight_decay)
    train_config = TrainConfig(max_epochs=config.max_epochs, patience=config.patience, monitor="val_map", monitor_mode="max", restore_best=True, seed=seed,
                               progress=False, checkpoint_interval_s=config.checkpoint_interval_s)
    fit(plan, sampler, SampleLoader(X, {s: rows_of[s] for s in val}, label_of), train_config, checkpoint_dir, resume)
    return module.eval()


def validation_samples(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which training samples choose the set model's epoch: about ``fraction`` of them, each with a same-label partner.

    The validation mAP retrieves same-label samples among the validation samples, so a sample
    without a partner there scores nothing (drawn at random, 20% of donor × cell-type samples held
    a donor's pair for about one donor in ten, and the chosen epoch was noise). A label with at
    least 4 training samples gives ``fraction`` of them (at least 2) and keeps at least 2 for
    training; labels with 2 or 3 samples (e.g. donors over a few cell types) go to validation
    whole, ``fraction`` of those labels (at least 2, and at least 2 left to train on); a label's
    only sample always trains. Where that leaves fewer than two labels to validate on,
    ``fraction`` of the samples are drawn plainly.

    Parameters
    ----------
    labels
        Label of each training sample.
    fraction
        Share of the samples, and of the small labels, to validate on.
    seed
        Seeds the draw.

    Returns
    -------
    Boolean mask over ``labels``.
    """
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    codes, counts = np.unique(labels, return_counts=True)
    for code, n in zip(codes[counts >= 4], counts[counts >= 4], strict=True):
        val[rng.choice(np.flatnonzero(labels == code), max(2, int(round(fraction * n))), replace=False)] = True
    small = codes[(counts >= 2) & (counts < 4)]
    whole = min(len(small), max(2, int(round(fraction * len(small)))))
    if len(small) and (counts >= 4).sum() + len(small) - whole + (counts == 1).sum() >= 2:  # training keeps two labels at least
        val |= np.isin(labels, rng.choice(small, whole, replace=False))
    if len(np.unique(labels[val])) < 2:  # no retrieval among one label: a plain draw, as before
        return np.random.default_rng(seed).random(len(labels)) < fraction
    return val


def rows_by_sample(sample_ids: np.ndarray) -> dict[Any, np.ndarray]:
    """Row indices of each sample's cells."""
    return pd.Series(np.arange(len(sample_ids))).groupby(np.asarray(sample_ids)).indices


@torch.no_grad()
def learned_profiles(module: SetAggregator, X: np.ndarray | ScaledFeatures, sample_ids: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Profiles of ``samples`` from all their cells.

    Each profile is copied into one preallocated array as it comes: kept as separate small
    tensors, they would sit on top of the heap above the freed encodings of the next, larger
    sample, and the process's memory would grow with the cells per sample (measured: 0.7 GB at
    400,000 cells).
    """
    device = next(module.parameters()).device
    rows_of = rows_by_sample(sample_ids)
    out = np.empty((len(samples), module.out_width), dtype=np.float32)
    for i, s in enumerate(samples):
        out[i] = module.profile(host_tensor(X[rows_of[s]]).to(device)).cpu().numpy()
    return out


def baseline_profiles(X: np.ndarray | ScaledFeatures, sample_ids: np.ndarray, samples: np.ndarray, how: str) -> np.ndarray:
    """Mean or median of each sample's cells, in ``X``'s dtype (computed in float64, one sample's rows at a time: no copy of ``X``)."""
    rows_of = rows_by_sample(sample_ids)
    reduce = np.mean if how == "mean" else np.median
    out = np.empty((len(samples), X.shape[1]), dtype=X.dtype)  # filled as it goes, as in learned_profiles
    for i, s in enumerate(samples):
        out[i] = reduce(np.asarray(X[rows_of[s]], dtype=np.float64), axis=0)
    return out


def _retrieval(profiles: np.ndarray, meta: pd.DataFrame, label: str, batch: str | None, test: np.ndarray, diff: str | None = None) -> pd.DataFrame:
    pos_diffby = [c for c in (batch, diff) if c]
    ap = average_precision(meta, profiles, [label], pos_diffby, [], [label])
    ap["test"] = test
    return ap


def run_aggregation(cells: CellTable, config: AggregateConfig, out: str | Path | None = None, overwrite: bool = False, log: Log = print,
                    checkpoint_dir: Path | None = None, resume: bool = False) -> Aggregation:
    """Train on the non-test batches for every seed; score learned, mean and median profiles.

    Seed ``s``'s set model keeps its training checkpoint in ``checkpoint_dir / seed_<s>``; ``resume``
    continues every seed from there (a finished one is reloaded), after checking that the settings,
    samples and features are those the checkpoints were written with.

    Returns
    -------
    The scores (``metrics_95CI``: per retrieval task and method, mean ± 95% CI over seeds of the
    mAP over held-out queries), the samples and their profiles (:class:`Aggregation`).
    """
    if out is not None:
        check_output_dir(out, overwrite)
    obs = cells.obs
    sample_ids = string_values(obs[config.sample_key])  # a categorical's cells share its strings
    samples = pd.unique(sample_ids)
    first = obs.groupby(sample_ids, sort=False).first().loc[samples]
    for key in (config.label_key, config.batch_key, config.group_key):
        if key and (obs.groupby(sample_ids)[key].nunique() > 1).any():
            raise InputError(f"{cells.source}: {key!r} must be constant within each sample of {config.sample_key!r}")
    meta = first[[k for k in (config.label_key, config.batch_key, config.group_key) if k and k != config.sample_key]].reset_index(drop=True)
    meta.insert(0, config.sample_key, samples)
    label_codes = pd.factorize(meta[config.label_key])[0]
    rng = np.random.default_rng(0)
    if config.batch_key:
        batches = pd.unique(meta[config.batch_key])
        if len(batches) < 2:
            raise InputError(f"{cells.source}: batch key {config.batch_key!r} has one value; held-out evaluation needs ≥ 2 batches")
        test_batches = rng.choice(batches, max(1, int(round(config.test_fraction * len(batches)))), replace=False)
        test = meta[config.batch_key].isin(test_batches).to_numpy()
    else:
        test = rng.random(len(samples)) < config.test_fraction
    X = scale_per_batch(cells.X, obs[config.batch_key].to_numpy() if config.batch_key else None, config.normalize)
    if config.sphering:
        X.whitening = zca_matrix(X, np.flatnonzero(~pd.Series(sample_ids).isin(samples[test]).to_numpy()), config.sphering_reg)
    train_samples = samples[~test]
    if len(np.unique(label_codes[~test])) < 2:
        raise InputError(f"{cells.source}: fewer than two labels among training samples")
    if np.bincount(label_codes[~test]).max() < 2:
        raise InputError(f"{cells.source}: every {config.label_key!r} has one training sample of {config.sample_key!r}, so no profile has "
                         "a positive to retrieve; use a finer sample key (e.g. donor_id,cell_type) or --cells-per-sample")
    log(f"{len(samples)} samples, {len(np.unique(label_codes))} labels; held out: {test.sum()} samples" + (f" of batches {sorted(map(str, test_batches))}" if config.batch_key else ""))
    tasks = [("label", config.label_key, None)] + ([("group", config.group_key, config.label_key)] if config.group_key else [])
    settings = config.model_dump(mode="json", exclude={"checkpoint_interval_s"})
    if checkpoint_dir is not None:  # the features decide the weights: their digest, not names (an .obsm key or pca:<k> has none)
        features = hashlib.sha256(np.ascontiguousarray(cells.X).view(np.uint8)).hexdigest()[:16]
        check_checkpoint_settings(checkpoint_dir, {**settings, "features": f"{cells.X.shape[1]}, sha256 {features}"}, sample_ids, None, resume)
    rows, profiles_seed0 = [], {}
    for how in ("mean", "median"):
        profiles = baseline_profiles(X, sample_ids, samples, how)
        profiles_seed0[how] = profiles
        rows += _score(profiles, meta, config, tasks, test, how, seed=None)
    for seed in config.seeds:
        val_mask = validation_samples(pd.Series(label_codes, index=samples).loc[train_samples].to_numpy(), 0.2, seed)
        cell_labels = pd.Series(label_codes, index=samples).reindex(sample_ids).to_numpy()
        module = train_aggregator(X, sample_ids, cell_labels, train_samples[~val_mask], train_samples[val_mask], config, seed,
                                  checkpoint_dir / f"seed_{seed}" if checkpoint_dir is not None else None, resume)
        profiles = learned_profiles(module, X, sample_ids, samples)
        rows += _score(profiles, meta, config, tasks, test, "learned", seed)
        if seed == config.seeds[0]:
            profiles_seed0["learned"], model0 = profiles, module
        log(f"seed {seed}: learned mAP {rows[-len(tasks)]['map']:.3f}")
    metrics = pd.DataFrame(rows)
    summary = fold_summary(metrics.drop(columns=["seed", "n_queries"]), by=["task", "method"])
    if out is not None:
        with staged_dir(out, overwrite) as stage:
            write_csv(metrics, stage / "metrics.csv")
            write_csv(summary, stage / "metrics_95CI.csv")
            for how, profiles in profiles_seed0.items():
                _write_profiles(profiles, meta, stage / f"profiles_{how}")
            write_torch(model0.state_dict(), stage / "model.pt")
            write_yaml({**settings, "n_features": int(X.shape[1]), "data": cells.source}, stage / "config.yaml")
            _pr_figure(profiles_seed0, meta, config, test, stage / "precision_recall.png")
            write_report(stage / "report.html", "Profile aggregation: learned vs mean vs median",
                         [Section("Held-out queries: mean and 95% CI over seeds", [summary], [stage / "precision_recall.png"]), Section("Per seed", [metrics])], cells.source)
    return Aggregation(summary, metrics, meta.assign(held_out=test), profiles_seed0, settings)


def profiles_anndata(result: Aggregation, cells: CellTable, config: AggregateConfig) -> ad.AnnData:
    """The samples as an AnnData (as ``scanpy.get.aggregate`` gives them): ``X`` their mean profiles, layer ``median``,
    ``obsm['X_learned']`` the set model's profiles, ``obs`` each sample's columns and ``held_out``, ``uns['aggregate']`` the scores."""
    samples = result.samples
    obs = samples.astype({k: str for k in samples.columns if k != "held_out"}).set_index(config.sample_key, drop=False)
    obs.index.name = None
    features = cells.features or [f"f{i}" for i in range(cells.X.shape[1])]
    settings = {k: v for k, v in result.settings.items() if v is not None}  # an .h5ad's uns holds no None
    return ad.AnnData(X=result.profiles["mean"], obs=obs, var=pd.DataFrame(index=pd.Index(features, dtype=str)),
                      layers={"median": result.profiles["median"]}, obsm={"X_learned": result.profiles["learned"]},
                      uns={"aggregate": {"map": result.summary, "per_seed": result.metrics, "settings": settings}})


def _score(profiles: np.ndarray, meta: pd.DataFrame, config: AggregateConfig, tasks: list, test: np.ndarray, method: str, seed: int | None) -> list[dict[str, Any]]:
    rows = []
    for task, label, diff in tasks:
        ap = _retrieval(profiles, meta, label, config.batch_key, test, diff)
        queries = ap[ap["test"] & ap["n_pos_pairs"].gt(0)]
        rows.append({"task": task, "method": method, "seed": seed if seed is not None else -1, "map": float(queries["average_precision"].mean()),
                     "precision_at_r": float(queries["precision_at_r"].mean()), "n_queries": len(queries)})
    return rows


def _write_profiles(profiles: np.ndarray, meta: pd.DataFrame, stem: Path) -> None:
    frame = pd.concat([meta.reset_index(drop=True), pd.DataFrame(profiles, columns=[f"f{i}" for i in range(profiles.shape[1])])], axis=1)
    write_parquet(frame, stem.with_suffix(".parquet"))
    adata = ad.AnnData(X=profiles.astype(np.float32), obs=meta.astype(str).set_index(meta.columns[0], drop=False))
    with atomic_path(stem.with_suffix(".h5ad")) as tmp:
        adata.write_h5ad(tmp)


def _pr_figure(profiles: dict[str, np.ndarray], meta: pd.DataFrame, config: AggregateConfig, test: np.ndarray, path: Path) -> None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    from scatlas._io import save_figure

    fig, ax = plt.subplots(figsize=(5, 4))
    labels = meta[config.label_key].astype(str).to_numpy()
    batch = meta[config.batch_key].astype(str).to_numpy() if config.batch_key else None
    for how, p in profiles.items():
        unit = p / np.linalg.norm(p, axis=1, keepdims=True)
        sim = unit[test] @ unit.T
        same = labels[test][:, None] == labels[None, :]
        valid = ~np.eye(len(labels), dtype=bool)[test]
        if batch is not None:
            valid &= batch[test][:, None] != batch[None, :]
        precision, recall, _ = precision_recall_curve(same[valid], sim[valid])
        ax.plot(recall, precision, label=how)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("held-out queries: same-label retrieval")
    ax.legend(frameon=False)
    save_figure(fig, path)


def toy_covariance(seed: int = 0, n_classes: int = 10, n_sets: int = 4, n_points: int = 800) -> CellTable:
    """Classes with identical (zero) means and rotated covariances; ``n_sets`` replicate samples per class.

    Class ``i`` draws points from N(0, R(iπ/n)·[[1, .5], [.5, 1]]·R(iπ/n)ᵀ): mean aggregation
    is at chance by construction, while the covariance identifies the class.
    """
    rng = np.random.default_rng(seed)
    base = np.array([[1.0, 0.5], [0.5, 1.0]])
    X, rows = [], []
    for c in range(n_classes):
        a = c * np.pi / n_classes
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        cov = rot @ base @ rot.T
        for s in range(n_sets):
            X.append(rng.multivariate_normal(np.zeros(2), cov, n_points))
            rows += [{"sample": f"class{c}_set{s}", "label": f"class{c}", "replicate": f"set{s}"}] * n_points
    return CellTable(np.concatenate(X).astype(np.float32), pd.DataFrame(rows), "toy covariance")


def make_samples(obs: pd.DataFrame, by: list[str], size: int, log: Log = print, seed: int = 0) -> pd.Categorical:
    """Sample ids that split the cells of each ``by`` group into random chunks of about ``size`` cells (a categorical:
    the cells of a sample share one string); a group of fewer cells is one sample, and ``log`` counts those groups."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(obs), dtype=object)
    groups = obs.groupby(by, observed=True).indices
    if small := [len(rows) for rows in groups.values() if len(rows) < size]:
        log(f"{len(small)} of {len(groups)} {' × '.join(by)} groups hold fewer than {size} cells (smallest {min(small)}): each is one sample")
    for key, rows in groups.items():
        key = key if isinstance(key, tuple) else (key,)
        rows = rng.permutation(rows)
        n_chunks = max(1, len(rows) // size)
        for i, chunk in enumerate(np.array_split(rows, n_chunks)):
            ids[chunk] = "|".join(map(str, key)) + f"|s{i}"
    return pd.Categorical(ids)


def joined_samples(obs: pd.DataFrame, columns: list[str]) -> pd.Categorical:
    """One sample per combination of ``columns`` (e.g. donor × cell type), named ``"a|b"``, as a categorical (one
    string per sample, not per cell)."""
    codes = obs.groupby(columns, sort=False, observed=True, dropna=False).ngroup().to_numpy()
    first = np.unique(codes, return_index=True)[1]  # one cell of each sample, in code order
    names = obs[columns].iloc[first].astype(str).agg("|".join, axis=1)
    return pd.Categorical.from_codes(codes, categories=pd.Index(names.to_numpy()))


def load_aggregate_config(values: dict[str, Any]) -> AggregateConfig:
    """Validate CLI/API settings."""
    return parse_settings(AggregateConfig, values)


__all__ = ["AggregateConfig", "Aggregation", "CellTable", "joined_samples", "load_aggregate_config", "make_samples", "profiles_anndata", "read_cells", "run_aggregation", "toy_covariance"]

"""Non-negative factor embeddings: scikit-learn NMF, autoencoding NMF and donor-conditioned AE-NMF.

* ``nmf`` — scikit-learn ``NMF`` (nndsvda, coordinate descent, Frobenius) or ``MiniBatchNMF``.
* ``aenmf`` — one matrix ``W ≥ 0`` (K × genes): ``H = X Wᵀ`` (non-negative for X ≥ 0),
  ``X̂ = H W``, MSE (+ L1 on H); W is projected onto ≥ 0 after every optimiser step, initialised
  non-negative and near-orthogonal; AdamW. Optional unit-norm rows of W.
* ``cond_aenmf`` — conditions on the batch/donor C (one-hot) so that ``H_shared = X Wᵀ`` stays
  donor-free; ``formulation: offset``: ``X̂ = (X Wᵀ) W + C U`` with ``U ≥ 0`` (donors × genes),
  ridge penalties on W and U and, after ``warmup_epochs``, an invariance penalty on the donor
  means of H within each cell type plus a linear-kernel HSIC(H, C); ``formulation: decoder``:
  ``X̂ = H W + H U_d`` with donor-specific non-negative decoder offsets ``U_d``.

Inputs must be non-negative (log-normalised values; ``scale: standard`` is refused).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pydantic import Field
from sklearn.decomposition import NMF as SkNMF
from sklearn.decomposition import MiniBatchNMF
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from torch.nn import functional as F

from scatlas._errors import ConfigError, InputError
from scatlas.data.loaders import Batch
from scatlas.data.sources import read_rows
from scatlas.models.base import EmbeddingModel, ModelConfig, NeuralModel, SklearnState, SplitData, register
from scatlas.train import TrainingPlan


def _check_nonnegative(data: SplitData, model: str) -> None:
    """Refuse negative inputs (a streamed source is checked on its first 10,000 cells)."""
    X = data.X if sp.issparse(data.X) else data.X.read(0, min(10_000, data.X.shape[0]))
    if X.data.size and X.data.min() < 0:
        raise InputError(f"{model}: needs non-negative input (log-normalised values); do not use `scale: standard`")


class NMFConfig(ModelConfig):
    """scikit-learn NMF baseline."""

    type: str = "nmf"
    rank: int = Field(20, ge=1)
    max_iter: int = Field(100, ge=1)
    minibatch: bool = False


def _check_rank(config: Any, n_genes: int) -> None:
    """Refuse more factors than the genes they are made of (non-negative factors beyond that are not identifiable)."""
    if config.rank > n_genes:
        raise ConfigError(f"{config.type}: rank {config.rank} is above the {n_genes:,} genes the model reads: at most one factor per gene "
                          "(lower the rank, or raise n_top_genes)")


@register("nmf")
class NMF(SklearnState, EmbeddingModel):
    """scikit-learn NMF (init nndsvda, coordinate descent) or MiniBatchNMF, fitted on the training cells.

    A streamed source (data too large for memory) always uses MiniBatchNMF, fed chunk by chunk
    with ``partial_fit``.
    """

    Config = NMFConfig
    latent_name = "H"
    estimator_attr = "nmf"

    def size_said(self, n_train: int, n_genes: int) -> str | None:
        """Refuse a rank above the genes or the training cells (scikit-learn's NNDSVD start needs both)."""
        _check_rank(self.config, n_genes)
        if self.config.rank > n_train:  # type: ignore[attr-defined]
            raise ConfigError(f"nmf: rank {self.config.rank} is above the {n_train:,} training cells; its start (NNDSVD) allows at most "  # type: ignore[attr-defined]
                              "that many factors: choose a smaller rank, or aenmf")
        return None

    def fit(self, data: SplitData, checkpoint_dir: Path | None = None, resume: bool = False) -> pd.DataFrame | None:
        """Fit W on the training cells (no epoch history)."""
        _check_nonnegative(data, "nmf")
        cfg: NMFConfig = self.config  # type: ignore[assignment]
        seed = self.train_config.seed
        estimator = SkNMF if sp.issparse(data.X) and not cfg.minibatch else MiniBatchNMF
        self.nmf = estimator(cfg.rank, init="nndsvda", max_iter=cfg.max_iter, random_state=seed, **({"solver": "cd"} if estimator is SkNMF else {}))
        if sp.issparse(data.X):
            with warnings.catch_warnings():  # its two-line ConvergenceWarning becomes fit_said's one line
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.nmf.fit(data.X[data.train])
            return None
        for _ in range(cfg.max_iter):  # streamed: one partial_fit per chunk, max_iter passes over the file
            for chunk in self._chunks(data, data.train):
                self.nmf.partial_fit(chunk)
        return None

    def fit_said(self) -> str | None:
        """A line when scikit-learn stopped at ``max_iter`` before its tolerance was met (streamed passes have no tolerance)."""
        if getattr(self.nmf, "n_iter_", 0) < self.nmf.max_iter:
            return None
        return (f"nmf: scikit-learn stopped at max_iter {self.nmf.max_iter} before its tolerance (tol {self.nmf.tol:g}) was met, reconstruction "
                f"error {self.nmf.reconstruction_err_:.4g} (to iterate longer, raise max_iter; in `scatlas nmf`, --max-epochs)")

    def _chunks(self, data: SplitData, rows: np.ndarray) -> Iterator[sp.csr_matrix]:
        """The cells ``rows`` of a streamed source, ``chunk_size`` at a time (read in file order)."""
        size = self.train_config.chunk_size or 100_000
        for a in range(0, len(rows), size):
            yield read_rows(data.X, rows[a : a + size])

    def embed(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """H of the cells (non-negative least squares against W, at most ``max_iter`` iterations: the fit's line says when that binds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if sp.issparse(data.X):
                return self.nmf.transform(data.X[rows]).astype(np.float32)
            return np.concatenate([self.nmf.transform(chunk) for chunk in self._chunks(data, rows)]).astype(np.float32)

    def reconstruct(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """H W."""
        return (self.embed(data, rows) @ self.nmf.components_).astype(np.float32)

    def loadings(self) -> np.ndarray:
        """W as genes × K."""
        return self.nmf.components_.T.astype(np.float32)


def nonnegative_orthogonal_init(rank: int, n_genes: int, generator: torch.Generator | None = None, noise: float = 0.01) -> torch.Tensor:
    """A K × genes non-negative matrix with near-orthogonal unit rows.

    The genes are dealt at random into K groups; row k is the indicator of group k plus
    ``noise`` × uniform noise, normalised. Rows are orthogonal up to the noise, so ``Wᵀ W`` starts
    as (nearly) a projection and the initial reconstruction never exceeds the input's norm.
    """
    group = torch.randperm(n_genes, generator=generator) % rank
    w = noise * torch.rand(rank, n_genes, generator=generator)
    w[group, torch.arange(n_genes)] += 1.0
    return w / w.norm(dim=1, keepdim=True)


class AENMFModule(nn.Module):
    """Tied non-negative autoencoder ``H = X Wᵀ``, ``X̂ = H W``.

    Parameters
    ----------
    n_genes, rank
        Input width and number of factors K.
    l1
        Weight of the L1 penalty on H.
    row_normalize
        Use unit-norm rows of W.
    """

    def __init__(self, n_genes: int, rank: int, l1: float = 0.0, row_normalize: bool = False) -> None:
        super().__init__()
        self.W = nn.Parameter(nonnegative_orthogonal_init(rank, n_genes))
        self.l1 = l1
        self.row_normalize = row_normalize

    def weight(self) -> torch.Tensor:
        """W (row-normalised when asked)."""
        return F.normalize(self.W, dim=1) if self.row_normalize else self.W

    def nonnegative_parameters(self) -> list[nn.Parameter]:
        """Parameters projected onto ≥ 0 after every step."""
        return [self.W]

    def embed(self, batch: Batch) -> torch.Tensor:
        """H = X Wᵀ."""
        return batch["x"] @ self.weight().T

    def reconstruct(self, batch: Batch) -> torch.Tensor:
        """X̂ = H W."""
        return self.embed(batch) @ self.weight()

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``recon`` (MSE), ``l1`` on H and ``loss``."""
        h = self.embed(batch)
        recon = F.mse_loss(h @ self.weight(), batch["x"])
        l1 = h.abs().mean()
        return {"recon": recon, "l1": l1, "loss": recon + self.l1 * l1}


def linear_hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Linear-kernel HSIC ``‖ãᵀ b̃‖²_F / (n − 1)²`` of centred ``a`` and ``b`` (0 = independent at second order)."""
    n = a.shape[0]
    a, b = a - a.mean(0), b - b.mean(0)
    return (a.T @ b).pow(2).sum() / max(n - 1, 1) ** 2


def donor_mean_invariance(h: torch.Tensor, donor: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each (cell type, donor) mean of H from its cell type's mean of H.

    Computed for the whole minibatch at once with scatter-adds (no per-group loop).
    """
    n_donors = int(donor.max()) + 1
    group = label * n_donors + donor
    n_groups, n_types = int(group.max()) + 1, int(label.max()) + 1
    ones = torch.ones_like(group, dtype=h.dtype)
    group_n = torch.zeros(n_groups, dtype=h.dtype, device=h.device).index_add_(0, group, ones)
    group_mean = torch.zeros(n_groups, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, group, h) / group_n.clamp_min(1)[:, None]
    type_n = torch.zeros(n_types, dtype=h.dtype, device=h.device).index_add_(0, label, ones)
    type_mean = torch.zeros(n_types, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, label, h) / type_n.clamp_min(1)[:, None]
    present = group_n > 0
    group_type = torch.arange(n_groups, device=h.device) // n_donors
    return (group_mean[present] - type_mean[group_type[present]]).pow(2).sum(1).mean()


class CondAENMFModule(AENMFModule):
    """Donor-conditioned AE-NMF (two formulations; see the module docstring).

    Parameters
    ----------
    n_batches
        Number of donors / batches.
    formulation
        ``offset`` (X̂ = H W + C U) or ``decoder`` (X̂ = H W + H U_d).
    ridge_w, ridge_u
        Ridge penalties on W and on U.
    invariance, hsic
        Weights of the donor-mean invariance (needs labels) and HSIC(H, C) penalties.
    warmup_epochs
        Epochs before the invariance and HSIC penalties switch on.
    """

    def __init__(
        self, n_genes: int, rank: int, n_batches: int, formulation: str = "offset", ridge_w: float = 1e-2, ridge_u: float = 1e-1,
        invariance: float = 1e-3, hsic: float = 5e-4, warmup_epochs: int = 5, l1: float = 0.0, row_normalize: bool = True,
    ) -> None:
        super().__init__(n_genes, rank, l1, row_normalize)
        shape = (n_batches, n_genes) if formulation == "offset" else (n_batches, rank, n_genes)
        self.U = nn.Parameter(torch.full(shape, 1e-3))
        self.n_batches, self.formulation = n_batches, formulation
        self.ridge_w, self.ridge_u, self.invariance, self.hsic, self.warmup_epochs = ridge_w, ridge_u, invariance, hsic, warmup_epochs
        self.epoch = 0

    def nonnegative_parameters(self) -> list[nn.Parameter]:
        """W and the donor offsets U."""
        return [self.W, self.U]

    def condition(self, batch: Batch) -> torch.Tensor:
        """Donor part of the reconstruction (C U, or H U_d)."""
        if self.formulation == "offset":
            return self.U[batch["batch"]]
        return torch.einsum("nk,nkg->ng", self.embed(batch), self.U[batch["batch"]])

    def reconstruct(self, batch: Batch) -> torch.Tensor:
        """Shared plus donor reconstruction."""
        return self.embed(batch) @ self.weight() + self.condition(batch)

    def condition_latent(self, batch: Batch) -> torch.Tensor:
        """H_cond: the donor part projected on the factors, ``(C U or H U_d) Wᵀ``."""
        return self.condition(batch) @ self.weight().T

    def concat_latent(self, batch: Batch) -> torch.Tensor:
        """[H_shared, H_cond]."""
        return torch.cat([self.embed(batch), self.condition_latent(batch)], dim=1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """MSE + ridge(W, U) (+ after warm-up: invariance of donor means within cell types + HSIC(H, C))."""
        h = self.embed(batch)
        recon = F.mse_loss(h @ self.weight() + self.condition(batch), batch["x"])
        ridge = self.ridge_w * self.W.pow(2).sum() + self.ridge_u * self.U.pow(2).sum()
        terms = {"recon": recon, "ridge": ridge}
        total = recon + ridge + self.l1 * h.abs().mean()
        if self.epoch >= self.warmup_epochs:
            onehot = F.one_hot(batch["batch"], self.n_batches).to(h.dtype)
            terms["hsic"] = linear_hsic(h, onehot)
            total = total + self.hsic * terms["hsic"]
            if "label" in batch:
                terms["invariance"] = donor_mean_invariance(h, batch["batch"], batch["label"])
                total = total + self.invariance * terms["invariance"]
        terms["loss"] = total
        return terms


class NonNegativePlan(TrainingPlan):
    """Training plan that projects ``module.nonnegative_parameters()`` onto ≥ 0 after every step."""

    def on_train_epoch_start(self) -> None:
        """Tell the module the epoch (for warm-ups)."""
        super().on_train_epoch_start()
        if hasattr(self.module, "epoch"):
            self.module.epoch = self.current_epoch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Clamp the non-negative parameters."""
        with torch.no_grad():
            for p in self.module.nonnegative_parameters():
                p.clamp_(min=0)
        super().on_train_batch_end(outputs, batch, batch_idx)


class AENMFConfig(ModelConfig):
    """AE-NMF settings."""

    type: str = "aenmf"
    rank: int = Field(20, ge=1)
    l1: float = Field(0.0, ge=0)
    row_normalize: bool = False
    training: dict[str, Any] = Field(default_factory=lambda: {"weight_decay": 1e-4})


class CondAENMFConfig(AENMFConfig):
    """Donor-conditioned AE-NMF settings (published defaults of formulation 1)."""

    type: str = "cond_aenmf"
    formulation: Literal["offset", "decoder"] = "offset"
    row_normalize: bool = True
    ridge_w: float = Field(1e-2, ge=0)
    ridge_u: float = Field(1e-1, ge=0)
    invariance: float = Field(1e-3, ge=0)
    hsic: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    latent: Literal["shared", "cond", "concat"] = "shared"


@register("aenmf")
class AENMF(NeuralModel):
    """Autoencoding NMF: tied non-negative W, H = X Wᵀ."""

    Config = AENMFConfig
    latent_name = "H"

    def size_said(self, n_train: int, n_genes: int) -> str | None:
        """Refuse a rank above the genes."""
        _check_rank(self.config, n_genes)
        return None

    def build_module(self, data: SplitData) -> nn.Module:
        """The tied non-negative autoencoder."""
        _check_nonnegative(data, self.config.type)
        cfg: AENMFConfig = self.config  # type: ignore[assignment]
        torch.manual_seed(self.train_config.seed)
        return AENMFModule(data.n_genes, cfg.rank, cfg.l1, cfg.row_normalize)

    def build_plan(self, module: nn.Module) -> TrainingPlan:
        """Projected (non-negative) AdamW."""
        cfg = self.train_config
        return NonNegativePlan(module, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_decay=cfg.lr_decay)

    def loadings(self) -> np.ndarray:
        """W as genes × K."""
        assert self.module is not None
        return self.module.weight().detach().T.cpu().numpy()


@register("cond_aenmf")
class CondAENMF(AENMF):
    """Donor-conditioned AE-NMF; latent ``H_shared`` (or ``cond`` / ``concat``)."""

    Config = CondAENMFConfig
    uses_batch = True
    batch_aware = True

    def build_module(self, data: SplitData) -> nn.Module:
        """The conditioned autoencoder over this split's donors."""
        _check_nonnegative(data, "cond_aenmf")
        cfg: CondAENMFConfig = self.config  # type: ignore[assignment]
        torch.manual_seed(self.train_config.seed)
        return CondAENMFModule(data.n_genes, cfg.rank, len(data.batch_names), cfg.formulation, cfg.ridge_w, cfg.ridge_u,
                               cfg.invariance, cfg.hsic, cfg.warmup_epochs, cfg.l1, cfg.row_normalize)

    def embed(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """H_shared (default), H_cond or their concatenation."""
        cfg: CondAENMFConfig = self.config  # type: ignore[assignment]
        method = {"shared": "embed", "cond": "condition_latent", "concat": "concat_latent"}[cfg.latent]
        return self.apply(data, rows, method)

"""Cell-type classifiers on log-normalised genes: linear, MLP and TabNet (scTab's three models).

Each is trained with ordinary cross-entropy (``loss: ce``) or hierarchical cross-entropy over
the Cell Ontology (``loss: hce``; needs the split's reachability matrix), with balanced class
weights on the training split, over a softmax (``output: softmax``) or one probability per class
(``output: ovr``, one-vs-rest as scikit-learn's and CellTypist's logistic regression). Defaults
follow scTab (AdamW, StepLR(1, 0.9), gradient-norm clip 1.0; per-model learning rate and weight
decay). The linear model can instead be fitted full-batch (``solver: lbfgs``): L2-regularised
logistic regression solved to convergence by L-BFGS, as scikit-learn fits it, deterministic. With ``ensemble: K`` a classifier is K
networks fitted one after another, each with its own seed and its own draw of the early-stopping
cells from the same training rows; it predicts their mean probability (a deep ensemble,
Lakshminarayanan et al. 2017). They also register as models of ``scatlas run``: their latent is
the representation before the output layer (the members' side by side in an ensemble).
"""

from __future__ import annotations

import operator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pydantic import Field, model_validator
from torch import nn
from scipy.optimize import minimize
from torch.nn import functional as F

from scatlas._threads import Workers, usable_cpus
from scatlas.data.io import row_view
from scatlas.data.loaders import Batch
from scatlas.data.preprocess import gene_moments, within_class_variance
from scatlas.losses import cross_entropy, hierarchical_cross_entropy, one_vs_rest_cross_entropy
from scatlas.data.splits import holdout
from scatlas.models.base import ModelConfig, NeuralModel, SplitData, Widths, register
from scatlas.nn.tabnet import TabNet


class ClassifierModule(nn.Module):
    """A backbone producing class logits, trained with CE or HCE.

    Parameters
    ----------
    backbone
        ``linear``, ``mlp`` or ``tabnet`` network; must provide ``encode(x)`` returning
        ``(representation, sparsity_loss)`` and a ``head`` layer.
    loss
        ``ce`` or ``hce``.
    class_weights
        Per-class weights of the training loss.
    reachability
        Per-source label reachability ``(n_sources, C, C)`` (for ``hce``; not saved with the
        weights: prediction never needs it).
    sparsity_weight
        Weight of TabNet's mask-entropy regulariser.
    output
        ``softmax`` or ``ovr`` (one-vs-rest: a sigmoid per class; :meth:`logits` then returns
        ``log σ(z)``, so their softmax is the per-class probabilities normalised to sum to 1, as
        scikit-learn's one-vs-rest ``predict_proba``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: str = "ce",
        class_weights: torch.Tensor | None = None,
        reachability: torch.Tensor | None = None,
        sparsity_weight: float = 0.0,
        output: str = "softmax",
    ) -> None:
        super().__init__()
        if loss == "hce" and reachability is None:
            raise ValueError("hierarchical cross-entropy needs a reachability matrix (Cell Ontology labels)")
        self.backbone = backbone
        self.loss_kind = loss
        self.register_buffer("class_weights", class_weights)
        self.register_buffer("reachability", reachability, persistent=False)
        self.sparsity_weight = sparsity_weight
        self.output = output

    def embed(self, batch: Batch) -> torch.Tensor:
        """Representation before the output layer."""
        return self.backbone.encode(batch["x"])[0]

    def logits(self, batch: Batch) -> torch.Tensor:
        """Class scores (``log σ(z)`` for a one-vs-rest output)."""
        z = self.backbone.head(self.embed(batch))
        return F.logsigmoid(z) if self.output == "ovr" else z

    def proba(self, batch: Batch) -> torch.Tensor:
        """Softmax probabilities."""
        return F.softmax(self.logits(batch), dim=1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``class`` (CE or HCE, class-weighted in training), ``sparsity`` (TabNet) and ``loss``."""
        h, sparsity = self.backbone.encode(batch["x"])
        ce = self.class_loss(self.backbone.head(h), batch["label"], batch.get("source"))
        terms = {"class": ce, "loss": ce + self.sparsity_weight * sparsity}
        if self.sparsity_weight:
            terms["sparsity"] = sparsity
        return terms

    def class_loss(self, z: torch.Tensor, label: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The classification term on the head's scores ``z`` (class-weighted in training)."""
        weight = self.class_weights if self.training else None
        reachability = self.reachability if self.loss_kind == "hce" else None
        if self.output == "ovr":
            return one_vs_rest_cross_entropy(z, label, reachability, weight, source)
        if reachability is not None:
            return hierarchical_cross_entropy(z, label, reachability, weight, source)
        return cross_entropy(z, label, weight)


class Ensemble(nn.Module):
    """K backbones as one: their representations side by side, their mean probability as the output.

    Parameters
    ----------
    members
        Backbones of one architecture; each has ``encode`` and a linear ``head``.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' representations concatenated, and their mean sparsity loss."""
        encoded = [m.encode(x) for m in self.members]
        return torch.cat([h for h, _ in encoded], dim=1), torch.stack([s for _, s in encoded]).mean()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Log of the members' mean probability (so its softmax is that mean), from the concatenated ``h``."""
        parts = torch.split(h, [m.head.in_features for m in self.members], dim=1)
        logp = torch.stack([F.log_softmax(m.head(part), dim=1) for m, part in zip(self.members, parts, strict=True)])
        return torch.logsumexp(logp, dim=0) - float(np.log(len(self.members)))


class LinearBackbone(nn.Module):
    """One linear layer; the representation is the input itself."""

    def __init__(self, n_in: int, n_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(n_in, n_classes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity representation, no sparsity loss."""
        return x, x.new_zeros(())


class MLPBackbone(nn.Module):
    """``[Linear → BatchNorm → SiLU → Dropout] × len(hidden)`` then a linear head (scTab MLP)."""

    def __init__(self, n_in: int, n_classes: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([n_in, *hidden[:-1]], hidden, strict=True):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.SiLU(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden[-1], n_classes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden representation, no sparsity loss."""
        return self.body(x), x.new_zeros(())


class ClassifierConfig(ModelConfig):
    """Shared classifier settings."""

    loss: Literal["ce", "hce"] = "ce"
    output: Literal["softmax", "ovr"] = "softmax"
    class_weighted: bool = True
    ensemble: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> ClassifierConfig:
        self.check()
        return self

    def check(self) -> None:
        """Refuse settings that contradict each other (a ``ValueError``)."""
        if self.ensemble > 1 and self.output != "softmax":
            raise ValueError("ensemble averages softmax members: it needs output 'softmax'")


class LinearConfig(ClassifierConfig):
    """Linear classifier (scTab: AdamW, lr 5e-4, weight decay 0.01), or logistic regression fitted full-batch.

    Attributes
    ----------
    solver
        ``adam``: minibatches through the training engine (streams from disk). ``lbfgs``: the
        whole reference at once, L-BFGS to convergence (the reference in memory; deterministic,
        so no seed or ensemble; it fits ``train`` only and needs no early-stopping cells, which
        stay held out: ``annotate`` sets its hierarchical-call threshold on them).
    C
        ``lbfgs``: inverse strength of the L2 penalty, as scikit-learn's ``C`` (the objective is
        the class-weighted mean loss plus ``‖W‖² / (2 C n)`` over ``n`` cells; intercepts are
        not penalised).
    gene_scale
        ``lbfgs``: each gene is divided by its standard deviation on the fitted cells to this
        power before the penalty applies (0: none; 1: unit variance as CellTypist's scaling);
        the saved weights act on the unscaled genes.
    gene_scale_by
        ``lbfgs``: that standard deviation over all fitted cells (``total``), or pooled within
        their classes (``within``: the noise inside each class, not the differences between
        them, as linear discriminant analysis scales).
    max_iter, tol
        ``lbfgs``: most iterations; stop when the largest gradient component is below ``tol``
        (scikit-learn's defaults: 1e-4, on the mean loss).
    """

    type: str = "linear"
    training: dict[str, Any] = Field(default_factory=lambda: {"lr": 5e-4, "weight_decay": 0.01, "lr_decay": 0.9, "gradient_clip": 1.0})
    solver: Literal["adam", "lbfgs"] = "adam"
    C: float = Field(1.0, gt=0)
    gene_scale: float = Field(0.0, ge=0, le=1)
    gene_scale_by: Literal["total", "within"] = "total"
    max_iter: int = Field(1000, ge=1)
    tol: float = Field(1e-4, gt=0)

    def check(self) -> None:
        """Also: the ``lbfgs`` fields only with that solver (a saved model's dump repeats their defaults), and no ensemble of identical full-batch fits."""
        given = sorted(k for k in ("C", "gene_scale", "gene_scale_by", "max_iter", "tol") if getattr(self, k) != type(self).model_fields[k].default)
        if self.solver == "adam" and given:
            raise ValueError(f"{', '.join(given)}: only for solver 'lbfgs'")
        if self.solver == "lbfgs" and self.ensemble > 1:
            raise ValueError("solver 'lbfgs' is deterministic: its ensemble members would be identical (use ensemble 1, or the mlp method)")
        super().check()


class MLPConfig(ClassifierConfig):
    """MLP classifier (scTab: 8 × 128 hidden, dropout 0.1, lr 2e-3, weight decay 0.05)."""

    type: str = "mlp"
    hidden: Widths = Field(default_factory=lambda: [128] * 8)
    dropout: float = Field(0.1, ge=0, lt=1)
    training: dict[str, Any] = Field(default_factory=lambda: {"lr": 2e-3, "weight_decay": 0.05, "lr_decay": 0.9, "gradient_clip": 1.0})


class TabNetConfig(ClassifierConfig):
    """TabNet classifier (scTab: n_d 128, n_a 64, 1 step, γ 1.3, virtual batch 256, entmax, λ 1e-5; lr 5e-3, wd 0.05)."""

    type: str = "tabnet"
    n_d: int = Field(128, ge=1)
    n_a: int = Field(64, ge=1)
    n_steps: int = Field(1, ge=1)
    gamma: float = Field(1.3, ge=1)
    virtual_batch_size: int = Field(256, ge=2)
    mask: Literal["entmax", "sparsemax"] = "entmax"
    sparsity_weight: float = Field(1e-5, ge=0)
    training: dict[str, Any] = Field(default_factory=lambda: {"lr": 5e-3, "weight_decay": 0.05, "lr_decay": 0.9, "gradient_clip": 1.0})


class CellTypeClassifier(NeuralModel):
    """Base of the three classifiers: builds the module and predicts probabilities."""

    needs_labels = True
    latent_name = "latent"

    @property
    def full_batch(self) -> bool:
        """Whether the fit is full-batch and deterministic (cheap to repeat on more cells, no early stopping)."""
        return False

    def backbone(self, n_in: int, n_classes: int) -> nn.Module:
        """The network for ``n_in`` genes and ``n_classes`` classes."""
        raise NotImplementedError

    def build_module(self, data: SplitData) -> ClassifierModule:
        """Classifier over this split's genes and labels."""
        cfg: ClassifierConfig = self.config  # type: ignore[assignment]
        assert data.label_names is not None
        weights = torch.as_tensor(data.class_weights(), dtype=torch.float32) if cfg.class_weighted else None
        R = data.label_reachability if data.label_reachability is not None else data.reachability
        R = torch.as_tensor(R) if R is not None else None
        if cfg.loss == "hce" and R is None:
            from scatlas._errors import ConfigError

            raise ConfigError(f"{cfg.type}: loss 'hce' needs Cell Ontology labels (set an ontology key)")
        members = [self.backbone(data.n_genes, len(data.label_names)) for _ in range(cfg.ensemble)]
        return ClassifierModule(members[0] if cfg.ensemble == 1 else Ensemble(members), cfg.loss, weights, R, getattr(cfg, "sparsity_weight", 0.0), cfg.output)

    def fit(self, data: SplitData, checkpoint_dir: Path | None = None, resume: bool = False) -> pd.DataFrame:
        """Train one network, or the ``ensemble`` members one after another; returns the epoch history.

        Member ``k`` trains with seed ``seed + k``; member 0 early-stops on ``data.val``, every other
        member on its own draw of as many cells from ``data.train`` ∪ ``data.val`` (stratified by
        label where every class allows it). The history gets a ``member`` column, and each member
        checkpoints to ``checkpoint_dir / member_<k>``.
        """
        cfg: ClassifierConfig = self.config  # type: ignore[assignment]
        if cfg.ensemble == 1:
            return super().fit(data, checkpoint_dir, resume)
        members, histories = [], []
        for k in range(cfg.ensemble):
            member = type(self)(cfg.model_copy(update={"ensemble": 1}), replace(self.train_config, seed=self.train_config.seed + k))
            history = member.fit(data if k == 0 else redraw_val(data, self.train_config.seed + k), checkpoint_dir / f"member_{k}" if checkpoint_dir else None, resume)
            histories.append(history.assign(member=k))
            members.append(member)
        module = self.build_module(data)
        for into, member in zip(module.backbone.members, members, strict=True):
            into.load_state_dict(member.module.backbone.state_dict())
        self.plan, self.module = None, module.to(next(members[0].module.parameters()).device)
        return pd.concat(histories, ignore_index=True)

    def covariates(self, data: SplitData) -> dict[str, np.ndarray]:
        """Batch and label codes, and each cell's source when the labels' meaning depends on it (HCE)."""
        cov = super().covariates(data)
        if data.source is not None:
            cov["source"] = data.source
        return cov

    def predict_proba(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), n_classes)`` softmax probabilities."""
        return self.apply(data, rows, "proba")

    def predict_logits(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), n_classes)`` class scores (for calibration)."""
        return self.apply(data, rows, "logits")


def redraw_val(data: SplitData, seed: int) -> SplitData:
    """``data`` with ``len(data.val)`` early-stopping cells drawn afresh from its training and validation rows."""
    if not len(data.val):
        return data
    rows = np.concatenate([data.train, data.val])
    train, val = holdout(rows, len(data.val), seed, None if data.label is None else data.label[rows])
    return replace(data, train=np.sort(train), val=np.sort(val))


@register("linear")
class LinearClassifier(CellTypeClassifier):
    """Linear cell-type classifier on log-normalised genes."""

    Config = LinearConfig

    def backbone(self, n_in: int, n_classes: int) -> nn.Module:
        """One linear layer."""
        return LinearBackbone(n_in, n_classes)

    @property
    def full_batch(self) -> bool:
        """``solver: lbfgs``."""
        return self.config.solver == "lbfgs"  # type: ignore[attr-defined]

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The fitted head's ``(weight, bias)`` (float64): where a fit of the same labels on the same genes starts (:meth:`fit`'s ``start``)."""
        head = self.module.backbone.head
        return head.weight.detach().double().numpy(), head.bias.detach().double().numpy()

    def fit(self, data: SplitData, checkpoint_dir: Path | None = None, resume: bool = False,
            start: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
        """Train through the engine (``solver: adam``) or full-batch (``lbfgs``, :func:`fit_lbfgs`, from ``start`` when given); returns the history."""
        cfg: LinearConfig = self.config  # type: ignore[assignment]
        if cfg.solver == "adam":
            if start is not None:
                raise ValueError("linear: a starting point applies to solver 'lbfgs' only")
            return super().fit(data, checkpoint_dir, resume)
        if not isinstance(data.X, sp.spmatrix):
            from scatlas._errors import ConfigError

            raise ConfigError("linear: solver 'lbfgs' needs the reference in memory (it is streamed from disk): "
                              "use the mlp method, or solver 'adam', for a streamed reference")
        self.module = self.build_module(data)
        self.plan = None
        return fit_lbfgs(self.module, data, cfg.C, cfg.gene_scale, cfg.max_iter, cfg.tol, start, cfg.gene_scale_by)


PARALLEL_VALUES = 1 << 22
"""Stored values from which :func:`fit_lbfgs` splits its matrix products over threads (:class:`RowBlocks`); below,
one SciPy product each (a reference of a few thousand cells: thread hand-overs would cost more than they save)."""


class RowBlocks:
    """A CSR matrix's rows in :attr:`N_BLOCKS` fixed blocks whose products run on worker threads (SciPy's sparse
    products release the GIL).

    ``X @ V`` gives the bits of one SciPy product (each row's own); ``X.T @ G`` sums the blocks'
    products in block order, so its bits depend on the number of blocks, never on the number of
    threads. 1M cells × 1,000 genes (115M stored values) and 4 classes on 2 cores: 2.6× and 2× faster.
    """

    N_BLOCKS = 8
    _workers: Workers | None = None

    def __init__(self, X: sp.csr_matrix) -> None:
        edges = np.linspace(0, X.shape[0], self.N_BLOCKS + 1).astype(int)
        self.edges = list(zip(edges[:-1], edges[1:], strict=True))
        self.blocks = [row_view(X, a, b) for a, b in self.edges]
        self.transposed = [row_view(X, a, b, transposed=True) for a, b in self.edges]
        if RowBlocks._workers is None:
            RowBlocks._workers = Workers(min(self.N_BLOCKS, usable_cpus()), "scatlas-products")

    def dot(self, V: np.ndarray) -> np.ndarray:
        """``X @ V``."""
        assert self._workers is not None
        return np.vstack(self._workers.run([partial(operator.matmul, block, V) for block in self.blocks]))

    def tdot(self, G: np.ndarray) -> np.ndarray:
        """``X.T @ G``."""
        assert self._workers is not None
        parts = self._workers.run([partial(operator.matmul, block, G[a:b]) for block, (a, b) in zip(self.transposed, self.edges, strict=True)])
        total = parts[0]
        for part in parts[1:]:
            total += part
        return total


def fit_lbfgs(module: ClassifierModule, data: SplitData, C: float, gene_scale: float, max_iter: int, tol: float,
              start: tuple[np.ndarray, np.ndarray] | None = None, scale_by: Literal["total", "within"] = "total") -> pd.DataFrame:
    """Fit ``module``'s linear head on the cells ``data.train`` full-batch by L-BFGS (scipy's L-BFGS-B, float64).

    Minimises ``module.class_loss(X (s ∘ W) + b)`` (the class-weighted mean of CE, HCE or their
    one-vs-rest forms) ``+ ‖W‖² / (2 C n)``, where ``s`` divides each gene by its standard
    deviation on those cells (``scale_by``: over all of them, or pooled within their classes,
    :func:`~scatlas.data.preprocess.within_class_variance`) to the power ``gene_scale``; the head gets ``s ∘ W`` and ``b``. The
    matrix products run in scipy (on threads over fixed row blocks from :data:`PARALLEL_VALUES` stored values), the loss
    and its gradient with respect to the scores in torch, so the fit is deterministic on a CPU. Stops as scikit-learn's ``lbfgs`` solver does
    (projected gradient below ``tol``, or no relative progress). The search starts from zero, or
    from ``start``: a head's ``(weight, bias)`` (``(n_classes, n_genes)`` and ``(n_classes,)``),
    e.g. a fit of the same problem on fewer cells (the default
    transfer's refit on every reference cell then takes about a third of a cold fit's iterations).

    Returns
    -------
    One row per iteration: ``epoch``, ``train_loss`` (the objective) and ``train_class`` (its loss term).
    """
    every = len(data.train) == data.X.shape[0] and bool((data.train == np.arange(len(data.train))).all())  # the refit: no row copy
    X = sp.csr_matrix(data.X if every else data.X[data.train], dtype=np.float64)  # cast once: SciPy would cast a float32 copy for every product (a third of a step)
    label = torch.as_tensor(data.label[data.train], dtype=torch.long)
    source = data.sources_of(data.train)
    source = None if source is None else torch.as_tensor(source, dtype=torch.long)
    n, n_genes = X.shape
    n_classes = module.backbone.head.out_features
    var = gene_moments(X)[1] if scale_by == "total" else within_class_variance(X, data.label[data.train])
    scale = np.where(var > 0, var, 1.0) ** (-gene_scale / 2)
    module.train()
    terms: dict[str, float] = {}
    x0 = np.zeros(n_genes * n_classes + n_classes)
    if start is not None:  # the head holds s ∘ W
        x0 = np.concatenate([(np.asarray(start[0], dtype=np.float64).T / scale[:, None]).ravel(), np.asarray(start[1], dtype=np.float64)])

    blocks = RowBlocks(X) if X.nnz >= PARALLEL_VALUES else None
    dot = X.__matmul__ if blocks is None else blocks.dot
    tdot = X.T.__matmul__ if blocks is None else blocks.tdot

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = theta[: n_genes * n_classes].reshape(n_genes, n_classes), theta[n_genes * n_classes :]
        z = torch.from_numpy(dot(scale[:, None] * W) + b).requires_grad_()
        loss = module.class_loss(z, label, source)
        loss.backward()
        grad_z = z.grad.numpy()
        terms["class"] = loss.item()
        terms["loss"] = terms["class"] + float((W * W).sum()) / (2 * C * n)
        grad_W = scale[:, None] * tdot(grad_z) + W / (C * n)
        return terms["loss"], np.concatenate([grad_W.ravel(), grad_z.sum(0)])

    rows: list[dict[str, float]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loss sees (cells × classes) scores: torch's thread pool only waits for scipy's single thread (2.6× slower on 2 cores)
    try:
        result = minimize(objective, x0, jac=True, method="L-BFGS-B",
                          callback=lambda _: rows.append({"epoch": float(len(rows)), "train_loss": terms["loss"], "train_class": terms["class"]}),
                          options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    finally:
        torch.set_num_threads(threads)
    W, b = result.x[: n_genes * n_classes].reshape(n_genes, n_classes), result.x[n_genes * n_classes :]
    with torch.no_grad():
        module.backbone.head.weight.copy_(torch.from_numpy((scale[:, None] * W).T))
        module.backbone.head.bias.copy_(torch.from_numpy(b))
    module.eval()
    return pd.DataFrame(rows, columns=["epoch", "train_loss", "train_class"])


@register("mlp")
class MLPClassifier(CellTypeClassifier):
    """MLP cell-type classifier (scTab architecture)."""

    Config = MLPConfig

    def backbone(self, n_in: int, n_classes: int) -> nn.Module:
        """The MLP."""
        cfg: MLPConfig = self.config  # type: ignore[assignment]
        return MLPBackbone(n_in, n_classes, cfg.hidden, cfg.dropout)


@register("tabnet")
class TabNetClassifier(CellTypeClassifier):
    """TabNet cell-type classifier (attentive feature selection)."""

    Config = TabNetConfig

    def backbone(self, n_in: int, n_classes: int) -> nn.Module:
        """TabNet."""
        cfg: TabNetConfig = self.config  # type: ignore[assignment]
        return TabNet(n_in, n_classes, cfg.n_d, cfg.n_a, cfg.n_steps, cfg.gamma, virtual_batch_size=cfg.virtual_batch_size, mask=cfg.mask)

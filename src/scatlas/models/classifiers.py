"""Cell-type classifiers on log-normalised genes: linear, MLP and TabNet (scTab's three models).

Each is trained with ordinary cross-entropy (``loss: ce``) or hierarchical cross-entropy over
the Cell Ontology (``loss: hce``; needs the split's reachability matrix), with balanced class
weights on the training split. Defaults follow scTab (AdamW, StepLR(1, 0.9), gradient-norm
clip 1.0; per-model learning rate and weight decay). With ``ensemble: K`` a classifier is K
networks fitted one after another, each with its own seed and its own draw of the early-stopping
cells from the same training rows; it predicts their mean probability (a deep ensemble,
Lakshminarayanan et al. 2017). They also register as models of ``scatlas run``: their latent is
the representation before the output layer (the members' side by side in an ensemble).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from scatlas.data.loaders import Batch
from scatlas.losses import cross_entropy, hierarchical_cross_entropy
from scatlas.data.splits import holdout
from scatlas.models.base import ModelConfig, NeuralModel, SplitData, register
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
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: str = "ce",
        class_weights: torch.Tensor | None = None,
        reachability: torch.Tensor | None = None,
        sparsity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if loss == "hce" and reachability is None:
            raise ValueError("hierarchical cross-entropy needs a reachability matrix (Cell Ontology labels)")
        self.backbone = backbone
        self.loss_kind = loss
        self.register_buffer("class_weights", class_weights)
        self.register_buffer("reachability", reachability, persistent=False)
        self.sparsity_weight = sparsity_weight

    def embed(self, batch: Batch) -> torch.Tensor:
        """Representation before the output layer."""
        return self.backbone.encode(batch["x"])[0]

    def logits(self, batch: Batch) -> torch.Tensor:
        """Class scores."""
        return self.backbone.head(self.embed(batch))

    def proba(self, batch: Batch) -> torch.Tensor:
        """Softmax probabilities."""
        return F.softmax(self.logits(batch), dim=1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``class`` (CE or HCE, class-weighted in training), ``sparsity`` (TabNet) and ``loss``."""
        h, sparsity = self.backbone.encode(batch["x"])
        logits = self.backbone.head(h)
        weight = self.class_weights if self.training else None
        if self.loss_kind == "hce":
            ce = hierarchical_cross_entropy(logits, batch["label"], self.reachability, weight, batch.get("source"))
        else:
            ce = cross_entropy(logits, batch["label"], weight)
        terms = {"class": ce, "loss": ce + self.sparsity_weight * sparsity}
        if self.sparsity_weight:
            terms["sparsity"] = sparsity
        return terms


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
    class_weighted: bool = True
    ensemble: int = Field(1, ge=1)


class LinearConfig(ClassifierConfig):
    """Linear classifier (scTab: lr 5e-4, weight decay 0.01)."""

    type: str = "linear"
    training: dict[str, Any] = Field(default_factory=lambda: {"lr": 5e-4, "weight_decay": 0.01, "lr_decay": 0.9, "gradient_clip": 1.0})


class MLPConfig(ClassifierConfig):
    """MLP classifier (scTab: 8 × 128 hidden, dropout 0.1, lr 2e-3, weight decay 0.05)."""

    type: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128] * 8)
    dropout: float = Field(0.1, ge=0, lt=1)
    training: dict[str, Any] = Field(default_factory=lambda: {"lr": 2e-3, "weight_decay": 0.05, "lr_decay": 0.9, "gradient_clip": 1.0})


class TabNetConfig(ClassifierConfig):
    """TabNet classifier (scTab: n_d 128, n_a 64, 1 step, γ 1.3, virtual batch 256, entmax, λ 1e-5; lr 5e-3, wd 0.05)."""

    type: str = "tabnet"
    n_d: int = 128
    n_a: int = 64
    n_steps: int = Field(1, ge=1)
    gamma: float = 1.3
    virtual_batch_size: int = 256
    mask: Literal["entmax", "sparsemax"] = "entmax"
    sparsity_weight: float = 1e-5
    training: dict[str, Any] = Field(default_factory=lambda: {"lr": 5e-3, "weight_decay": 0.05, "lr_decay": 0.9, "gradient_clip": 1.0})


class CellTypeClassifier(NeuralModel):
    """Base of the three classifiers: builds the module and predicts probabilities."""

    needs_labels = True
    latent_name = "latent"

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
        return ClassifierModule(members[0] if cfg.ensemble == 1 else Ensemble(members), cfg.loss, weights, R, getattr(cfg, "sparsity_weight", 0.0))

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

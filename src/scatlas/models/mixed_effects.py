"""The scMEDAL family: mixed-effects deep autoencoders.

Fixed effects (biology shared by all batches) and random effects (what each batch adds):

* **scMEDAL-FE** (``fe``) — the AE backbone plus an adversary that reads the latent (published:
  the concatenated encoder activations 512 + 132 + latent) through Dense 512 → 132 → softmax over
  batches; the decoder also reads the one-hot batch (published: it does not). ``published: true``
  restores the published configuration (see :class:`FEConfig`).
  Each minibatch: (a) one adversary step on CE(batch) with the encoder frozen; (b) one
  autoencoder step on ``w_r·MSE − w_g·CE_adversary`` with the adversary frozen (two Adam
  optimisers). ``adversary: reversal`` replaces the alternation by a gradient-reversal layer.
* **scMEDAL-FEC** (``fec``) — FE plus a cell-type head on the latent (``+ w_c·CE``).
* **scMEDAL-RE** (``re``) — inputs (x, one-hot batch z); every hidden layer is followed by
  ``BN(h)·(1 + γ(z)) + β(z)`` with batch-specific variational weights (prior N(0, 0.25²),
  one sample per training pass, posterior mean at inference); a batch head on the latent
  with *positive* CE makes the latent capture batch. Loss ``110·MSE + w_b·CE + w_kl·KL``.
  Counterfactual reconstructions set z = e_b for every cell (encoder and decoder).

The validation ``loss`` logged (and watched by early stopping) is the published objective of
each model, so early stopping works for every member of the family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from scatlas.data.loaders import Batch
from scatlas.models.autoencoder import AE, AEConfig, AutoencoderModule
from scatlas.models.base import ModelConfig, NeuralModel, SplitData, Widths, register, steps_per_epoch
from scatlas.nn.blocks import ACTIVATIONS, DenseStack
from scatlas.nn.variational import RandomEffectBlock, grad_reverse
from scatlas.train import TrainingPlan, adam


class FixedEffectsModule(AutoencoderModule):
    """Autoencoder whose latent is made batch-invariant by an adversarial batch classifier.

    Parameters
    ----------
    n_batches
        Number of batches the adversary predicts.
    adversary_hidden
        Hidden widths of the adversary.
    adversary_weight
        ``w_g``: weight of the adversary's CE subtracted from the autoencoder objective.
    **kwargs
        :class:`~scatlas.models.autoencoder.AutoencoderModule` arguments.
    """

    def __init__(
        self,
        n_batches: int,
        adversary_hidden: Sequence[int] = (512, 132),
        adversary_weight: float = 1.0,
        adversary_input: str = "all",
        encoder_objective: str = "negative_ce",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        widths = [lin.out_features for lin in self.encoder.linears]
        width = sum(widths) if adversary_input == "all" else widths[-1]
        self.adversary = DenseStack([width, *adversary_hidden, n_batches], activation="selu", batch_norm=False)
        self.adversary_weight = adversary_weight
        self.adversary_input = adversary_input
        self.encoder_objective = encoder_objective

    def encode_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Latent and the activations the adversary reads (all encoder layers, or the latent only)."""
        z, hidden = self.encoder(x, return_hidden=True)  # type: ignore[misc]
        return z, (hidden if self.adversary_input == "all" else [z])

    def adversary_logits(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Batch logits of the adversary."""
        return self.adversary(torch.cat(hidden, dim=1))

    def adversary_ce(self, hidden: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Cross-entropy of the adversary predicting the batch from the encoder activations."""
        return F.cross_entropy(self.adversary_logits(hidden), batch["batch"])

    def fooling_term(self, hidden: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """What the encoder minimises against the adversary.

        ``negative_ce`` (published): ``−CE(adversary, batch)``; its gradient vanishes once the
        adversary is confident. ``confusion``: CE of the adversary against uniform batch
        probabilities (Tzeng et al. 2015), which keeps a gradient until the batches are mixed.
        """
        logits = self.adversary_logits(hidden)
        if self.encoder_objective == "confusion":
            return -F.log_softmax(logits, dim=1).mean(dim=1).mean()
        return -F.cross_entropy(logits, batch["batch"])

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``recon``, ``class`` (FEC), ``adversary`` (its CE) and the autoencoder objective ``loss = w_r·recon + w_c·class + w_g·fooling``."""
        z, hidden = self.encode_all(batch["x"])
        terms, total = self.supervised_terms(batch, z)
        terms["adversary"] = self.adversary_ce(hidden, batch)
        terms["loss"] = total + self.adversary_weight * self.fooling_term(hidden, batch)
        return terms


class AdversarialPlan(TrainingPlan):
    """Training plan of FE/FEC: two optimisers alternating per minibatch, or gradient reversal.

    Parameters
    ----------
    module
        A :class:`FixedEffectsModule`.
    lr, weight_decay
        Optimiser settings (both optimisers).
    mode
        ``alternating`` (published: adversary step, then autoencoder step) or ``reversal``.
    """

    module: FixedEffectsModule

    def __init__(self, module: FixedEffectsModule, lr: float = 1e-4, weight_decay: float = 0.0, mode: str = "alternating") -> None:
        super().__init__(module, lr, weight_decay)
        self.mode = mode
        self.automatic_optimization = mode == "reversal"

    def _adam(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return adam(params, self.lr, self.weight_decay, decoupled=False)

    def configure_optimizers(self) -> Any:
        """One optimiser (reversal) or [autoencoder, adversary] (alternating)."""
        if self.mode == "reversal":
            return super().configure_optimizers()
        adversary = list(self.module.adversary.parameters())
        ids = {id(p) for p in adversary}
        return [self._adam([p for p in self.module.parameters() if id(p) not in ids]), self._adam(adversary)]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        """(a) adversary step with the encoder frozen; (b) autoencoder step with the adversary frozen."""
        n = batch["x"].shape[0]
        if self.mode == "reversal":
            z, hidden = self.module.encode_all(batch["x"])
            terms, total = self.module.supervised_terms(batch, z)
            terms["adversary"] = self.module.adversary_ce([grad_reverse(h) for h in hidden], batch)
            train_loss = total + self.module.adversary_weight * terms["adversary"]
            terms["loss"] = total - self.module.adversary_weight * terms["adversary"].detach()
            self._log_terms("train", terms, n)
            return train_loss
        opt_ae, opt_adv = self.optimizers()  # type: ignore[misc]
        with torch.no_grad():
            _, hidden = self.module.encode_all(batch["x"])
        adversary_loss = self.module.adversary_ce(hidden, batch)
        opt_adv.zero_grad()
        self.manual_backward(adversary_loss)
        opt_adv.step()
        self.module.adversary.requires_grad_(False)
        try:
            terms = self.module.loss(batch)
            opt_ae.zero_grad()
            self.manual_backward(terms["loss"])
            opt_ae.step()
        finally:
            self.module.adversary.requires_grad_(True)
        terms["adversary_step"] = adversary_loss
        self._log_terms("train", terms, n)
        return None


PUBLISHED_FE = {"encoder_objective": "negative_ce", "adversary_input": "all", "adversary_weight": 1.0, "decoder_batch": False}
#: Fewest minibatches without improvement before FE stops early, and fewest minibatches it may train (see ``ScMEDALFE.sized_training``).
PATIENCE_STEPS, MIN_STEPS = 500, 3000


class FEConfig(AEConfig):
    """scMEDAL-FE / FEC hyper-parameters.

    The defaults were chosen by ``benchmarks/integration_quality.py`` on five multi-batch datasets
    (see the README): a 20-d latent, the decoder reads the batch, the adversary reads the latent only,
    with weight 10 and the confusion objective, minibatches of 128, patience and epoch budget counted
    in minibatches (:meth:`ScMEDALFE.sized_training`). ``published: true`` gives scMEDAL's published
    configuration (−CE objective, adversary on every encoder layer, weight 1, a decoder blind to the
    batch, a 50-d latent unless set); it refuses a conflicting value of the other fields.
    """

    type: str = "fe"
    latent_dim: int = Field(20, ge=1)
    recon_weight: float = Field(2000.0, gt=0)
    class_weight: float = Field(1.0, ge=0)
    adversary_weight: float = Field(10.0, ge=0)
    adversary_hidden: Widths = Field(default_factory=lambda: [512, 132])
    adversary: Literal["alternating", "reversal"] = "alternating"
    adversary_input: Literal["all", "latent"] = "latent"
    encoder_objective: Literal["negative_ce", "confusion"] = "confusion"
    decoder_batch: bool = True
    published: bool = False

    @model_validator(mode="before")
    @classmethod
    def _published(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not values.get("published"):
            return values
        conflicts = {k: values[k] for k, v in PUBLISHED_FE.items() if k in values and values[k] != v}
        if conflicts:
            raise ValueError(f"published: true sets {PUBLISHED_FE}; conflicting values given: {conflicts}")
        return {"latent_dim": 50, **values, **PUBLISHED_FE}  # the published 50-d latent unless the user sets another


@register("fe")
class ScMEDALFE(AE):
    """scMEDAL-FE: autoencoder with an adversarial batch classifier (batch-invariant latent)."""

    Config = FEConfig
    batch_aware = True

    def training_defaults(self) -> dict[str, Any]:
        """Minibatches of 128 (measured: more adversarial steps per epoch mix better), except in the published configuration."""
        return {} if self.config.published else {"batch_size": 128}  # type: ignore[attr-defined]

    def sized_training(self, n_train: int) -> dict[str, Any]:
        """Patience and epoch budget counted in optimisation steps, so small data get as many adversarial steps as large.

        Early stopping waits at least :data:`PATIENCE_STEPS` minibatches (and 10 epochs) without a
        better validation loss, and training may run :data:`MIN_STEPS` minibatches (and 100 epochs):
        on a few hundred cells an epoch is 3-10 steps, and the latent keeps mixing long after the
        reconstruction has settled. Measured by ``benchmarks/integration_quality.py`` on five datasets;
        the published configuration keeps the plain epoch counts.
        """
        if self.config.published:  # type: ignore[attr-defined]
            return {}
        cfg = self.train_config
        steps = steps_per_epoch(n_train, cfg.batch_size)
        return {"patience": max(cfg.patience, math.ceil(PATIENCE_STEPS / steps)), "max_epochs": max(cfg.max_epochs, math.ceil(MIN_STEPS / steps))}

    def build_module(self, data: SplitData) -> FixedEffectsModule:
        """Autoencoder + adversary over this split's batches."""
        cfg: FEConfig = self.config  # type: ignore[assignment]
        return FixedEffectsModule(
            len(data.batch_names), cfg.adversary_hidden, cfg.adversary_weight, cfg.adversary_input, cfg.encoder_objective, **self.module_kwargs(data)
        )

    def build_plan(self, module: nn.Module) -> TrainingPlan:
        """The adversarial plan (alternating or gradient reversal)."""
        cfg: FEConfig = self.config  # type: ignore[assignment]
        return AdversarialPlan(module, self.train_config.lr, self.train_config.weight_decay, cfg.adversary)  # type: ignore[arg-type]


@register("fec")
class ScMEDALFEC(ScMEDALFE):
    """scMEDAL-FEC: scMEDAL-FE with a cell-type head on the latent."""

    Config = FEConfig
    needs_labels = True

    def n_labels(self, data: SplitData) -> int:
        """Number of cell types."""
        assert data.label_names is not None
        return len(data.label_names)


class RandomEffectsModule(nn.Module):
    """Autoencoder with batch-specific random-effects blocks after every hidden layer.

    Parameters
    ----------
    n_genes, n_batches
        Input width and number of batches (width of the one-hot z).
    hidden, latent_dim
        Encoder widths (the decoder mirrors them, untied).
    activation, latent_activation
        Activations.
    prior_sd
        Prior standard deviation of the random effects.
    recon_weight, batch_weight, kl_weight
        Loss weights: ``recon_weight·MSE + batch_weight·CE(batch) + kl_weight·KL``.
    """

    def __init__(
        self,
        n_genes: int,
        n_batches: int,
        hidden: Sequence[int] = (512, 132),
        latent_dim: int = 50,
        activation: str = "selu",
        latent_activation: str = "selu",
        prior_sd: float = 0.25,
        recon_weight: float = 110.0,
        batch_weight: float = 0.2,
        kl_weight: float = 1e-5,
    ) -> None:
        super().__init__()
        enc, dec = [n_genes, *hidden], [latent_dim, *reversed(hidden)]
        self.enc_linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(enc[:-1], enc[1:], strict=True))
        self.enc_re = nn.ModuleList(RandomEffectBlock(b, n_batches, prior_sd) for b in enc[1:])
        self.to_latent = nn.Linear(enc[-1], latent_dim)
        self.dec_linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec[:-1], dec[1:], strict=True))
        self.dec_re = nn.ModuleList(RandomEffectBlock(b, n_batches, prior_sd) for b in dec[1:])
        self.to_output = nn.Linear(dec[-1], n_genes)
        self.batch_head = nn.Linear(latent_dim, n_batches)
        self.act = ACTIVATIONS[activation]()
        self.latent_act = ACTIVATIONS[latent_activation]()
        self.n_batches = n_batches
        self.recon_weight, self.batch_weight, self.kl_weight = recon_weight, batch_weight, kl_weight

    def onehot(self, batch: Batch, code: int | None = None) -> torch.Tensor:
        """One-hot batch of the cells, or of batch ``code`` for every cell (counterfactual)."""
        codes = batch["batch"] if code is None else torch.full_like(batch["batch"], code)
        return F.one_hot(codes, self.n_batches).to(batch["x"].dtype)

    def _encode(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for linear, re in zip(self.enc_linears, self.enc_re, strict=True):
            x = self.act(re(linear(x), z))
        return self.latent_act(self.to_latent(x))

    def _decode(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for linear, re in zip(self.dec_linears, self.dec_re, strict=True):
            u = self.act(re(linear(u), z))
        return self.to_output(u)

    def kl(self) -> torch.Tensor:
        """Sum of the KL terms of every random-effects block."""
        return torch.stack([block.kl() for block in [*self.enc_re, *self.dec_re]]).sum()

    def embed(self, batch: Batch) -> torch.Tensor:
        """Random-effects latent (captures batch)."""
        return self._encode(batch["x"], self.onehot(batch))

    def reconstruct(self, batch: Batch) -> torch.Tensor:
        """Reconstruction with each cell's own batch."""
        z = self.onehot(batch)
        return self._decode(self._encode(batch["x"], z), z)

    def counterfactual(self, batch: Batch, code: int) -> torch.Tensor:
        """Reconstruction of every cell as if it came from batch ``code`` (encoder and decoder)."""
        z = self.onehot(batch, code)
        return self._decode(self._encode(batch["x"], z), z)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``recon`` (MSE), ``batch`` (CE of the batch head), ``kl`` and the weighted ``loss``."""
        z = self.onehot(batch)
        u = self._encode(batch["x"], z)
        recon = F.mse_loss(self._decode(u, z), batch["x"])
        ce = F.cross_entropy(self.batch_head(u), batch["batch"])
        kl = self.kl()
        loss = self.recon_weight * recon + self.batch_weight * ce + self.kl_weight * kl
        return {"recon": recon, "batch": ce, "kl": kl, "loss": loss}


class REConfig(ModelConfig):
    """scMEDAL-RE hyper-parameters (published defaults)."""

    type: str = "re"
    hidden: Widths = Field(default_factory=lambda: [512, 132])
    latent_dim: int = Field(50, ge=1)
    activation: str = "selu"
    latent_activation: str = "selu"
    prior_sd: float = Field(0.25, gt=0)
    recon_weight: float = Field(110.0, gt=0)
    batch_weight: float = Field(0.2, ge=0)
    kl_weight: float = Field(1e-5, ge=0)


@register("re")
class ScMEDALRE(NeuralModel):
    """scMEDAL-RE: batch-specific Bayesian random effects; counterfactual batch reconstructions."""

    Config = REConfig
    latent_name = "latent"
    uses_batch = True
    batch_aware = True

    def build_module(self, data: SplitData) -> RandomEffectsModule:
        """RE autoencoder over this split's batches."""
        cfg: REConfig = self.config  # type: ignore[assignment]
        return RandomEffectsModule(
            data.n_genes, len(data.batch_names), cfg.hidden, cfg.latent_dim, cfg.activation, cfg.latent_activation,
            cfg.prior_sd, cfg.recon_weight, cfg.batch_weight, cfg.kl_weight,
        )

    def counterfactuals(self, data: SplitData, rows: np.ndarray) -> dict[str, np.ndarray]:
        """For every batch b (in ``data.batch_names`` order), all cells reconstructed as if from b."""
        return {name: self.counterfactual(data, rows, name) for name in data.batch_names}

    def counterfactual(self, data: SplitData, rows: np.ndarray, batch: str) -> np.ndarray:
        """The cells ``rows`` reconstructed as if they came from ``batch`` (one of ``data.batch_names``)."""
        return self.apply(data, rows, "counterfactual", code=data.batch_names.index(batch))

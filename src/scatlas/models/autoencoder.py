"""Autoencoder (AE) and autoencoder + cell-type classifier (AEC).

Encoder: Dense 512 → BN → SELU → Dense 132 → BN → SELU → Dense latent (the scMEDAL
backbone; widths, activation, dropout and latent size are config fields). The decoder
mirrors the encoder (untied, or tied to the transposed encoder kernels). With
``decoder_batch`` the decoder also reads the cell's one-hot batch (as scVI's decoder does), so the
latent need not carry what differs between batches. The loss is the
mean squared error on the (log-normalised, optionally scaled) input; AEC adds a linear
cell-type head on the latent trained with class-weighted cross-entropy:
``loss = recon_weight · MSE + class_weight · CE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from scatlas.data.loaders import Batch
from scatlas.models.base import ModelConfig, NeuralModel, SplitData, Widths, register
from scatlas.nn.blocks import DenseStack, TiedDecoder


class AutoencoderModule(nn.Module):
    """Dense autoencoder with an optional cell-type head on the latent.

    Parameters
    ----------
    n_genes
        Input width.
    hidden
        Hidden widths of the encoder (the decoder uses them reversed).
    latent_dim
        Latent width.
    dropout
        Dropout after hidden layers.
    activation
        Hidden activation.
    latent_activation
        Activation of the latent layer (scMEDAL: ``selu``).
    tied
        Tie decoder kernels to the transposed encoder kernels.
    n_labels
        Cell types for the head (0 = plain AE).
    class_weights
        Per-class weights of the cross-entropy.
    recon_weight, class_weight
        Loss weights.
    decoder_batches
        With more than 0, the decoder reads ``[z, one-hot batch]`` (untied decoders only).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (512, 132),
        latent_dim: int = 50,
        dropout: float = 0.0,
        activation: str = "selu",
        latent_activation: str = "selu",
        tied: bool = False,
        n_labels: int = 0,
        class_weights: torch.Tensor | None = None,
        recon_weight: float = 1.0,
        class_weight: float = 0.1,
        decoder_batches: int = 0,
    ) -> None:
        super().__init__()
        if tied and decoder_batches:
            raise ValueError("a tied decoder cannot read the batch")
        self.encoder = DenseStack([n_genes, *hidden, latent_dim], activation, True, dropout, latent_activation)
        self.decoder: nn.Module = (
            TiedDecoder(self.encoder, activation)
            if tied
            else DenseStack([latent_dim + decoder_batches, *reversed(hidden), n_genes], activation, True, dropout, "linear")
        )
        self.decoder_batches = decoder_batches
        self.head = nn.Linear(latent_dim, n_labels) if n_labels else None
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(max(n_labels, 1)))
        self.recon_weight = recon_weight
        self.class_weight = class_weight

    def embed(self, batch: Batch) -> torch.Tensor:
        """Latent coordinates of ``batch["x"]``."""
        return self.encoder(batch["x"])

    def decode(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Decoder output for latents ``z`` of the cells of ``batch`` (given their batch when the decoder reads it)."""
        if self.decoder_batches:
            z = torch.cat([z, F.one_hot(batch["batch"], self.decoder_batches).to(z.dtype)], dim=1)
        return self.decoder(z)

    def reconstruct(self, batch: Batch) -> torch.Tensor:
        """Decoder output for ``batch["x"]``."""
        return self.decode(self.embed(batch), batch)

    def supervised_terms(self, batch: Batch, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms of a latent ``z``: ``recon`` (MSE) and ``class`` (weighted CE, with a head); their weighted sum."""
        recon = F.mse_loss(self.decode(z, batch), batch["x"])
        terms = {"recon": recon}
        total = self.recon_weight * recon
        if self.head is not None:
            ce = F.cross_entropy(self.head(z), batch["label"], weight=self.class_weights)
            terms["class"] = ce
            total = total + self.class_weight * ce
        return terms, total

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``recon`` (MSE), ``class`` (weighted CE, AEC only) and their weighted sum ``loss``."""
        terms, total = self.supervised_terms(batch, self.embed(batch))
        terms["loss"] = total
        return terms


class AEConfig(ModelConfig):
    """Hyper-parameters of AE / AEC (defaults: the scMEDAL backbone)."""

    type: str = "ae"
    hidden: Widths = Field(default_factory=lambda: [512, 132])
    latent_dim: int = Field(50, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: str = "selu"
    latent_activation: str = "selu"
    tied: bool = False
    decoder_batch: bool = False
    recon_weight: float = Field(1.0, gt=0)
    class_weight: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _untied_if_batch(self) -> AEConfig:
        if self.tied and self.decoder_batch:
            raise ValueError("decoder_batch needs an untied decoder (tied: false)")
        return self


@register("ae")
class AE(NeuralModel):
    """Autoencoder: MSE reconstruction of the log-normalised input."""

    Config = AEConfig
    latent_name = "latent"

    def n_labels(self, data: SplitData) -> int:
        """Classes of the cell-type head (0 for AE)."""
        return 0

    def module_kwargs(self, data: SplitData) -> dict[str, Any]:
        """Constructor arguments of :class:`AutoencoderModule` for this split."""
        cfg: AEConfig = self.config  # type: ignore[assignment]
        n_labels = self.n_labels(data)
        return {
            "n_genes": data.n_genes,
            "hidden": cfg.hidden,
            "latent_dim": cfg.latent_dim,
            "dropout": cfg.dropout,
            "activation": cfg.activation,
            "latent_activation": cfg.latent_activation,
            "tied": cfg.tied,
            "n_labels": n_labels,
            "class_weights": torch.as_tensor(data.class_weights(), dtype=torch.float32) if n_labels else None,
            "recon_weight": cfg.recon_weight,
            "class_weight": cfg.class_weight,
            "decoder_batches": len(data.batch_names) if cfg.decoder_batch else 0,
        }

    def build_module(self, data: SplitData) -> AutoencoderModule:
        """The autoencoder for this split's gene count."""
        return AutoencoderModule(**self.module_kwargs(data))


@register("aec")
class AEC(AE):
    """Autoencoder with a class-weighted cell-type head on the latent."""

    Config = AEConfig
    needs_labels = True

    def n_labels(self, data: SplitData) -> int:
        """Number of cell types."""
        assert data.label_names is not None
        return len(data.label_names)

"""Dense building blocks: Linear → BatchNorm → activation → Dropout stacks and a tied decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "selu": nn.SELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "linear": nn.Identity,
}


class DenseStack(nn.Module):
    """A stack of dense layers; every layer but (optionally) the last has BN, activation, dropout.

    Parameters
    ----------
    dims
        Layer widths including the input: ``(n_in, h1, ..., n_out)``.
    activation
        Hidden activation (``selu``, ``relu``, ``silu``, ``leaky_relu``).
    batch_norm
        Batch-normalise hidden layers.
    dropout
        Dropout after hidden activations.
    last_activation
        Activation of the output layer (``linear`` = none); the output layer never has BN or dropout.
    """

    def __init__(
        self,
        dims: Sequence[int],
        activation: str = "selu",
        batch_norm: bool = True,
        dropout: float = 0.0,
        last_activation: str = "linear",
    ) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        hidden = len(self.linears) - 1
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) if batch_norm else nn.Identity() for d in dims[1:-1])
        self.act = ACTIVATIONS[activation]()
        self.last_act = ACTIVATIONS[last_activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n_hidden = hidden

    def forward(self, x: torch.Tensor, return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Apply the stack; with ``return_hidden`` also return every layer's activation (output included)."""
        hidden = []
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < self.n_hidden:
                x = self.dropout(self.act(self.norms[i](x)))
            else:
                x = self.last_act(x)
            hidden.append(x)
        return (x, hidden) if return_hidden else x


class TiedDecoder(nn.Module):
    """Decoder that reuses an encoder's kernels transposed, with its own biases (scMEDAL).

    Parameters
    ----------
    encoder
        The :class:`DenseStack` whose weights are tied.
    activation
        Activation between decoder layers; the output is linear.
    """

    def __init__(self, encoder: DenseStack, activation: str = "selu") -> None:
        super().__init__()
        self.encoder = [encoder]  # a list, so the encoder's parameters are not registered twice
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(lin.in_features)) for lin in reversed(encoder.linears))
        self.act = ACTIVATIONS[activation]()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode ``z`` through the transposed encoder kernels."""
        linears = list(reversed(self.encoder[0].linears))
        for i, (linear, bias) in enumerate(zip(linears, self.biases, strict=True)):
            z = F.linear(z, linear.weight.t(), bias)
            if i < len(linears) - 1:
                z = self.act(z)
        return z

"""Neural-network building blocks shared by the models."""

from scatlas.nn.blocks import DenseStack, TiedDecoder
from scatlas.nn.variational import RandomEffectBlock, VariationalLinear, grad_reverse, normal_kl

__all__ = ["DenseStack", "RandomEffectBlock", "TiedDecoder", "VariationalLinear", "grad_reverse", "normal_kl"]

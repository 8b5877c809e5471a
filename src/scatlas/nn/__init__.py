"""Neural-network building blocks shared by the models."""

from scatlas.nn.blocks import DenseStack, TiedDecoder

__all__ = ["DenseStack", "TiedDecoder"]

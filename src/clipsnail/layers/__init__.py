"""Building blocks shared by the models."""

from clipsnail.layers.attention import Attention, TransformerBlock

__all__ = ["Attention", "TransformerBlock"]

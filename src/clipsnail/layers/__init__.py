"""Building blocks shared by the models."""

from clipsnail.layers.attention import Attention, CrossAttention, DecoderBlock, TransformerBlock

__all__ = ["Attention", "CrossAttention", "DecoderBlock", "TransformerBlock"]

"""Model families: one file each. Importing this package registers our timm models."""

from clipsnail.models.clip import CLIP, ClipModelConfig
from clipsnail.models.lemevit import LeMeViT
from clipsnail.models.text import TextTransformer
from clipsnail.models.vit import VisionTransformer

__all__ = ["CLIP", "ClipModelConfig", "LeMeViT", "TextTransformer", "VisionTransformer"]

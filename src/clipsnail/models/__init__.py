"""Model families: one file each. Importing this package registers our timm models (lemevit_*)."""

import importlib

from clipsnail.models import lemevit  # noqa: F401  (its @register_model lines)

# Imported when first asked for: this package is imported by the hook that registers LeMeViT as timm is imported,
# and may then not import modules that import timm themselves.
_EXPORTS = {"CLIP": "clip", "ClipModelConfig": "clip", "LeMeViT": "lemevit", "TextTransformer": "text",
            "VisionTransformer": "vit"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"clipsnail.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)

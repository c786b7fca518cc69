"""clipsnail: from-scratch PyTorch CLIP, LeMeViT, PixelSNAIL and text-to-image."""

__version__ = "0.1.0"

# Registers lemevit_* with timm, so `timm.create_model("lemevit_tiny")` works after `import clipsnail`.
from clipsnail.models import lemevit as _lemevit  # noqa: E402,F401


def load(run_dir, device="cpu"):
    """Load the model of a run directory, or of a model name such as hf-hub:ORG/NAME (see `clipsnail.hub.load`)."""
    from clipsnail.hub import load as _load

    return _load(run_dir, device=device)


__all__ = ["load", "__version__"]

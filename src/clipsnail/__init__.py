"""clipsnail: from-scratch PyTorch CLIP, LeMeViT, PixelSNAIL and text-to-image."""

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """Load the model of a run directory (see `clipsnail.hub.load`)."""
    from clipsnail.hub import load as _load

    return _load(run_dir, device=device)


__all__ = ["load", "__version__"]

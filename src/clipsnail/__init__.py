"""clipsnail: from-scratch PyTorch CLIP, LeMeViT, PixelSNAIL and text-to-image."""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def load(run_dir, device="cpu", weights="model"):
    """The model of a run directory, or of a model name such as hf-hub:ORG/NAME, ready for inference (see
    `clipsnail.families.load`)."""
    from clipsnail.apps.hub import load as _load

    return _load(run_dir, device=device, weights=weights)


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers lemevit_* with timm as soon as timm is imported, so `timm.create_model("lemevit_tiny")` works after
    `import clipsnail` in either order, while `import clipsnail` alone (the CLI, `clipsnail --help`) stays free of
    torch and timm, which take seconds to import."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # find timm's own spec with the finders after this one
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module):
            run_timm(module)
            import clipsnail.models.lemevit  # noqa: F401  (its @register_model lines)

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    import clipsnail.models.lemevit  # noqa: F401
elif not any(isinstance(finder, _RegisterWithTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())

__all__ = ["load", "__version__"]

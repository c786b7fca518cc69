"""Which torch device a command runs on: `auto` (CUDA, else Apple's MPS, else the CPU) or a name torch knows, checked
so that a typo or a missing GPU is a one-line error instead of a traceback deep in a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clipsnail.core.errors import ClipsnailError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (CUDA, else MPS, else the CPU; the default), cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    import torch  # here: the command line reads DEVICE_HELP for --help without importing torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ClipsnailError(f"unknown device {name!r}; choose {DEVICE_HELP}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipsnailError(f"device {name!r}: CUDA is not available here (this torch {torch.__version__} sees no "
                             "GPU); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ClipsnailError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ClipsnailError(f"device {name!r}: MPS is not available here; use --device cpu or auto")
    return device

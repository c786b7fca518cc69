"""The optional parts of clipsnail, and the one line that names the `pip install` when one is missing.

`pip install clipsnail` brings what searching, indexing, zero-shot classification and conversion need. What only
some commands use comes with an extra (pyproject.toml): `require_extra` checks, before that command starts its work,
that the extra's modules are installed, and otherwise raises `MissingExtra`: "the web app needs the serve extra:
pip install 'clipsnail[serve]'" (exit status 2 from the command line, never a traceback).
"""

from __future__ import annotations

import importlib.util

from clipsnail.core.errors import ClipsnailError

# An extra of pyproject.toml -> the modules clipsnail imports from the packages it brings (import names, not
# distribution names: scikit-learn is sklearn, python-multipart is python_multipart).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("matplotlib", "sklearn"),  # curves.png, the confusion matrix, classify eval's report
    "serve": ("fastapi", "uvicorn", "h11", "python_multipart"),  # the web app (FastAPI on uvicorn, uploads)
    "shards": ("braceexpand",),  # shard patterns such as data/{000000..000099}.tar (clip train --shards)
    "onnx": ("onnx", "onnxscript", "onnxruntime"),  # clipsnail export --onnx
    "caption": ("pycocoevalcap",),  # BLEU-4 and CIDEr-D (clipsnail caption eval)
}


class MissingExtra(ClipsnailError, ModuleNotFoundError):
    """An optional part of clipsnail is not installed. A ClipsnailError (the command line prints it as one line)
    and a ModuleNotFoundError (what `import` would have raised), so `except ImportError` still catches it."""


def install_hint(extra: str) -> str:
    return f"pip install 'clipsnail[{extra}]'"


def missing_modules(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules of `modules` that cannot be imported (looked up, not imported: no import time is spent)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] set to None
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtra ("`what` needs the `extra` extra: pip install 'clipsnail[extra]'") unless every module
    of `extra` (EXTRA_MODULES) is installed. `what` names what the user asked for: "the web app", "training"."""
    missing = missing_modules(EXTRA_MODULES[extra])
    if missing:
        raise MissingExtra(f"{what} needs the {extra} extra: {install_hint(extra)}", name=missing[0])

"""What identifies a run's weights, readable without PyTorch: a search that answers through ONNX Runtime checks
its index against the run with these alone."""

from __future__ import annotations

import hashlib
from pathlib import Path


def weights_fingerprint(run_dir: str | Path) -> dict | None:
    """What identifies a run's weights: {"sha1", "size", "mtime_ns"} of its model.safetensors (None without one).
    Vectors a model wrote (an index) are valid only for the weights that made them: a run that trains further
    keeps its folder and changes its weights."""
    path = Path(run_dir) / "model.safetensors"
    try:
        st = path.stat()
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return {"sha1": digest.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_weights(run_dir: str | Path, recorded: dict | None) -> bool:
    """Whether the run's weights are still the `recorded` fingerprint (the file's size and mtime first, so that an
    untouched file is not read; the sha1 decides when they moved). Nothing recorded: nothing to tell, True."""
    if not isinstance(recorded, dict) or not recorded.get("sha1"):
        return True
    try:
        st = (Path(run_dir) / "model.safetensors").stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns")):
        return True
    now = weights_fingerprint(run_dir)
    return now is not None and now["sha1"] == recorded["sha1"]

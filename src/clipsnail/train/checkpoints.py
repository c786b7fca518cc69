"""The checkpoint format, and which settings a resumed run may change.

A checkpoint is one safetensors file: the tensors of the training state, and the JSON skeleton that puts them back
in place (nested dicts, lists, tuples, numpy arrays, plain values) in its metadata. It is written to a temporary
name and renamed, so a kill at any moment leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clipsnail.core.config import to_dict
from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.core.safeio import atomic_path, read_json_object


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Nested dicts/lists of tensors and plain values -> JSON skeleton + flat tensor dict (for safetensors)."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": flatten_state(torch.from_numpy(obj.copy()), tensors, prefix)}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot checkpoint dict keys at {prefix!r}")
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix!r}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return unflatten_state(obj["__ndarray__"], tensors).numpy()
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_state(path: Path, state: dict) -> None:
    """One safetensors file (tensors + JSON skeleton in its metadata), written to a temp name then renamed, so a
    kill at any moment leaves either the previous checkpoint or the new one, never half of one."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})


def load_state(path: Path) -> dict:
    """A checkpoint written by `save_state`. A file cut short or otherwise damaged (it can only happen outside
    this program: a full disk, a copy cut short) is a DataError that says how to start over."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})["state"])
        return unflatten_state(skeleton, load_file(str(path)))
    except Exception as e:  # safetensors' own error types, OSError, a missing or malformed skeleton
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError):
            reason = f"no {reason} entry"
        raise DataError(f"{path}: damaged checkpoint ({reason}); delete {path.parent} to start the run over, "
                        f"or train into another --out") from None


# ----------------------------------------------------------------------------------------------- resuming


# Settings a resumed run may change: how long it trains and how it runs, not what it learns.
RESUMABLE_CHANGES = {f"train.{key}" for key in ("epochs", "max_steps", "time_budget", "budget_schedule", "device",
                                                "num_workers", "log_every", "checkpoint_every",
                                                "checkpoint_each_epoch", "eval_every", "compile")}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def check_same_settings(run_dir: Path, config: Any) -> None:
    """ClipsnailError when a run is resumed with settings other than those its config.json records (beyond
    RESUMABLE_CHANGES): the checkpoint would go on under the new ones and config.json would then say the whole run
    used them."""
    recorded = read_json_object(run_dir / "config.json")
    if recorded is None:
        return  # stopped before its first save: nothing recorded to differ from
    recorded.pop("task", None)
    old, new = _flat(recorded), _flat(json.loads(json.dumps(to_dict(config))))
    # Keys on one side only are settings that another clipsnail version added or dropped, not changes of the user.
    changed = [k for k in sorted(set(old) & set(new)) if old[k] != new[k] and k not in RESUMABLE_CHANGES]
    if changed:
        first = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])}{'...' if len(changed) > 4 else ''})" \
            if len(changed) > 1 else ""
        raise ClipsnailError(f"{run_dir}: resuming with other settings than the run's: {first} was "
                             f"{old.get(first)!r}, now {new.get(first)!r}{more}. Resume with the run's settings "
                             f"(its config.json), or train into a new --out")

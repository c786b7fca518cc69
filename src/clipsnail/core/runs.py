"""Run directories: what training writes and `clipsnail.load` reads.

A run directory holds `config.json` (the task name and its whole resolved config), `model.safetensors` (weights
only: nothing here ever unpickles a file), `tokenizer.json` when text is involved, and while training
`checkpoint/`, `metrics.jsonl` and plots. Every file is replaced atomically (`clipsnail.core.safeio`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipsnail.core.config import to_dict
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.fingerprint import same_weights, weights_fingerprint  # noqa: F401 (their old home)
from clipsnail.core.safeio import atomic_path, atomic_write_json, read_json_object

CHECKPOINT = "checkpoint/state.safetensors"
T = TypeVar("T")


def save_run(run_dir: str | Path, task: str, config, model: torch.nn.Module, tokenizer=None) -> None:
    """config.json, model.safetensors and (when given) tokenizer.json of a finished or checkpointed run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / "model.safetensors", metadata={"task": task})
    if tokenizer is not None:
        with atomic_path(run_dir / "tokenizer.json") as tmp:
            tokenizer.save(tmp)
    atomic_write_json(run_dir / "config.json", {"task": task, **to_dict(config)})


def read_run_config(run_dir: str | Path) -> tuple[str, dict]:
    """(task name, the rest of config.json) of a run directory; DataError naming the file when it is damaged."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {_json_kind(data)}")
    task = data.pop("task", None)
    if task is None:
        raise DataError(f"{path}: no 'task' key")
    if not isinstance(task, str):
        raise DataError(f"{path}: 'task' must be a string, got {_json_kind(task)}")
    return task, data


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def load_referenced(run_dir: Path, key: str, value: str, load: Callable[[str], T]) -> T:
    """`load(value)`, the run that the run at run_dir names in its config.json under `key` (a text-to-image run's
    `clip`, a caption run's `encoder`), with a failure reported as a problem of that config.json: the user asked
    for run_dir, not for the run it points to."""
    try:
        return load(value)
    except DataError as e:
        relative = not Path(value).is_absolute() and not Path(value).exists()
        hint = (f"; a relative path there is taken from the current folder ({Path.cwd()}): run from the folder "
                f"the run was trained in, or write the path in full" if relative else "")
        raise DataError(f"{run_dir / 'config.json'}: {key} = {value!r} cannot be loaded ({e}){hint}") from None


def build_described(run_dir: Path, build: Callable[[], T]) -> T:
    """`build()` (a model from a run's config), with a bad value reported as a problem of the run's config.json
    rather than of the user's flags."""
    config = run_dir / "config.json"
    try:
        return build()
    except ConfigError as e:
        raise DataError(f"{config}: {e}") from None
    except (ValueError, TypeError) as e:
        raise DataError(f"{config}: cannot build its model ({e})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; DataError naming the file when it is missing or damaged."""
    if not path.is_file():
        raise DataError(f"{path.parent}: no {path.name}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise DataError(f"{path}: cannot read weights ({str(e).strip().splitlines()[0]})") from None


def build_for_weights(run_dir: Path, build: Callable[[], T], weights: str = "model") -> T:
    """`build_described(run_dir, build)` of a model whose weights are `run_dir/{weights}.safetensors`, built first
    on the meta device (no memory) and checked against the tensor shapes in that file's header: a config.json
    naming a huge model, or one its weights do not fit, is a one-line error before gigabytes are allocated."""
    path = run_dir / f"{weights}.safetensors"
    try:
        with torch.device("meta"):
            skeleton = build()
    except ConfigError as e:
        raise DataError(f"{run_dir / 'config.json'}: {e}") from None
    except Exception:  # a model that cannot be built without memory: its weights are checked after the build
        skeleton = None
    if skeleton is not None and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                found = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as e:  # safetensors' own error types for a damaged header
            raise DataError(f"{path}: cannot read weights ({str(e).strip().splitlines()[0]})") from None
        problem = state_dict_mismatch(skeleton.state_dict(), found)
        if problem:
            raise DataError(f"{path}: does not fit the model that {run_dir / 'config.json'} describes: {problem}")
    return build_described(run_dir, build)


def load_run_weights(model: nn.Module, run_dir: Path, weights: str = "model") -> None:
    """Load `run_dir/{weights}.safetensors` ("model": the end of training; "best": the best validation score, when
    the run kept one) into `model`, strictly."""
    if weights not in ("model", "best"):
        raise ValueError(f"weights must be 'model' or 'best', got {weights!r}")
    path = run_dir / f"{weights}.safetensors"
    load_weights(model, read_weights(path), path, f"the model that {run_dir / 'config.json'} describes")


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps `found` from loading strictly into a model whose state dict is `expected`: the first missing key,
    the first unexpected key and the first shape mismatch (with counts), or '' when the keys and shapes agree."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]

    def more(keys: list[str]) -> str:
        return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r}{more(missing)}")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r}{more(unexpected)}")
    if shapes:
        k = shapes[0]
        problems.append(f"shape mismatch at {k!r}: the file has {list(found[k].shape)}, the model needs "
                        f"{list(expected[k].shape)}{more(shapes)}")
    return ", ".join(problems)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_is: str,
                 advice: str = "") -> None:
    """`model.load_state_dict(state, strict=True)`; when the weights do not fit, a one-line DataError naming `path`,
    the first missing/unexpected key or shape mismatch, the model (`model_is`: where it was described) and
    `advice`, instead of PyTorch's many-line RuntimeError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        problem = state_dict_mismatch(model.state_dict(), state) or str(e).strip().splitlines()[0]
        raise DataError(f"{path}: does not fit {model_is}: {problem}" + (f"; {advice}" if advice else "")) from None


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """model.safetensors, atomically. Tied/shared tensors are cloned (safetensors refuses shared storage)."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def is_run_dir(path: Path) -> bool:
    """A folder training wrote: a config.json naming its task, a checkpoint, or a metrics log; or nothing but the
    empty checkpoint folder (and the TensorBoard log) of a run whose first checkpoint could not be written (a full
    disk), which the same command must be able to start again."""
    config = read_json_object(path / "config.json")
    if config is not None and isinstance(config.get("task"), str):
        return True
    if (path / CHECKPOINT).is_file() or (path / "metrics.jsonl").is_file():
        return True
    checkpoint = path / CHECKPOINT.split("/")[0]
    try:
        entries = set(os.listdir(path))
        return (checkpoint.name in entries and entries <= {checkpoint.name, "tensorboard"} and checkpoint.is_dir()
                and not os.listdir(checkpoint))
    except OSError:
        return False


def check_run_dir(run_dir: Path) -> None:
    """Training writes config.json, model.safetensors, plots... into `run_dir`: never into a user's folder."""
    if run_dir.exists() and (not run_dir.is_dir() or (any(run_dir.iterdir()) and not is_run_dir(run_dir))):
        raise DataError(f"{run_dir}: exists and is not a clipsnail run directory (nor empty); training would "
                        f"write its files into it: choose another --out")

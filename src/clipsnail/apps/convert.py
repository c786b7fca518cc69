"""Pretrained checkpoints -> clipsnail run directories.

- OpenAI CLIP / open_clip (ViT family): `convert_open_clip` maps an open_clip-layout state dict onto our CLIP
  (the architecture read off the tensor shapes) and writes a "clip" run with OpenAI's BPE tokenizer, so that
  `clipsnail.load`, `zeroshot`, `index build` and `search` work on it as on a run we trained.
- Official LeMeViT: `convert_lemevit` writes a "classify" run for `classify eval` and `clipsnail.load`.
- ConSE (Norouzi et al., ICLR 2014): `convert_conse` puts a pretrained ImageNet classifier and a pretrained sentence
  encoder together into a "clip" run whose image head is `ConseHead` (models/clip.py): a CLIP that searches photos
  with no image-text training, made offline from the packaged weights.

Files are read as safetensors, or with `torch.load(weights_only=True)`: the restricted unpickler that rebuilds
tensors and containers but runs no code. TorchScript archives (OpenAI's original .pt files) are refused: they
hold code. Run directories are written under a temporary name and renamed, so a failed conversion leaves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import zipfile
from pathlib import Path

import torch

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.pretrained import unreadable_torch_file
from clipsnail.core.safeio import check_replaceable, staged_dir

log = logging.getLogger(__name__)

# Buffers some exports carry that hold no weights (OpenAI's JIT models: input_resolution, context_length,
# vocab_size; older open_clip: the causal mask).
_IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_BLOCK_KEYS = {  # open_clip ResidualAttentionBlock -> our TransformerBlock
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",  # both q,k,v stacked on dim 0
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PLAIN_KEYS = {
    "visual.conv1.weight": "visual.patch_embed.weight",
    "visual.ln_pre.weight": "visual.ln_pre.weight", "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight", "visual.ln_post.bias": "visual.ln_post.bias",
    "token_embedding.weight": "text.token_embedding.weight",
    "ln_final.weight": "text.ln_final.weight", "ln_final.bias": "text.ln_final.bias",
}
# open_clip config options that change the computation without changing the state-dict keys: only their
# defaults (the OpenAI architecture) are implemented here.
_SUPPORTED_OPTIONS = {
    "vision_cfg": {"final_ln_after_pool": (False,), "pool_type": ("tok",), "no_ln_pre": (False,),
                   "attentional_pool": (False,), "norm_kwargs": (None, {}), "act_kwargs": (None, {}),
                   "patch_dropout": None, "timm_model_name": (None,)},
    "text_cfg": {"final_ln_after_pool": (False,), "pool_type": ("argmax", "eos"), "no_causal_mask": (False,),
                 "embed_cls": (False,), "norm_kwargs": (None, {}), "act_kwargs": (None, {}),
                 "hf_model_name": (None,), "hf_tokenizer_name": (None,), "tokenizer_mode": (None,)},
}


# ----------------------------------------------------------------------------------------------- reading files


def read_checkpoint(path: str | Path) -> dict:
    """The top-level object of a safetensors or PyTorch checkpoint file, read without running any code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors has its own error types for bad headers and truncated files
            raise DataError(f"{path}: cannot read safetensors file ({e})") from e
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise DataError(
                f"{path}: a TorchScript (JIT) archive, which holds code and is not loaded here; re-save it once as a "
                "state dict where you trust it: safetensors.torch.save_file({k: v.contiguous() for k, v in "
                "torch.jit.load(FILE, map_location='cpu').state_dict().items()}, 'model.safetensors'), or use the "
                "open_clip_model.safetensors of the model's Hugging Face repo")
    try:
        # argparse.Namespace: the `args` entry of timm's train-script checkpoints; rebuilding one runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for objects outside the allow-list, RuntimeError for non-torch files
        raise DataError(unreadable_torch_file(path, e)) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: a {"state_dict": ...} wrapper unwrapped and a DataParallel "module." prefix dropped."""
    obj = read_checkpoint(path)
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise DataError(f"{path}: no tensors found")
    return state


# ----------------------------------------------------------------------------------------------- open_clip


def _shown(value, limit: int = 60) -> str:
    """`value` as an error message shows it: a long list by its first items and its length, a long string cut, so
    that one line names the problem whatever the file holds."""
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{', '.join(_shown(v, 20) for v in value[:3])}, ... ({len(value)} values)]"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _section(cfg_path: Path, parent: dict, key: str, where: str = "") -> dict:
    """The object `parent[key]` ({} when absent or null); anything else is an error naming the key."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{cfg_path}: {where}{key} must be an object ({{...}}), got {_shown(value)}")
    return value


def _open_clip_config(path: Path) -> dict:
    """open_clip_config.json next to the weights (as in open_clip's Hugging Face hub repos), or none. Its sections
    (model_cfg, model_cfg.vision_cfg / text_cfg, preprocess_cfg) are objects in what is returned, so readers
    need not check their types; values inside them are checked where they are read."""
    cfg_path = path.with_name("open_clip_config.json")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_path}: invalid JSON ({e})") from None
    except RecursionError:  # a hostile file of deeply nested lists: the parser recurses once per level
        raise DataError(f"{cfg_path}: nested too deeply to be an open_clip config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read as UTF-8 text ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{cfg_path}: expected a JSON object at the top level, got {_shown(config)}")
    model_cfg = dict(_section(cfg_path, config, "model_cfg"))
    for tower in ("vision_cfg", "text_cfg"):
        model_cfg[tower] = _section(cfg_path, model_cfg, tower, "model_cfg.")
    return {**config, "model_cfg": model_cfg, "preprocess_cfg": _section(cfg_path, config, "preprocess_cfg")}


def _positive_int(cfg_path: Path, section: dict, key: str, where: str) -> int | None:
    """`section[key]`, a whole number above 0, or None when absent: a string, 0 or true is an error naming it
    (they would divide by zero or build a model of another shape)."""
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{cfg_path}: {where}.{key}={_shown(value)} must be a whole number above 0")
    return value


def _channels(cfg_path: Path, preprocess: dict, key: str) -> tuple[float, float, float] | None:
    """preprocess_cfg.mean or .std: three finite numbers (std above 0), or None when absent. One number means it
    for each channel, as in open_clip. Checked here so that a run that could never load is never written."""
    value = preprocess.get(key)
    if value is None:
        return None
    where = f"{cfg_path}: preprocess_cfg.{key}={_shown(value)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{where} must be 3 numbers, one per RGB channel")
    if not all(math.isfinite(v) for v in value):
        raise DataError(f"{where} must hold finite numbers (not NaN or infinity)")
    if key == "std" and not all(v > 0 for v in value):
        raise DataError(f"{where} must be above 0 (the pixels are divided by it)")
    return float(value[0]), float(value[1]), float(value[2])


def check_finite(where: str | Path, state: dict[str, torch.Tensor]) -> None:
    """A one-line error naming the first tensor holding NaN or infinity: such weights convert and load, and every
    output computed from them is NaN."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise DataError(f"{where}: tensor {key} holds {bad} of {value.numel()} values that are not finite numbers "
                            "(NaN or infinity); the weights are damaged")


def _check_options(path: Path, model_cfg: dict) -> None:
    """model_cfg as `_open_clip_config` returns it: its towers' sections are objects."""
    cfg_path = path.with_name("open_clip_config.json")
    for section, options in _SUPPORTED_OPTIONS.items():
        for key, allowed in options.items():
            value = model_cfg[section].get(key)
            if value is None or allowed is None:
                continue
            if value not in allowed:
                raise DataError(f"{cfg_path}: {section}.{key}={_shown(value)} is not supported (clipsnail implements "
                                "OpenAI's CLIP ViT architecture)")
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("pool_type") == "eos" and text_cfg.get("eos_id") != 49407:  # pooled where ours pools only then
        raise DataError(f"{cfg_path}: text_cfg.pool_type='eos' with eos_id={_shown(text_cfg.get('eos_id'))} is not "
                        "supported (only OpenAI's <end_of_text>, 49407)")
    if not isinstance(model_cfg.get("quick_gelu", False), bool):  # bool("false") would be True
        raise DataError(f"{cfg_path}: model_cfg.quick_gelu={_shown(model_cfg['quick_gelu'])} must be true or false")


def _check_supported(path: Path, state: dict[str, torch.Tensor]) -> None:
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
        raise DataError(f"{path}: a ModifiedResNet (RN50-style) image tower; clipsnail converts the ViT family only")
    if any(k.startswith("visual.trunk.") for k in state):
        raise DataError(f"{path}: a timm image tower (visual.trunk.*); clipsnail converts OpenAI-style ViT towers "
                        "only")
    if any(k.startswith("text.") for k in state):
        raise DataError(f"{path}: a Hugging Face text tower (text.*); clipsnail converts OpenAI-style text towers "
                        "only")
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise DataError(f"{path}: not an open_clip / OpenAI CLIP state dict (no visual.conv1.weight or "
                        "token_embedding.weight)")


def _depth(path: Path, state: dict, prefix: str) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise DataError(f"{path}: missing or non-contiguous transformer blocks under {prefix}")
    return len(blocks)


def _heads(path: Path, widths: tuple[int, int], model_cfg: dict) -> tuple[int, int]:
    """(vision heads, text heads): from open_clip_config.json when it says (vision_cfg.head_width, text_cfg.heads),
    else CLIP's 64-wide heads. `widths`: those of the two towers, as the weights' shapes give them."""
    cfg_path = path.with_name("open_clip_config.json")
    vision_width, text_width = widths
    head_width = _positive_int(cfg_path, model_cfg["vision_cfg"], "head_width", "vision_cfg")
    if vision_width % (head_width or 64):
        where = f"{cfg_path}: vision_cfg.head_width={head_width}" if head_width else f"{path}: the head width 64"
        raise DataError(f"{where} does not divide the vision width {vision_width}")
    text_heads = _positive_int(cfg_path, model_cfg["text_cfg"], "heads", "text_cfg")
    if text_heads is None and text_width % 64:
        raise DataError(f"{path}: text width {text_width} is not a multiple of the head width 64")
    if text_heads is not None and text_width % text_heads:
        raise DataError(f"{cfg_path}: text_cfg.heads={text_heads} does not divide the text width {text_width}")
    return vision_width // (head_width or 64), text_heads or text_width // 64


def infer_clip_config(path: Path, state: dict[str, torch.Tensor], model_cfg: dict, quick_gelu: bool):
    """Our ClipModelConfig for an open_clip state dict, from its tensor shapes (and open_clip_config.json for the
    head counts, which shapes do not show: CLIP uses 64-wide heads, open_clip's config may say otherwise)."""
    from clipsnail.models.clip import (
        OPENAI_MEAN,
        OPENAI_STD,
        ClipHeadConfig,
        ClipModelConfig,
        ClipTextConfig,
        ClipVisionConfig,
    )

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise DataError(f"{path}: no {key!r} in the state dict")
        return tuple(state[key].shape)

    width, in_chans, patch, patch_w = shape("visual.conv1.weight")
    if in_chans != 3 or patch != patch_w:
        raise DataError(f"{path}: visual.conv1.weight {shape('visual.conv1.weight')}: expected [width, 3, p, p]")
    positions = shape("visual.positional_embedding")[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise DataError(f"{path}: visual.positional_embedding has {positions} rows, not 1 + a square grid")
    vocab_size, text_width = shape("token_embedding.weight")
    context_length = shape("positional_embedding")[0]
    embed_dim = shape("visual.proj")[1]
    if shape("text_projection") != (text_width, embed_dim):
        raise DataError(f"{path}: text_projection {shape('text_projection')} does not map the text width "
                        f"{text_width} to the image embedding size {embed_dim}")
    v_depth = _depth(path, state, "visual.transformer.resblocks.")
    t_depth = _depth(path, state, "transformer.resblocks.")
    v_heads, t_heads = _heads(path, (width, text_width), model_cfg)
    v_hidden = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    t_hidden = shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    return ClipModelConfig(
        vision=ClipVisionConfig(encoder="vit", image_size=grid * patch, patch_size=patch, width=width, depth=v_depth,
                                heads=v_heads, mlp_ratio=v_hidden / width, pool="cls", stem="patch",
                                mean=OPENAI_MEAN, std=OPENAI_STD),
        text=ClipTextConfig(encoder="transformer", width=text_width, depth=t_depth, heads=t_heads,
                            mlp_ratio=t_hidden / text_width, vocab_size=vocab_size, context_length=context_length),
        head=ClipHeadConfig(
            embed_dim=embed_dim, projection="linear",
            init_logit_scale=float(state["logit_scale"].reshape(())) if "logit_scale" in state else math.log(1 / 0.07),
            init_logit_bias=float(state["logit_bias"].reshape(())) if "logit_bias" in state else None),  # SigLIP's
        activation="quick_gelu" if quick_gelu else "gelu",
    )


def map_open_clip_state(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip key names and layouts -> ours. A key we cannot place is an error naming it."""
    out, unknown = {}, []
    block = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
    for key, value in state.items():
        if key in _IGNORED_KEYS or key.rsplit(".", 1)[-1] in _IGNORED_KEYS:
            continue
        if key in _PLAIN_KEYS:
            out[_PLAIN_KEYS[key]] = value
        elif key == "visual.class_embedding":  # [W] -> [1, 1, W]
            out["visual.cls_token"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":  # [N, W] -> [1, N, W]
            out["visual.pos_embed"] = value.unsqueeze(0)
        elif key == "positional_embedding":
            out["text.pos_embed"] = value.unsqueeze(0)
        elif key == "visual.proj":  # x @ proj == Linear with weight proj.T
            out["image_projection.weight"] = value.T.contiguous()
        elif key == "text_projection" and value.ndim == 2:
            out["text_projection.weight"] = value.T.contiguous()
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        elif (m := block.fullmatch(key)) and m.group(3) in _BLOCK_KEYS:
            tower = "visual" if m.group(1) else "text"
            out[f"{tower}.blocks.{m.group(2)}.{_BLOCK_KEYS[m.group(3)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise DataError(f"{path}: unsupported part of the model, no clipsnail equivalent for "
                        f"{', '.join(unknown[:5])}{more} (clipsnail converts OpenAI-style CLIP ViT models)")
    return {k: v.float() for k, v in out.items()}


def _load_exactly(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DataError(f"{path}: the checkpoint has no weights for {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    extra = sorted(set(state) - set(expected))
    if extra:
        raise DataError(f"{path}: weights the model has no place for: {', '.join(extra[:5])}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise DataError(f"{path}: shape mismatch at {key}: checkpoint {tuple(value.shape)}, model "
                            f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def _write_run(out: Path, task: str, config, model: torch.nn.Module, tokenizer=None) -> None:
    """The run directory `out`, written whole or not at all; an existing non-empty `out` is refused."""
    from clipsnail.core.runs import save_run

    with staged_dir(out) as tmp:
        save_run(tmp, task, config, model, tokenizer)


def _preprocess(path: Path, m, preprocess: dict):
    """The model config `m` with the input normalisation and resize of open_clip_config.json's preprocess_cfg,
    checked (a value not given keeps OpenAI's, as in open_clip)."""
    cfg_path = path.with_name("open_clip_config.json")
    mean, std = _channels(cfg_path, preprocess, "mean"), _channels(cfg_path, preprocess, "std")
    interpolation = preprocess.get("interpolation") or "bicubic"  # OpenAI's and open_clip's default
    if interpolation not in ("bicubic", "bilinear"):
        raise DataError(f"{cfg_path}: preprocess_cfg.interpolation={_shown(interpolation)} is not supported "
                        "(bicubic or bilinear)")
    return m.with_changes(vision={"mean": mean or m.vision.mean, "std": std or m.vision.std,
                                  "interpolation": interpolation})


def _check_loadable(path: Path, config) -> None:
    """The config about to be written, read back as loading the run will read it: a run that could never load is
    an error now, not a cached run failing at every use."""
    from clipsnail.core.config import from_dict, to_dict

    try:
        from_dict(type(config), json.loads(json.dumps(to_dict(config), allow_nan=False)))
    except (ConfigError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: the converted run would not load ({first[:200]})") from None


def convert_open_clip(path: str | Path, out_run_dir: str | Path, quick_gelu: bool | None = None) -> dict:
    """An OpenAI / open_clip CLIP ViT checkpoint -> a clipsnail "clip" run directory; returns a summary.

    quick_gelu: the MLP activation the weights were trained with (True for OpenAI's own models and open_clip's
    "-quickgelu" ones). None: model_cfg.quick_gelu of open_clip_config.json next to the file; else True for a state
    dict taken from OpenAI's TorchScript models (it keeps their input_resolution entry); else False. Logged.
    The head counts come from that config too when present, else CLIP's rule: width // 64.
    """
    from clipsnail.data.tokenizers import openai_bpe
    from clipsnail.families.clip import ClipConfig, ClipDataConfig
    from clipsnail.models.clip import CLIP

    path, out = Path(path), Path(out_run_dir)
    check_replaceable(out)  # fail before the (slow) read when --out is taken
    state = read_state_dict(path)
    if "text.token_embedding.weight" in state:  # open_clip's CustomTextCLIP: the same text tower under "text."
        state = {k.removeprefix("text."): v for k, v in state.items()}
    _check_supported(path, state)
    check_finite(path, state)
    oc_config = _open_clip_config(path)
    model_cfg = oc_config.get("model_cfg") or {}
    _check_options(path, model_cfg)
    if quick_gelu is None:
        if model_cfg.get("quick_gelu") is not None:
            quick_gelu, source = model_cfg["quick_gelu"], "open_clip_config.json"
        elif "input_resolution" in state:  # only OpenAI's own (TorchScript) models carry this: QuickGELU
            quick_gelu, source = True, "an OpenAI export (it has input_resolution)"
        else:
            quick_gelu, source = False, "default: nothing says QuickGELU"
    else:
        source = "given"
    log.info("activation: %s (%s)", "QuickGELU" if quick_gelu else "GELU", source)
    m = infer_clip_config(path, state, model_cfg, quick_gelu)
    m = _preprocess(path, m, oc_config.get("preprocess_cfg") or {})
    tokenizer = openai_bpe(m.text.context_length)
    if m.text.vocab_size != tokenizer.vocab_size:
        raise DataError(f"{path}: a vocabulary of {m.text.vocab_size} tokens, not OpenAI CLIP's BPE "
                        f"({tokenizer.vocab_size}); other tokenizers are not supported")
    m = m.with_changes(text={"eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id})
    model = CLIP(m, load_weights=False)
    _load_exactly(path, model, map_open_clip_state(path, state))
    # tokenizer "openai": a fine-tuning run keeps this vocabulary
    config = ClipConfig(model=m, data=ClipDataConfig(tokenizer="openai", vocab_size=m.text.vocab_size,
                                                      context_length=m.text.context_length))
    _check_loadable(path, config)
    _write_run(out, "clip", config, model, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: CLIP ViT %dpx/%d, %s parameters", out, m.vision.image_size, m.vision.patch_size,
             f"{params:,}")
    return {
        "run": str(out), "task": "clip", "source": str(path), "parameters": params,
        "quick_gelu": quick_gelu, "quick_gelu_from": source,
        "architecture": {
            "vision": {k: getattr(m.vision, k) for k in (
                "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "interpolation")},
            "text": {k: getattr(m.text, k) for k in (
                "width", "depth", "heads", "mlp_ratio", "vocab_size", "context_length")},
            "embed_dim": m.head.embed_dim, "activation": m.activation},
    }


# ----------------------------------------------------------------------------------------------- LeMeViT


def read_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class-names file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (one per line expected)")
    return names


def convert_lemevit(path: str | Path, out_run_dir: str | Path, model_name: str, num_classes: int | None = None,
                    weights: str = "ema", class_names: list[str] | None = None) -> dict:
    """An official LeMeViT checkpoint (timm train-script layout: state_dict and/or state_dict_ema, maybe under
    module.) -> a clipsnail "classify" run directory; returns a summary.

    weights: "ema" (the default, what the official evaluation reports) uses state_dict_ema when the file has it,
    "raw" the plain state_dict. Class names default to class_0, class_1, ...; `classify eval` needs the real ones
    (in the data's folder order), e.g. ImageNet's synset ids.
    """
    from clipsnail.families.classify import ClassifyConfig, build_classifier, check_model_name, resolve_input
    from clipsnail.models.lemevit import checkpoint_filter_fn

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path, out = Path(path), Path(out_run_dir)
    check_model_name(model_name)
    check_replaceable(out)
    obj = read_checkpoint(path)
    has = [k for k in ("state_dict_ema", "state_dict", "model") if isinstance(obj.get(k), dict) and obj[k]]
    if weights == "raw":
        chosen = next((k for k in ("state_dict", "model") if k in has), None)
        if chosen is None and "state_dict_ema" in has:
            raise DataError(f"{path}: holds only EMA weights (state_dict_ema); use --weights ema")
    else:
        chosen = "state_dict_ema" if "state_dict_ema" in has else next(iter(has), None)
        if chosen != "state_dict_ema":
            log.info("%s: no state_dict_ema; converting the plain weights", path)
    state = checkpoint_filter_fn({chosen: obj[chosen]} if chosen else obj)
    if not state:
        raise DataError(f"{path}: no tensors found")
    check_finite(path, state)
    head = state.get("head.weight")
    found = int(head.shape[0]) if head is not None else 0
    if num_classes is None:
        num_classes = found
    elif num_classes != found:
        raise DataError(f"{path}: the checkpoint's head has {found} classes, not {num_classes}")
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    elif len(class_names) != num_classes:
        raise DataError(f"{len(class_names)} class names given for a {num_classes}-class head")
    config = ClassifyConfig()
    m = config.model
    m.name, m.pretrained, m.num_classes, m.class_names = model_name, "", num_classes, list(class_names)
    import timm

    first_conv = getattr(timm.models.get_pretrained_cfg(model_name), "first_conv", "") or ""
    stem = state.get(f"{first_conv}.weight")
    m.in_chans = int(stem.shape[1]) if stem is not None and stem.ndim == 4 else 3
    config.data.image_size, config.data.mean, config.data.std = resolve_input(config)
    model = build_classifier(m, load_weights=False)
    _load_exactly(path, model, state)
    _write_run(out, "classify", config, model)
    params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: %s, %d classes, %s parameters (%s weights)", out, model_name, num_classes, f"{params:,}",
             chosen or "top-level")
    return {"run": str(out), "task": "classify", "source": str(path), "weights": chosen or "state_dict",
            "parameters": params, "architecture": {"model": model_name, "num_classes": num_classes,
                                                   "in_chans": m.in_chans, "image_size": config.data.image_size}}


# ----------------------------------------------------------------------------------------------- ConSE

CONSE_DEFAULT = "efficientnet-lite0+all-minilm-l6-v2"  # the two packaged models (`pip install 'clipsnail[pretrained]'`)
# Measured zero-shot on COCO-mini (bench/photo_search.py, text->image recall over 159 photos): each ImageNet class
# named by its first two WordNet lemmas ("tabby, tabby cat") beat the first alone by 0.01-0.03 R@5 in every wording;
# the wordings ("{}", "a {}", "a photo of a {}.", "a photo of {}.") were within 0.03 of each other, so CLIP's
# "a photo of a {}." stays; T=10 at temperature 2 beat T=1, 5 and all 1000 labels, and temperature 1 and 3.
# Each label's embedding is the mean of those of its name and of its name with its WordNet definition ("a photo of
# a crane: large long-necked wading bird ..." tells the bird from the machine): R@5 0.684 against 0.652 for the name
# alone, and CIFAR-10 class-query precision@50 0.638 against 0.560; a CLIP-style ensemble of 8 wordings did not help.
CONSE_TEMPLATE = "a photo of a {}."
CONSE_LEMMAS = 2
CONSE_DEFINITIONS = True
CONSE_TOP_K, CONSE_TEMPERATURE = 10, 2.0
CONSE_IMAGE_SIZE = 224  # the resolution EfficientNet-Lite0 was trained at
CONSE_CONTEXT_LENGTH = 64  # word pieces: queries are short; all-MiniLM-L6-v2 was trained on up to 128


def imagenet_label_names(lemmas: int = CONSE_LEMMAS) -> list[str]:
    """The 1000 ImageNet-1k classes in the classifiers' output order, each named by its first `lemmas` WordNet
    lemmas (timm's ImageNetInfo: "great white shark, white shark, man-eater, ..." -> "great white shark, white shark"
    at 2; a class with one lemma, such as "crane", keeps it)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [", ".join(info.index_to_description(i).split(", ")[:lemmas]) for i in range(info.num_classes())]


def imagenet_label_definitions() -> list[str]:
    """The WordNet definition of each ImageNet-1k class, in the classifiers' output order ("crane" at 134: "large
    long-necked wading bird of marshes and plains in many parts of the world")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i, detailed=True).partition(": ")[2] for i in range(info.num_classes())]


def conse_label_texts(labels: list[str], template: str, definitions: list[str]) -> list[list[str]]:
    """The sentences whose mean text embedding is each label's embedding: its name in `template`, and with a
    definition, also "name: definition" in it."""
    if definitions and len(definitions) != len(labels):
        raise DataError(f"{len(definitions)} label definitions given for {len(labels)} labels")
    return [[template.format(name)] + ([template.format(f"{name}: {definitions[i].rstrip('.')}")] if definitions
                                       else []) for i, name in enumerate(labels)]


def build_conse(spec: str = CONSE_DEFAULT, labels: list[str] | None = None, template: str = CONSE_TEMPLATE,
                top_k: int = CONSE_TOP_K, temperature: float = CONSE_TEMPERATURE,
                definitions: list[str] | None = None):
    """(CLIP model, its ClipConfig, tokenizer) of a ConSE CLIP over `spec` = "IMAGE+TEXT": IMAGE a packaged ImageNet
    classifier (`efficientnet-lite0`), TEXT a packaged sentence encoder (`all-minilm-l6-v2`) or a local Hugging Face
    model folder. The text side is the encoder as it is (mean-pooled, then an identity projection that fine-tuning
    may move); each label embedding is its mean embedding of `conse_label_texts` (unit length). `definitions`
    defaults to WordNet's for the ImageNet labels and to none for `labels` given; [] leaves them out."""
    import timm

    from clipsnail.core.pretrained import PACKAGED, load_pretrained_state, model_kwargs, packaged, text_model_dir
    from clipsnail.data.tokenizers import TextTokenizer
    from clipsnail.families.clip import ClipConfig, ClipDataConfig, ready_for_inference
    from clipsnail.models.clip import (
        CLIP,
        ClipHeadConfig,
        ClipModelConfig,
        ClipTextConfig,
        ClipVisionConfig,
        build_text_tower,
    )

    image, plus, text = spec.partition("+")
    weights = packaged(image)
    if not plus or not text or weights is None:
        raise DataError(f"conse:{spec}: expected conse:IMAGE+TEXT with IMAGE one of {', '.join(PACKAGED)} and TEXT a "
                        f"sentence encoder (all-minilm-l6-v2, or a Hugging Face model folder), e.g. "
                        f"conse:{CONSE_DEFAULT}")
    if "{}" not in template:
        raise DataError(f"ConSE template {template!r} has no '{{}}' for the label name")
    if definitions is None:
        definitions = imagenet_label_definitions() if labels is None and CONSE_DEFINITIONS else []
    labels = imagenet_label_names() if labels is None else list(labels)
    label_texts = conse_label_texts(labels, template, list(definitions))
    text_dir = text_model_dir(text)
    tokenizer = TextTokenizer.from_pretrained(text_dir, CONSE_CONTEXT_LENGTH)
    classifier = timm.create_model(weights.architecture, num_classes=len(labels), **model_kwargs(image))
    load_pretrained_state(image, classifier)  # the whole classifier, head included (loaded only if 1000 classes)
    text_cfg = ClipTextConfig(encoder=f"hf:{text}", pool="mean", vocab_size=tokenizer.vocab_size,
                              context_length=tokenizer.context_length, pad_id=tokenizer.pad_id)
    if tokenizer.eot_id is not None:
        text_cfg = dataclasses.replace(text_cfg, eot_id=tokenizer.eot_id)
    m = ClipModelConfig(
        vision=ClipVisionConfig(encoder=weights.architecture, pretrained=image, image_size=CONSE_IMAGE_SIZE,
                                mean=weights.mean, std=weights.std, interpolation="bicubic"),
        text=text_cfg,
        head=ClipHeadConfig(projection="linear", image_projection="conse", conse_labels=labels,
                            conse_template=template, conse_definitions=list(definitions), conse_top_k=top_k,
                            conse_temperature=temperature,
                            # the text space is the label space
                            embed_dim=build_text_tower(ClipModelConfig(text=text_cfg), False).num_features),
    )
    model = CLIP(m)
    head = model.image_projection
    source = classifier.get_classifier()
    if tuple(source.weight.shape) != tuple(head.classifier.weight.shape):
        raise DataError(f"conse:{spec}: the classifier of {image} has {source.weight.shape[0]} outputs, not the "
                        f"{len(labels)} labels")
    config = ClipConfig(model=m, data=ClipDataConfig(context_length=tokenizer.context_length))
    ready_for_inference(model, tokenizer)
    model.eval()
    with torch.no_grad():
        head.classifier.load_state_dict(source.state_dict())
        model.text_projection.weight.copy_(torch.eye(model.embed_dim))
        sentences = [text for texts in label_texts for text in texts]
        per_label = model.encode_text(sentences).view(len(labels), -1, model.embed_dim)
        head.label_embeddings.copy_(torch.nn.functional.normalize(per_label.mean(dim=1), dim=-1))
    return model, config, tokenizer


def convert_conse(spec: str, out_run_dir: str | Path, **options) -> dict:
    """A ConSE CLIP (see `build_conse`, which takes `options`) -> a "clip" run directory; returns a summary."""
    from clipsnail.families.clip import save_clip_run

    out = Path(out_run_dir)
    check_replaceable(out)
    model, config, tokenizer = build_conse(spec, **options)
    check_finite(f"conse:{spec}", model.state_dict())  # a local text model's damaged weights
    with staged_dir(out) as tmp:
        save_clip_run(tmp, config, model, tokenizer)
    m, h = config.model, config.model.head
    params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: ConSE over %s, %d labels, T=%d, temperature %g", out, spec, len(h.conse_labels),
             h.conse_top_k, h.conse_temperature)
    return {"run": str(out), "task": "clip", "source": f"conse:{spec}", "parameters": params,
            "architecture": {"image_encoder": m.vision.encoder, "text_encoder": m.text.encoder,
                             "embed_dim": h.embed_dim, "labels": len(h.conse_labels), "top_k": h.conse_top_k,
                             "temperature": h.conse_temperature, "template": h.conse_template,
                             "definitions": bool(h.conse_definitions),
                             "image_size": m.vision.image_size}}

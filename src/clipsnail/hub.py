"""Run directories: `config.json` + `model.safetensors` (+ `tokenizer.json`), and `load` to get a model back.

Weights only ever travel as safetensors: nothing here unpickles a file. Checkpoints from elsewhere (OpenAI CLIP /
open_clip, official LeMeViT) become run directories through `clipsnail.convert` (`clipsnail convert`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipsnail.config import from_dict, to_dict
from clipsnail.engine import load_weights, save_weights
from clipsnail.errors import ConfigError, DataError
from clipsnail.safeio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def save_run(run_dir: str | Path, task: str, config, model: torch.nn.Module, tokenizer=None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / "model.safetensors", metadata={"task": task})
    if tokenizer is not None:
        with atomic_path(run_dir / "tokenizer.json") as tmp:
            tokenizer.save(tmp)
    atomic_write_text(run_dir / "config.json", json.dumps({"task": task, **to_dict(config)}, indent=2) + "\n")


def read_run_config(run_dir: str | Path) -> tuple[str, dict]:
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


def load(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "model"):
    """The model of a run directory, in eval mode, ready for inference.

    CLIP runs return a `clipsnail.models.CLIP` with its tokenizer and preprocess attached, so that
    `model.encode_text(["a red circle"])` and `model.encode_image([pil_image])` work directly.
    Classification runs return the timm model with `.preprocess`, `.class_names` and `.config` attached.
    PixelSNAIL runs return the model with `.config`. Text-to-image runs return a generator with
    `.generate(prompt, ...)`: `FeatureRetriever` (kind retrieve) or `TextToImage` (kind pixelsnail).
    weights: "model" (the end of training: model.safetensors) or "best" (best.safetensors, the best validation
    score, when the run kept one).
    """
    if weights not in ("model", "best"):
        raise ValueError(f"weights must be 'model' or 'best', got {weights!r}")
    run_dir = Path(run_dir)
    task, data = read_run_config(run_dir)
    config = run_dir / "config.json"
    try:
        model = _build(run_dir, task, data)
    except ConfigError as e:  # the run's config.json, not the user's flags, holds the bad value
        raise DataError(f"{config}: {e}") from None
    except (ValueError, TypeError) as e:
        raise DataError(f"{config}: cannot build its model ({e})") from None
    weights = run_dir / f"{weights}.safetensors"
    if not weights.is_file():
        raise DataError(f"{run_dir}: no {weights.name}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise DataError(f"{weights}: cannot read weights ({e})") from e
    load_weights(model, state, weights, f"the model that {config} describes")
    model = model.to(device).eval()
    if task == "t2i_retrieve":  # text-to-image runs come back as generators
        from clipsnail.tasks.text2image import FeatureRetriever

        return FeatureRetriever(model, run_dir)
    if task == "t2i_pixelsnail":
        from clipsnail.tasks.text2image import TextToImage

        return TextToImage(model, model.config).to(device).eval()
    return model


def _build(run_dir: Path, task: str, data: dict) -> torch.nn.Module:
    """The untrained model that a run's config.json describes, with its inference helpers attached."""
    if task == "clip":
        from clipsnail.data.tokenizers import TextTokenizer
        from clipsnail.data.transforms import eval_transform
        from clipsnail.models.clip import CLIP
        from clipsnail.tasks.clip import ClipConfig

        cfg = from_dict(ClipConfig, data)
        if cfg.model.text_encoder.startswith("hf:"):
            cfg.model.text_encoder = f"hf:{run_dir / 'text_encoder'}"
        model = CLIP(cfg.model, load_weights=False)
        model.tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
        model.preprocess = eval_transform(cfg.model.image_size, cfg.model.image_mean, cfg.model.image_std,
                                          cfg.model.image_interpolation)
        model.config = cfg
        model.run_dir = run_dir.resolve()  # an index records which run encoded its vectors
    elif task == "classify":
        from clipsnail.tasks.classify import ClassifyConfig, build_classifier, eval_transform

        cfg = from_dict(ClassifyConfig, data)
        model = build_classifier(cfg.model, load_weights=False)
        model.preprocess = eval_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)
        model.class_names = list(cfg.model.class_names)
        model.config = cfg
    elif task == "pixelsnail":
        from clipsnail.models.pixelsnail import PixelSNAIL
        from clipsnail.tasks.pixelsnail import PixelSNAILTaskConfig

        cfg = from_dict(PixelSNAILTaskConfig, data)
        model = PixelSNAIL(cfg.model)
        model.config = cfg
    elif task == "t2i_retrieve":
        from clipsnail.data.tokenizers import TextTokenizer
        from clipsnail.models.text2feat import TextToFeature
        from clipsnail.tasks.text2image import RetrieveConfig

        cfg = from_dict(RetrieveConfig, data)
        model = TextToFeature(cfg.model)
        model.tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
        model.config = cfg
    elif task == "t2i_pixelsnail":
        from clipsnail.models.pixelsnail import PixelSNAIL
        from clipsnail.tasks.text2image import TextPixelSNAILConfig

        cfg = from_dict(TextPixelSNAILConfig, data)
        model = PixelSNAIL(cfg.model)
        model.config = cfg
    else:
        raise DataError(f"{run_dir / 'config.json'}: unknown task {task!r}; valid: clip, classify, pixelsnail, "
                        f"t2i_retrieve, t2i_pixelsnail")
    return model

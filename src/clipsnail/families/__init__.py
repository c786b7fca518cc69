"""The run formats of each model family, and `load`: a run directory's trained model, ready for inference.

This floor lies between inference and training. Training (`clipsnail.tasks`) imports it to write a run; whatever
serves a trained model (`clipsnail.load`, the index, search, zero-shot and evaluation commands, the web app) imports
it to read one, and never imports the trainer. One module per family: its run config, how a run of it is written
and how it is loaded. Weights only ever travel as safetensors: nothing here unpickles a file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from clipsnail.core.devices import resolve_device
from clipsnail.core.errors import DataError
from clipsnail.core.runs import read_run_config

# The task name in a run's config.json -> the module of its family, imported only when such a run is loaded.
FAMILIES = {
    "clip": "clip",  # a CLIP model: encode_text / encode_image take strings, PIL images or paths
    "classify": "classify",  # a timm classifier with .config, .class_names, .preprocess
    "pixelsnail": "pixelsnail",  # PixelSNAIL with .config
    "t2i_retrieve": "t2i_retrieve",  # a FeatureRetriever: .generate(prompt, k) -> nearest known images
    "t2i_pixelsnail": "t2i_pixelsnail",  # a TextToImage: .generate(prompt, n, guidance, rerank)
    "caption": "caption",  # a Captioner: .caption(images, beam_size, rerank_clip) -> captions
}


def load(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "model",
         resolve: Callable[[str | Path], Path] | None = None):
    """The model of a run directory, for inference: in eval mode on `device`, its parameters not requiring
    gradients, so that what it returns (embeddings, logits, captions, samples) holds no autograd graph; a loop
    keeping embeddings of a whole folder would otherwise keep every graph too. `model.requires_grad_()` makes it
    trainable again. What each kind is: `FAMILIES`.
    weights: "model" (the end of training: model.safetensors) or "best" (best.safetensors, the best validation
    score, when the run kept one). resolve: turns a model name into a run directory (the app that knows names,
    such as hf-hub:ORG/NAME, hands it in; `clipsnail.load` does). device: a torch device or its name, or "auto"
    (CUDA, else MPS, else the CPU)."""
    run_dir = resolve(run_dir) if resolve is not None else Path(run_dir)
    task, data = read_run_config(run_dir)
    if task not in FAMILIES:
        raise DataError(f"{run_dir / 'config.json'}: unknown task {task!r}; valid: {', '.join(FAMILIES)}")
    family = importlib.import_module(f"clipsnail.families.{FAMILIES[task]}")
    return family.load_run(run_dir, data, weights).to(resolve_device(device)).eval().requires_grad_(False)

"""`clipsnail.load(run)`: the trained model of any run directory, ready for inference.

Each task module knows how to load its own runs (`load_run`); this is the table that picks one by the task name in
the run's config.json. Weights only ever travel as safetensors: nothing here unpickles a file. Checkpoints from
elsewhere (OpenAI CLIP / open_clip, official LeMeViT) become run directories through `clipsnail convert`, or, for
open_clip models on the Hugging Face hub, by name (`hf-hub:ORG/NAME`, see `clipsnail.apps.model_names`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipsnail.apps.model_names import resolve_run
from clipsnail.core.devices import resolve_device
from clipsnail.core.errors import DataError
from clipsnail.core.runs import read_run_config
from clipsnail.tasks import caption, classify, clip, pixelsnail, t2i_pixelsnail, t2i_retrieve

LOADERS = {
    "clip": clip.load_run,  # a CLIP model: encode_text / encode_image take strings, PIL images or paths
    "classify": classify.load_run,  # a timm classifier with .config, .class_names, .preprocess
    "pixelsnail": pixelsnail.load_run,  # PixelSNAIL with .config
    "t2i_retrieve": t2i_retrieve.load_run,  # a FeatureRetriever: .generate(prompt, k) -> nearest known images
    "t2i_pixelsnail": t2i_pixelsnail.load_run,  # a TextToImage: .generate(prompt, n, guidance, rerank)
    "caption": caption.load_run,  # a Captioner: .caption(images, beam_size, rerank_clip) -> captions
}


def load(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "model"):
    """The model of a run directory, for inference: in eval mode on `device`, its parameters not requiring
    gradients, so that what it returns (embeddings, logits, captions, samples) holds no autograd graph; a loop
    keeping embeddings of a whole folder would otherwise keep every graph too. `model.requires_grad_()` makes it
    trainable again. What each kind is: `LOADERS`.
    weights: "model" (the end of training: model.safetensors) or "best" (best.safetensors, the best validation
    score, when the run kept one). `run_dir` may also be a model name such as hf-hub:ORG/NAME (`resolve_run`).
    device: a torch device or its name, or "auto" (CUDA, else MPS, else the CPU)."""
    run_dir = resolve_run(run_dir)
    task, data = read_run_config(run_dir)
    if task not in LOADERS:
        raise DataError(f"{run_dir / 'config.json'}: unknown task {task!r}; valid: {', '.join(LOADERS)}")
    return LOADERS[task](run_dir, data, weights).to(resolve_device(device)).eval().requires_grad_(False)

"""`clipsnail.load(run)`: the trained model of any run directory or model name, ready for inference.

The run formats and their loaders are `clipsnail.families`; this app hands them the one thing they do not know,
model names: `hf-hub:ORG/NAME` (an open_clip model on the Hugging Face hub) and `conse:IMAGE+TEXT` become run
directories through `clipsnail.apps.model_names`. Checkpoints from elsewhere (OpenAI CLIP / open_clip, official
LeMeViT) become run directories through `clipsnail convert`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipsnail.apps.model_names import resolve_run
from clipsnail.families import load as load_run_dir


def load(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "model"):
    """`clipsnail.families.load` of a run directory or a model name (`resolve_run`)."""
    return load_run_dir(run_dir, device=device, weights=weights, resolve=resolve_run)

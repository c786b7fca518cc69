"""Image captioning: a small causal Transformer decoder (`models.captioner`) trained on a caption corpus while
attending to the tokens of a frozen pretrained image tower, and `load_run` for a trained caption run.

The tower is frozen, so each image is encoded once, before training, and its tokens are kept in memory (half
precision); an epoch is then every caption once, with teacher forcing. Validation decodes the validation images
by beam search and scores BLEU-4 and CIDEr-D against their captions (and, on generated shapes data, whether the
caption names a colour and a shape that are in the image).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from clipsnail.core import distributed as dist
from clipsnail.core import pretrained
from clipsnail.core.distributed import unwrap
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import save_run
from clipsnail.data.caption_corpora import captions_by_image, load_caption_split
from clipsnail.data.datasets import CaptionTargets
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.families.caption import (
    CaptionConfig,
    load_token_encoder,
)
from clipsnail.inference.captioner import (
    caption_metrics,
    decode_captions,
    generated_scenes,
    shapes_caption_metrics,
)
from clipsnail.inference.evaluate import encode_every_image
from clipsnail.models.caption_decoder import CaptionDecoder
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


class CaptionTask(Task):
    name = "caption"

    def __init__(self, config: CaptionConfig, run_dir: str | Path | None = None, progress: bool = True):
        # settled here from the data (sizes, classes, the tokenizer's facts), in a copy: the caller's stays as given
        self.config = config = copy.deepcopy(config)
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



"""Text to image by drawing pixels: PixelSNAIL conditioned, in every gated block, on the frozen CLIP text
embedding of the caption (the `h` of Conditional PixelCNN). With probability `cond_dropout` the embedding is
replaced by a learned null vector, which lets the sampler use classifier-free guidance; the CLIP run also reranks
the samples.
"""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path

import torch

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.rng import seeded
from clipsnail.core.runs import save_run
from clipsnail.data.caption_corpora import load_caption_split
from clipsnail.data.datasets import CaptionImageDataset
from clipsnail.families.clip import load_clip_run
from clipsnail.families.pixelsnail import image_transform, mean_bits_per_dim
from clipsnail.families.t2i_pixelsnail import TextPixelSNAILConfig
from clipsnail.models.pixelsnail import PixelSNAIL
from clipsnail.tasks.pixelsnail import initialised_model, nll_loss
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_captions(clip, captions: list[str], batch_size: int = 512) -> tuple[dict[str, int], torch.Tensor]:
    """Distinct captions -> (row of each caption text, L2-normalised CLIP text embeddings (N, D))."""
    from clipsnail.inference.evaluate import encode_texts

    rows: dict[str, int] = {}
    for c in captions:
        rows.setdefault(c, len(rows))
    return rows, encode_texts(clip, list(rows), batch_size)


class TextPixelSNAILTask(Task):
    name = "t2i_pixelsnail"
    progress_logs = ("bits_per_dim",)  # the progress bar in the unit the paper and the evaluation report

    def __init__(self, config: TextPixelSNAILConfig, run_dir: str | Path | None = None):
        # settled here from the data (sizes, classes, the tokenizer's facts), in a copy: the caller's stays as given
        self.config = config = copy.deepcopy(config)
        if not 0 <= config.cond_dropout < 1:
            raise ConfigError(f"cond_dropout must be in [0, 1), got {config.cond_dropout}")
        data = config.data
        names, captions, caption_to_image = load_caption_split(data, "train")
        clip = load_clip_run(config.clip)
        self.rows, self.embeddings = embed_captions(clip, captions)
        m = config.model
        m.channels, m.cond_dim, m.null_condition = 3, self.embeddings.shape[1], config.cond_dropout > 0
        self.transform = image_transform(data.image_size, None)
        self.train_dataset = CaptionImageDataset(data.images, names, captions, caption_to_image, self.transform,
                                                 sampling="image", strict=data.strict)
        self.val_dataset = None
        try:
            names, captions, caption_to_image = load_caption_split(data, "val")
            self.val_dataset = CaptionImageDataset(data.images, names, captions, caption_to_image, self.transform,
                                                   sampling="image", strict=data.strict)
            rows, embeddings = embed_captions(clip, [c for c in captions if c not in self.rows])
            for c, i in rows.items():
                self.rows[c] = i + len(self.embeddings)
            self.embeddings = torch.cat([self.embeddings, embeddings])
        except DataError as e:
            log.info("no validation during training (%s)", e)
        self.dims = 3 * data.image_size**2
        log.info("text-conditioned PixelSNAIL %s on %d images %dx%d, CLIP text embeddings of size %d",
                 config.preset, len(self.train_dataset), data.image_size, data.image_size, m.cond_dim)

    def condition(self, captions: list[str]) -> torch.Tensor:
        return self.embeddings[torch.tensor([self.rows[c] for c in captions])]

    @staticmethod
    def inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["images"], batch["h"]

    def build_model(self) -> PixelSNAIL:
        return initialised_model(self.config.model, self.train_dataset, self.collate, self.inputs,
                                 self.config.train.batch_size)

    def collate(self, samples: list) -> dict | None:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None
        return {"images": torch.stack([s["image"] for s in kept]), "h": self.condition([s["caption"] for s in kept])}

    def loss(self, model: PixelSNAIL, batch: dict):
        h = batch["h"]
        if model.training and self.config.cond_dropout > 0:
            drop = torch.rand(h.shape[0], 1, device=h.device) < self.config.cond_dropout
            h = torch.where(drop, model.unconditional(h.shape[0]), h)
        return nll_loss(model, batch["images"], h, self.config.model.nr_mix, self.dims)

    @torch.no_grad()
    def evaluate(self, model: PixelSNAIL) -> dict[str, float]:
        """Bits/dim of validation images given one of their captions (fixed choice), up to max_eval_images."""
        if self.val_dataset is None:
            return {}
        n = min(len(self.val_dataset), self.config.data.max_eval_images)
        batches = (self.collate([self.val_dataset[(i, i)] for i in range(start, min(start + 64, n))])
                   for start in range(0, n, 64))
        bpd = mean_bits_per_dim(model, (self.inputs(b) for b in batches if b is not None), self.config.model.nr_mix,
                                self.dims)
        return {} if bpd is None else {"val_bits_per_dim": bpd}

    def after_epoch(self, model: PixelSNAIL, run_dir: Path, epoch: int) -> None:
        k = self.config.data.eval_prompts
        if k <= 0 or self.val_dataset is None:
            return
        from clipsnail.inference.sampling import sample, save_sample_grid

        captions = sorted(set(self.val_dataset.captions))
        with seeded(epoch):
            prompts = random.sample(captions, min(k, len(captions)))
        images = sample(model, len(prompts), self.config.data.image_size, h=self.condition(prompts), seed=epoch)
        save_sample_grid(images, run_dir / "samples" / f"epoch_{epoch + 1:03d}.png", title=f"epoch {epoch + 1}",
                         labels=prompts)

    def save(self, model: PixelSNAIL, run_dir: Path) -> None:
        save_run(run_dir, self.name, self.config, model)



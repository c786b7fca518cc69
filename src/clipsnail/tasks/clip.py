"""The CLIP training task: caption corpus -> tokenizer + CLIP model + contrastive loss + retrieval evaluation.

Only what is specific to CLIP lives here; the loop itself is `clipsnail.engine.fit`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from clipsnail.config import OptimConfig, TrainConfig
from clipsnail.data.captions import group_by_image, read_captions, split_records
from clipsnail.data.datasets import CaptionImageDataset
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.data.transforms import clip_train_transform, eval_transform
from clipsnail.engine import param_groups_by_prefix
from clipsnail.errors import DataError
from clipsnail.losses import clip_loss, positives_from_ids
from clipsnail.models.clip import CLIP, ClipModelConfig

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass
class ClipDataConfig:
    captions: str = ""  # caption file (any format of DESIGN.md)
    images: str = ""  # folder the caption file's image names are relative to
    format: str = "auto"
    split_file: str = ""  # Karpathy-style split JSON; default: 80/10/10 by a hash of the image name
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE trained on the training captions) or "char"
    vocab_size: int = 2048
    context_length: int = 32
    sampling: str = "image"  # "image": one random caption per image per epoch; "pair": every caption
    augment: bool = True
    strict: bool = False  # a corrupt image is an error instead of a skipped sample
    cache_mb: float = 512  # keep decoded training images in memory up to this size
    max_eval_images: int = 1000  # validation during training uses at most this many images


@dataclasses.dataclass
class ClipLossConfig:
    multi_positive: bool = True  # captions of the same image in one batch are all positives
    same_caption_positive: bool = True  # identical caption texts of different images are positives too


@dataclasses.dataclass
class FinetuneConfig:
    lock_image: bool = False  # freeze the image tower (open_clip --lock-image; seed 000 trainable=False)
    lock_text: bool = False
    image_lr: float | None = None  # per-part learning rates (seed 000: 1e-4 image, 1e-5 text, 1e-3 heads)
    text_lr: float | None = None
    head_lr: float | None = None


@dataclasses.dataclass
class ClipConfig:
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    data: ClipDataConfig = dataclasses.field(default_factory=ClipDataConfig)
    loss: ClipLossConfig = dataclasses.field(default_factory=ClipLossConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def load_caption_split(data: ClipDataConfig, split: str):
    """-> (image names, captions, caption_to_image) for one split, after checking every image file exists."""
    if not data.captions or not data.images:
        raise DataError("no training data: give --captions FILE and --images DIR")
    images_dir = Path(data.images)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found")
    records = read_captions(data.captions, data.format)
    records = split_records(records, split, split_file=data.split_file or None)
    if not records:
        raise DataError(f"{data.captions}: no captions in split {split!r}")
    for r in records:
        if not (images_dir / r.image).is_file():
            raise DataError(f"{r.source}: image {r.image!r} not found in {images_dir}")
    return group_by_image(records)


class ClipTask:
    name = "clip"

    def __init__(self, config: ClipConfig, run_dir: str | Path | None = None):
        self.config = config
        data = config.data
        names, captions, caption_to_image = load_caption_split(data, "train")
        m = config.model
        tokenizer_path = Path(run_dir) / "tokenizer.json" if run_dir else None
        if tokenizer_path is not None and tokenizer_path.exists():  # resuming: keep the vocabulary of the run
            self.tokenizer = TextTokenizer.load(tokenizer_path)
        elif m.text_encoder.startswith("hf:"):  # a pretrained tower comes with its own vocabulary
            self.tokenizer = TextTokenizer.from_pretrained(m.text_encoder[3:], data.context_length)
        else:
            self.tokenizer = build_tokenizer(data.tokenizer, captions, data.vocab_size, data.context_length)
        m.vocab_size, m.context_length = self.tokenizer.vocab_size, self.tokenizer.context_length
        m.pad_id = self.tokenizer.pad_id
        if self.tokenizer.eot_id is not None:
            m.eot_id = self.tokenizer.eot_id
        self.train_dataset = CaptionImageDataset(
            data.images, names, captions, caption_to_image,
            clip_train_transform(m.image_size, m.image_mean, m.image_std, data.augment),
            sampling=data.sampling, strict=data.strict, cache_mb=data.cache_mb,
        )
        self.val = None
        try:
            self.val = load_caption_split(data, "val")
        except DataError as e:
            log.info("no validation during training (%s)", e)
        log.info("training on %d images with %d captions", len(names), len(captions))

    def build_model(self) -> CLIP:
        model = CLIP(self.config.model)
        model.tokenizer = self.tokenizer
        model.preprocess = eval_transform(model.cfg.image_size, model.cfg.image_mean, model.cfg.image_std)
        ft = self.config.finetune
        for locked, tower in ((ft.lock_image, model.visual), (ft.lock_text, model.text)):
            if locked:
                tower.requires_grad_(False)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        ft = self.config.finetune
        return param_groups_by_prefix(model, [
            ("image_tower", ("visual.",), ft.image_lr),
            ("text_tower", ("text.",), ft.text_lr),
            ("heads", ("image_projection.", "text_projection.", "logit_scale"), ft.head_lr),
        ], self.config.optim.lr)

    def collate(self, samples: list) -> dict | None:
        kept = [s for s in samples if s is not None]
        self.train_dataset.skipped += len(samples) - len(kept)
        if not kept:
            return None
        return {
            "images": torch.stack([s["image"] for s in kept]),
            "tokens": self.tokenizer([s["caption"] for s in kept]),
            "image_ids": torch.tensor([s["image_id"] for s in kept]),
            "caption_ids": torch.tensor([s["caption_id"] for s in kept]),
        }

    def loss(self, model: nn.Module, batch: dict):
        ft = self.config.finetune
        if ft.lock_image:
            model.visual.eval()  # frozen BatchNorm statistics must not drift either
        if ft.lock_text:
            model.text.eval()
        image_emb, text_emb, scale = model(batch["images"], batch["tokens"])
        lc = self.config.loss
        ids = [batch["image_ids"]] if lc.multi_positive else []
        if lc.same_caption_positive:
            ids.append(batch["caption_ids"])
        positives = positives_from_ids(*ids) if ids else None
        loss = clip_loss(image_emb.float(), text_emb.float(), scale.float(), positives)
        with torch.no_grad():
            hits = (image_emb @ text_emb.T).argmax(dim=1)
            ok = positives[torch.arange(len(hits)), hits] if positives is not None else hits == torch.arange(
                len(hits), device=hits.device)
        return loss, {"logit_scale": scale.item(), "batch_i2t_acc": ok.float().mean().item()}

    def after_optimizer_step(self, model: nn.Module) -> None:
        with torch.no_grad():  # open_clip: clamp the temperature so exp(t) <= 100
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def evaluate(self, model: CLIP) -> dict[str, float]:
        if self.val is None:
            return {}
        from clipsnail.evaluate import encode_image_paths, encode_texts, retrieval_metrics

        names, captions, c2i = self.val
        keep = len(names) if len(names) <= self.config.data.max_eval_images else self.config.data.max_eval_images
        pairs = [(c, i) for c, i in zip(captions, c2i) if i < keep]
        paths = [Path(self.config.data.images) / n for n in names[:keep]]
        was_training = model.training
        image_emb, _ = encode_image_paths(model, paths, progress=False)
        text_emb = encode_texts(model, [c for c, _ in pairs])
        model.train(was_training)
        metrics = retrieval_metrics(image_emb, text_emb, [i for _, i in pairs], ks=(1, 5, 10))
        return {f"val_{k}": v for k, v in metrics.items() if "recall" in k}

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        if self.train_dataset.skipped:
            log.warning("%d corrupt training images skipped so far", self.train_dataset.skipped)

    def save(self, model: CLIP, run_dir: Path) -> None:
        from clipsnail.hub import save_run

        save_run(run_dir, "clip", self.config, model, self.tokenizer)
        if self.config.model.text_encoder.startswith("hf:"):
            # The architecture of a pretrained tower travels with the run; its weights are in model.safetensors.
            (run_dir / "text_encoder").mkdir(exist_ok=True)
            shutil.copyfile(Path(self.config.model.text_encoder[3:]) / "config.json",
                            run_dir / "text_encoder" / "config.json")

"""The CLIP task: caption corpus -> tokenizer + CLIP model + contrastive loss + retrieval evaluation, and
`load_run` for a trained CLIP run.

Only what is specific to CLIP lives here; the loop itself is `clipsnail.train.engine.fit`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset

from clipsnail.core import distributed as dist
from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.distributed import unwrap
from clipsnail.core.errors import DataError
from clipsnail.core.pretrained import text_model_dir
from clipsnail.core.runs import (
    build_described,
    build_for_weights,
    load_run_weights,
    load_weights,
    read_run_config,
    read_weights,
    save_run,
)
from clipsnail.data.caption_corpora import CaptionDataConfig, load_caption_split
from clipsnail.data.datasets import CaptionImageDataset
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.data.transforms import clip_train_transform, eval_transform
from clipsnail.models.clip import CLIP, ClipModelConfig, InferenceKit
from clipsnail.train.losses import distributed_clip_loss
from clipsnail.train.optim import param_groups_by_prefix
from clipsnail.train.task import Task

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass
class ClipDataConfig(CaptionDataConfig):
    # WebDataset tar shards to stream instead ("data/{000000..000099}.tar", see `clipsnail data shards`); the
    # caption file, when also given, then only serves validation.
    shards: str = ""
    shuffle_buffer: int = 1000  # samples shuffled together while streaming shards
    tokenizer_captions: int = 200_000  # shards: train the BPE on at most this many captions from the first shards
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE trained on the training captions) or "char"
    vocab_size: int = 2048
    context_length: int = 32
    sampling: str = "image"  # "image": one random caption per image per epoch; "pair": every caption
    augment: bool = True
    cache_mb: float = 512  # keep decoded training images in memory up to this size
    max_eval_images: int = 1000  # validation during training uses at most this many images


@dataclasses.dataclass
class ClipLossConfig:
    multi_positive: bool = True  # captions of the same image in one batch are all positives
    same_caption_positive: bool = True  # identical caption texts of different images are positives too
    # Under torchrun each process scores only its own rows against the gathered batch (open_clip --local-loss):
    # [b, B] logits instead of [B, B] per process, same gradients.
    local_loss: bool = False


@dataclasses.dataclass
class FinetuneConfig:
    # A CLIP run to start from (e.g. one written by `clipsnail convert`): its architecture, tokenizer and weights
    # replace the model section; the training run keeps its own data, optimiser and schedule.
    init: str = ""
    lock_image: bool = False  # freeze the image tower (open_clip --lock-image)
    lock_text: bool = False
    image_lr: float | None = None  # per-part learning rates (e.g. 1e-4 image, 1e-5 text, 1e-3 heads)
    text_lr: float | None = None
    head_lr: float | None = None
    # A ConSE image head (model.image_projection=conse): its ImageNet classifier and its label-embedding matrix
    classifier_lr: float | None = None
    label_lr: float | None = None


@dataclasses.dataclass
class ClipConfig:
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    data: ClipDataConfig = dataclasses.field(default_factory=ClipDataConfig)
    loss: ClipLossConfig = dataclasses.field(default_factory=ClipLossConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def tokenizer_facts(tokenizer: TextTokenizer) -> dict[str, int]:
    """What a text tower must agree on with its tokenizer: vocabulary size, context length, padding and end ids."""
    facts = {"vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length,
             "pad_id": tokenizer.pad_id}
    if tokenizer.eot_id is not None:  # else the model's default (a pretrained tower pools without one)
        facts["eot_id"] = tokenizer.eot_id
    return facts


class ClipTask(Task):
    couples_batch = True  # the contrastive loss: accumulation embeds the whole batch first (open_clip accum_freq)
    name = "clip"

    def __init__(self, config: ClipConfig, run_dir: str | Path | None = None):
        self.config = config
        data = config.data
        self.init_weights = None
        if config.finetune.init:
            self.init_weights = self._take_init_run(config.finetune.init)
        m = config.model
        transform = clip_train_transform(m.image_size, m.image_mean, m.image_std, data.augment, m.image_interpolation)
        self.train_captions: list[str] | None = None  # None: streaming; read from the shards when needed
        if data.shards:
            from clipsnail.data.shards import ShardStream

            self.train_dataset = ShardStream(data.shards, transform, seed=config.train.seed,
                                             shuffle_buffer=data.shuffle_buffer, strict=data.strict)
            log.info("streaming %d images from %s", self.train_dataset.num_samples, data.shards)
        else:
            if not data.captions or not data.images:
                raise DataError("no training data: give --captions FILE and --images DIR, or --shards")
            names, self.train_captions, caption_to_image = load_caption_split(data, "train")
            self.train_dataset = CaptionImageDataset(data.images, names, self.train_captions, caption_to_image,
                                                     transform, sampling=data.sampling, strict=data.strict,
                                                     cache_mb=data.cache_mb)
            log.info("training on %d images with %d captions", len(names), len(self.train_captions))
        self.tokenizer = self._tokenizer(Path(run_dir) if run_dir else None)
        # The text tower is built for this tokenizer: a copy of the config takes its facts (the caller's stays as
        # given), and the run's config.json records them.
        self.config = config = dataclasses.replace(
            config, model=dataclasses.replace(m, **tokenizer_facts(self.tokenizer)))
        self.val = None
        if data.captions or not data.shards:
            try:
                self.val = load_caption_split(data, "val")
            except DataError as e:
                log.info("no validation during training (%s)", e)

    def _take_init_run(self, run: str) -> dict[str, torch.Tensor]:
        task, data = read_run_config(run)
        if task != "clip":
            raise DataError(f"{run}: finetune.init needs a CLIP run, this one is a {task!r} run")
        self.config.model = from_dict(ClipModelConfig, data.get("model", {}), where=f"{run}/config.json model")
        log.info("starting from the weights of %s", run)
        return read_weights(Path(run) / "model.safetensors")

    def _tokenizer(self, run_dir: Path | None) -> TextTokenizer:
        m, data = self.config.model, self.config.data
        if run_dir is not None and (run_dir / "tokenizer.json").exists():  # resuming: keep the run's vocabulary
            return TextTokenizer.load(run_dir / "tokenizer.json")
        if self.config.finetune.init:  # the weights come with their vocabulary
            return TextTokenizer.load(Path(self.config.finetune.init) / "tokenizer.json")
        if m.text_encoder.startswith("hf:"):  # a pretrained tower comes with its own vocabulary
            return TextTokenizer.from_pretrained(text_model_dir(m.text_encoder[3:]), data.context_length)

        def train() -> TextTokenizer:
            captions = self.train_captions
            if captions is None:
                from clipsnail.data.shards import read_shard_captions

                captions = read_shard_captions(data.shards, data.tokenizer_captions)
            return build_tokenizer(data.tokenizer, captions, data.vocab_size, data.context_length)

        return dist.from_main(train)  # trained once; every rank must encode text identically

    def build_model(self) -> CLIP:
        model = CLIP(self.config.model)
        if self.init_weights is not None:
            init = self.config.finetune.init
            load_weights(model, self.init_weights, Path(init) / "model.safetensors",
                         f"the model of {init}/config.json")
        ready_for_inference(model, self.tokenizer, self.config)
        ft = self.config.finetune
        for locked, tower in ((ft.lock_image, model.visual), (ft.lock_text, model.text)):
            if locked:
                tower.requires_grad_(False)
        return model

    def example_batch(self) -> dict:
        """A collated batch of the first two readable training samples (from the first shard of a stream): the
        example input of `clipsnail clip summary`."""
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):  # a stream of shards
            dataset.set_epoch(0, batch_size=2)
            readable = iter(dataset)
        else:
            readable = (dataset[(i, i)] for i in range(len(dataset)))
        return self.collate(list(itertools.islice((s for s in readable if s is not None), 2)))

    def param_groups(self, model: nn.Module) -> list[dict]:
        ft = self.config.finetune
        return param_groups_by_prefix(model, [
            ("image_tower", ("visual.",), ft.image_lr),
            ("text_tower", ("text.",), ft.text_lr),
            ("classifier", ("image_projection.classifier.",), ft.classifier_lr),
            ("label_embeddings", ("image_projection.label_embeddings",), ft.label_lr),
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

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        ft, clip = self.config.finetune, unwrap(model)
        if ft.lock_image:
            clip.visual.eval()  # frozen BatchNorm statistics must not drift either
        if ft.lock_text:
            clip.text.eval()
        image_emb, text_emb, scale = model(batch["images"], batch["tokens"])  # through DDP's hooks
        return {"image": image_emb, "text": text_emb, "scale": scale}

    def loss(self, model: nn.Module, batch: dict):
        return self.loss_from_embeddings(model, [self.embed(model, batch)], batch, fresh=0)

    def loss_from_embeddings(self, model: nn.Module, parts: list[dict], batch: dict, fresh: int):
        """The contrastive loss of the whole batch from its micro-batches' embeddings (one part: no accumulation).
        `parts[fresh]` carries gradients; the temperature is taken from it only in the last micro-step, so it
        gets its gradient once, as in one full batch (open_clip counts it accum_freq times)."""
        image_emb = torch.cat([p["image"] for p in parts]).float()
        text_emb = torch.cat([p["text"] for p in parts]).float()
        scale = parts[fresh]["scale"].float()
        if fresh != len(parts) - 1:
            scale = scale.detach()
        lc = self.config.loss
        ids = [batch["image_ids"]] if lc.multi_positive else []
        if lc.same_caption_positive:
            ids.append(batch["caption_ids"])
        loss = distributed_clip_loss(image_emb, text_emb, scale, ids, local_loss=lc.local_loss)
        with torch.no_grad():  # this process's rows only: a cheap training signal, not a metric
            hits = (image_emb @ text_emb.T).argmax(dim=1)
            ok = hits == torch.arange(len(hits), device=hits.device)
            for v in ids:  # a hit on any positive counts (positives_from_ids's rule, without its [B, B] matrix)
                ok |= v == v[hits]
        return loss, {"logit_scale": scale.item(), "batch_i2t_acc": ok.float().mean().item()}

    def after_optimizer_step(self, model: nn.Module) -> None:
        with torch.no_grad():  # open_clip: clamp the temperature so exp(t) <= 100
            unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def evaluate(self, model: CLIP) -> dict[str, float]:
        if self.val is None:
            return {}
        from clipsnail.inference.evaluate import encode_image_paths, encode_texts, retrieval_metrics

        names, captions, c2i = self.val
        keep = len(names) if len(names) <= self.config.data.max_eval_images else self.config.data.max_eval_images
        pairs = [(c, i) for c, i in zip(captions, c2i) if i < keep]
        paths = [Path(self.config.data.images) / n for n in names[:keep]]
        was_training = model.training
        image_emb, _ = encode_image_paths(model, paths, progress=False)
        text_emb = encode_texts(model, [c for c, _ in pairs])
        model.train(was_training)
        metrics = retrieval_metrics(image_emb, text_emb, [i for _, i in pairs], ks=(1, 5, 10))
        # The gallery's size says what a recall means: R@5 over 15 images is 1/3 by chance alone.
        return {**{f"val_{k}": v for k, v in metrics.items() if "recall" in k},
                "val_num_images": len(paths), "val_num_captions": len(pairs)}

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        if self.train_dataset.skipped:
            log.warning("%d corrupt training images skipped so far", self.train_dataset.skipped)

    def save(self, model: CLIP, run_dir: Path) -> None:
        save_clip_run(run_dir, self.config, model, self.tokenizer)


def save_clip_run(run_dir: Path, config: ClipConfig, model: CLIP, tokenizer: TextTokenizer) -> None:
    """config.json, model.safetensors, tokenizer.json and, for a pretrained Hugging Face text tower, its
    architecture (text_encoder/config.json: the run then loads without the package that provided the weights)."""
    save_run(run_dir, "clip", config, model, tokenizer)
    if config.model.text_encoder.startswith("hf:"):
        (run_dir / "text_encoder").mkdir(exist_ok=True)
        shutil.copyfile(Path(text_model_dir(config.model.text_encoder[3:])) / "config.json",
                        run_dir / "text_encoder" / "config.json")


def ready_for_inference(model: CLIP, tokenizer: TextTokenizer, config: ClipConfig, run_dir: Path | None = None
                        ) -> CLIP:
    """Give a CLIP model what `encode_text` / `encode_image` need to take raw strings and images (its tokenizer and
    evaluation transform), its whole config, and the run it came from (an index records it)."""
    m = config.model
    model.inference = InferenceKit(tokenizer=tokenizer, config=config,
                                   preprocess=eval_transform(m.image_size, m.image_mean, m.image_std,
                                                             m.image_interpolation),
                                   run_dir=run_dir.resolve() if run_dir is not None else None)
    return model


def load_run(run_dir: Path, data: dict, weights: str = "model") -> CLIP:
    """The CLIP model of a run directory (config.json section `data`), with its tokenizer and preprocess."""
    config = build_described(run_dir, lambda: from_dict(ClipConfig, data))
    if config.model.text_encoder.startswith("hf:"):  # the architecture travels with the run (see ClipTask.save)
        config.model.text_encoder = f"hf:{run_dir / 'text_encoder'}"
    model = build_for_weights(run_dir, lambda: CLIP(config.model, load_weights=False), weights)
    load_run_weights(model, run_dir, weights)
    return ready_for_inference(model, TextTokenizer.load(run_dir / "tokenizer.json"), config, run_dir)


def load_clip_run(run: str | Path) -> CLIP:
    """A CLIP run as a frozen model for another task (text-to-image conditioning, image features)."""
    run = Path(run)
    task, data = read_run_config(run)
    if task != "clip":
        raise DataError(f"{run}: a CLIP run directory is needed, this one is a {task!r} run")
    return load_run(run, data).eval().requires_grad_(False)

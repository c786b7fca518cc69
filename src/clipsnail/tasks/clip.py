"""The CLIP task: caption corpus -> tokenizer + CLIP model + contrastive loss. Its locked towers' kept outputs
are `clip_towers.LockedTowers`, its evaluation `clip_evaluation.ClipEvaluation`, its run format
`clipsnail.families.clip`; the loop itself is `clipsnail.train.engine.fit`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset

from clipsnail.core import distributed as dist
from clipsnail.core.distributed import unwrap
from clipsnail.core.errors import DataError
from clipsnail.core.pretrained import text_model_dir
from clipsnail.core.runs import (
    load_weights,
)
from clipsnail.data.caption_corpora import load_caption_split
from clipsnail.data.datasets import CaptionImageDataset
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.data.transforms import clip_train_transform
from clipsnail.families.clip import (
    ClipConfig,
    check_clip_config,
    ready_for_inference,
    save_clip_run,
    take_init_run,
    tokenizer_facts,
)
from clipsnail.models.clip import CLIP, ClipModelConfig
from clipsnail.tasks.clip_evaluation import ClipEvaluation
from clipsnail.tasks.clip_towers import LockedTowers
from clipsnail.train.losses import distributed_clip_loss, distributed_siglip_loss
from clipsnail.train.optim import param_groups_by_prefix
from clipsnail.train.task import Task

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)
SECOND_HEAD_PREFIXES = ("second_image_projection.", "second_text_projection.", "first_share_logit")
# SigLIP's initial temperature and bias (Zhai et al. 2023): t' = log 10, b = -10.
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = math.log(10.0), -10.0


class ClipTask(Task):
    couples_batch = True  # the contrastive loss: accumulation embeds the whole batch first (open_clip accum_freq)
    name = "clip"

    def __init__(self, config: ClipConfig, run_dir: str | Path | None = None):
        check_clip_config(config)
        self.config = config
        data = config.data
        self.init_weights = None
        if config.finetune.init:
            config, self.init_weights = take_init_run(config)
            self.config = config
        m = config.model
        v = m.vision
        transform = clip_train_transform(v.image_size, v.mean, v.std, data.augment, v.interpolation)
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
        # The text tower is built for this tokenizer, and SigLIP's bias is a weight of the model: a copy of the
        # config takes both (the caller's stays as given), and the run's config.json records them.
        self.config = config = dataclasses.replace(
            config, model=m.with_changes(text=tokenizer_facts(self.tokenizer), head=self._loss_weights(m)))
        self.towers = LockedTowers(config.finetune, data, self.tokenizer)
        self.val = None
        if data.captions or not data.shards:
            try:
                self.val = load_caption_split(data, "val")
            except DataError as e:
                log.info("no validation during training (%s)", e)
        self.evaluation = ClipEvaluation(config, self.val, self.towers)

    def _loss_weights(self, m: ClipModelConfig) -> dict:
        """SigLIP's start (Zhai et al. 2023): temperature 10 and bias -10, unless the model has a bias already (a
        SigLIP run taken up again). A CLIP init run's temperature was learned for the softmax and is replaced."""
        if self.config.loss.kind != "siglip" or m.head.init_logit_bias is not None:
            return {}
        return {"init_logit_scale": SIGLIP_LOGIT_SCALE, "init_logit_bias": SIGLIP_LOGIT_BIAS}

    def _tokenizer(self, run_dir: Path | None) -> TextTokenizer:
        m, data = self.config.model, self.config.data
        if run_dir is not None and (run_dir / "tokenizer.json").exists():  # resuming: keep the run's vocabulary
            return TextTokenizer.load(run_dir / "tokenizer.json")
        if self.config.finetune.init:  # the weights come with their vocabulary
            return TextTokenizer.load(Path(self.config.finetune.init) / "tokenizer.json")
        if m.text.encoder.startswith("hf:"):  # a pretrained tower comes with its own vocabulary
            return TextTokenizer.from_pretrained(text_model_dir(m.text.encoder[3:]), data.context_length)

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
            init, state = self.config.finetune.init, dict(self.init_weights)
            if model.logit_bias is not None and "logit_bias" not in state:  # a CLIP run, fine-tuned with SigLIP
                state.update(logit_scale=model.logit_scale.detach(), logit_bias=model.logit_bias.detach())
            if model.first_share_logit is not None and "first_share_logit" not in state:  # a second pair added
                state.update({k: v for k, v in model.state_dict().items() if k.startswith(SECOND_HEAD_PREFIXES)})
            load_weights(model, state, Path(init) / "model.safetensors", f"the model of {init}/config.json")
        ready_for_inference(model, self.tokenizer)
        ft = self.config.finetune
        if ft.lock_image:
            model.lock_image_tower(ft.lock_image_unlocked_groups, ft.lock_image_freeze_bn_stats)
        if ft.lock_text:
            model.lock_text_tower()
        return model

    # ------------------------------------------------------------------------------- locked towers, run once

    def prepare(self, model: nn.Module, device: torch.device, run_dir: Path, progress: bool) -> None:
        self.towers.prepare(unwrap(model), self.train_dataset, run_dir, progress)

    def example_batch(self) -> dict:
        """A collated batch of the first two readable training samples (from the first pass over the shards of a
        stream): the example input of `clipsnail clip summary`. DataError when no training image can be read."""
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):  # a stream of shards, endless: one pass at most
            dataset.set_epoch(0, batch_size=2)
            kept, skipped, first = [], 0, None
            for sample in itertools.islice(iter(dataset), dataset.num_samples):
                if sample is None:
                    skipped += 1
                    continue
                kept.append(sample)
                if len(kept) == 2:
                    break
        else:
            kept, skipped, first = readable_examples(dataset, 2)
        if not kept:
            raise DataError(f"no training image could be read ({skipped} skipped)"
                            + (f", e.g. {first}" if first else ""))
        return self.collate(kept)

    def param_groups(self, model: nn.Module) -> list[dict]:
        ft = self.config.finetune
        return param_groups_by_prefix(model, [
            ("image_tower", ("visual.",), ft.image_lr),
            ("text_tower", ("text.",), ft.text_lr),
            ("classifier", ("image_projection.classifier.",), ft.classifier_lr),
            ("label_embeddings", ("image_projection.label_embeddings",), ft.label_lr),
            ("second_heads", SECOND_HEAD_PREFIXES, ft.second_head_lr),
            ("heads", ("image_projection.", "text_projection.", "logit_scale", "logit_bias"), ft.head_lr),
        ], self.config.optim.lr)

    def collate(self, samples: list) -> dict | None:
        kept = [s for s in samples if s is not None]
        self.train_dataset.skipped += len(samples) - len(kept)
        if not kept:
            return None
        batch = {"image_ids": torch.tensor([s["image_id"] for s in kept]),
                 "caption_ids": torch.tensor([s["caption_id"] for s in kept])}
        if "image_features" in kept[0]:  # a locked image tower's kept outputs (`prepare`)
            batch["image_features"] = torch.stack([s["image_features"] for s in kept])
        else:
            batch["images"] = torch.stack([s["image"] for s in kept])
        if "text_features" in kept[0]:
            batch["text_features"] = torch.stack([s["text_features"] for s in kept])
        else:
            batch["tokens"] = self.tokenizer([s["caption"] for s in kept])
        return batch

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        image_emb, text_emb, scale = model(batch.get("images"), batch.get("tokens"),  # through DDP's hooks
                                           image_features=batch.get("image_features"),
                                           text_features=batch.get("text_features"))
        return {"image": image_emb, "text": text_emb, "scale": scale, "bias": unwrap(model).logit_bias}

    def loss(self, model: nn.Module, batch: dict):
        return self.loss_from_embeddings(model, [self.embed(model, batch)], batch, fresh=0)

    def loss_from_embeddings(self, model: nn.Module, parts: list[dict], batch: dict, fresh: int):
        """The contrastive loss of the whole batch from its micro-batches' embeddings (one part: no accumulation).
        `parts[fresh]` carries gradients; the temperature (and SigLIP's bias) are taken from it only in the last
        micro-step, so they get their gradient once, as in one full batch (open_clip counts it accum_freq times)."""
        image_emb = torch.cat([p["image"] for p in parts]).float()
        text_emb = torch.cat([p["text"] for p in parts]).float()
        scale, bias = parts[fresh]["scale"].float(), parts[fresh]["bias"]
        if fresh != len(parts) - 1:
            scale, bias = scale.detach(), bias.detach() if bias is not None else None
        lc = self.config.loss
        ids = [batch["image_ids"]] if lc.multi_positive else []
        if lc.same_caption_positive:
            ids.append(batch["caption_ids"])
        logs = {"logit_scale": scale.item()}
        if unwrap(model).first_share is not None:
            logs["first_share"] = unwrap(model).first_share.item()
        if lc.kind == "siglip":
            loss = distributed_siglip_loss(image_emb, text_emb, scale, bias.float(), ids)
            logs["logit_bias"] = bias.item()
        else:
            loss = distributed_clip_loss(image_emb, text_emb, scale, ids, local_loss=lc.local_loss)
        with torch.no_grad():  # this process's rows only: a cheap training signal, not a metric
            hits = (image_emb @ text_emb.T).argmax(dim=1)
            ok = hits == torch.arange(len(hits), device=hits.device)
            for v in ids:  # a hit on any positive counts (positives_from_ids's rule, without its [B, B] matrix)
                ok |= v == v[hits]
        return loss, {**logs, "batch_i2t_acc": ok.float().mean().item()}

    def after_optimizer_step(self, model: nn.Module) -> None:
        with torch.no_grad():  # open_clip: clamp the temperature so exp(t) <= 100
            unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def evaluate(self, model: CLIP) -> dict[str, float]:
        return self.evaluation(model)

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        if self.train_dataset.skipped:
            log.warning("%d corrupt training images skipped so far", self.train_dataset.skipped)

    def save(self, model: CLIP, run_dir: Path) -> None:
        save_clip_run(run_dir, self.config, model, self.tokenizer)


def readable_examples(dataset: CaptionImageDataset, count: int) -> tuple[list[dict], int, str | None]:
    """(the samples of the first `count` readable images, how many images before them could not be read, why the
    first of those could not), trying each image once with its first caption. The dataset, strict for the while,
    raises instead of logging a warning per image: the caller says it once."""
    kept, skipped, first = [], 0, None
    strict, dataset.strict = dataset.strict, True
    try:
        for image_id, captions in enumerate(dataset.captions_of):
            if not captions:
                continue
            index = image_id if dataset.sampling == "image" else captions[0]
            try:
                sample = dataset[(index, index)]
            except DataError as e:
                sample, first = None, first or str(e)
            if sample is None:
                skipped += 1
                continue
            kept.append(sample)
            if len(kept) == count:
                break
    finally:
        dataset.strict = strict
    return kept, skipped, first

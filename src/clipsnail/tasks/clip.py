"""The CLIP task: caption corpus -> tokenizer + CLIP model + contrastive loss + retrieval evaluation, and
`load_run` for a trained CLIP run.

Only what is specific to CLIP lives here; the loop itself is `clipsnail.train.engine.fit`.
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
from clipsnail.train.feature_cache import FeatureCache, content_digest, weights_digest
from clipsnail.train.losses import distributed_clip_loss, distributed_siglip_loss
from clipsnail.train.optim import param_groups_by_prefix
from clipsnail.train.task import Task

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)
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
        # The text tower is built for this tokenizer, and SigLIP's bias is a weight of the model: a copy of the
        # config takes both (the caller's stays as given), and the run's config.json records them.
        self.config = config = dataclasses.replace(
            config, model=dataclasses.replace(m, **tokenizer_facts(self.tokenizer), **self._loss_weights(m)))
        self.memo: dict[tuple[str, str], torch.Tensor] = {}  # see `tower_outputs`
        self.cache_folder: Path | None = None  # RUN/feature_cache, once training has started (`prepare`)
        self.val = None
        if data.captions or not data.shards:
            try:
                self.val = load_caption_split(data, "val")
            except DataError as e:
                log.info("no validation during training (%s)", e)

    def _loss_weights(self, m: ClipModelConfig) -> dict:
        """SigLIP's start (Zhai et al. 2023): temperature 10 and bias -10, unless the model has a bias already (a
        SigLIP run taken up again). A CLIP init run's temperature was learned for the softmax and is replaced."""
        if self.config.loss.kind != "siglip" or m.init_logit_bias is not None:
            return {}
        return {"init_logit_scale": SIGLIP_LOGIT_SCALE, "init_logit_bias": SIGLIP_LOGIT_BIAS}

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
            init, state = self.config.finetune.init, dict(self.init_weights)
            if model.logit_bias is not None and "logit_bias" not in state:  # a CLIP run, fine-tuned with SigLIP
                state.update(logit_scale=model.logit_scale.detach(), logit_bias=model.logit_bias.detach())
            load_weights(model, state, Path(init) / "model.safetensors", f"the model of {init}/config.json")
        ready_for_inference(model, self.tokenizer)
        ft = self.config.finetune
        if ft.lock_image:
            model.lock_image_tower(ft.lock_image_unlocked_groups, ft.lock_image_freeze_bn_stats)
        if ft.lock_text:
            model.lock_text_tower()
        return model

    # ------------------------------------------------------------------------------- locked towers, run once

    def image_tower_frozen(self) -> bool:
        """Wholly locked and in eval mode: the tower gives an image the same output at every step."""
        ft = self.config.finetune
        return ft.lock_image and not ft.lock_image_unlocked_groups and ft.lock_image_freeze_bn_stats

    def cached_towers(self) -> tuple[bool, bool]:
        """(image, text): which towers run once over the training data instead of at every step. Where a locked
        tower cannot, one line says why it runs at every step."""
        ft, data = self.config.finetune, self.config.data
        image = self.image_tower_frozen()
        if not ft.cache_features or not (image or ft.lock_text):
            return False, False
        if data.shards:
            log.warning("the locked towers run at every step: training streams shards, whose samples are not known "
                        "in advance")
            return False, False
        if image and data.augment:
            log.warning("the locked image tower runs at every step: random augmentation (data.augment) gives every "
                        "step another view of each image; with data.augment=false it would encode each image once")
            image = False
        return image, ft.lock_text

    def prepare(self, model: nn.Module, device: torch.device, run_dir: Path, progress: bool) -> None:
        """Locked towers under deterministic inputs encode the training set here, once (kept in RUN/feature_cache
        for a resume); the dataset then gives their outputs instead of pixels and tokens."""
        image, text = self.cached_towers()
        dataset, clip = self.train_dataset, unwrap(model)
        self.cache_folder = run_dir / "feature_cache"
        if image:  # NaN rows: images that cannot be read, skipped by the dataset as it skips undecodable ones
            paths = [dataset.image_path(i) for i in range(len(dataset.image_names))]
            dataset.image_features = dist.from_main(lambda: self.tower_outputs(clip, "image", paths, progress))
            unreadable = int(dataset.image_features.isnan().any(dim=1).sum())
            if unreadable == len(paths):  # every sample would be skipped: no step could ever be made
                raise DataError(f"no training image could be read ({unreadable} skipped)")
        if text:
            dataset.text_features = dist.from_main(lambda: self.tower_outputs(clip, "text", dataset.captions))

    def tower_outputs(self, clip: CLIP, name: str, items: list, progress: bool = False) -> torch.Tensor:
        """The image tower's outputs for image paths (`name` "image", "val_image"...; NaN rows for images that cannot
        be read) or the text tower's for captions ("text", "val_text"), read back from RUN/feature_cache where kept.
        Remembered for the tower's weights, so that each evaluation of a locked tower costs only the heads."""
        is_image = not name.endswith("text")
        tower = clip.visual if is_image else clip.text
        key = weights_digest(tower, repr(clip.preprocess) if is_image else "")
        if (name, key) not in self.memo:
            cache = FeatureCache(self.cache_folder, name, key)
            was_training = clip.training
            clip.eval()
            self.memo[(name, key)] = image_tower_outputs(clip, cache, items, progress) if is_image \
                else cache.outputs(*text_digests_and_encoder(clip, self.tokenizer(list(items))))
            clip.train(was_training)
        return self.memo[(name, key)]

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
        """Retrieval on the validation captions and, with train.zeroshot_folder, zero-shot accuracy on its classes.
        A wholly locked tower's outputs are computed once for the whole run (kept like the training set's)."""
        metrics, was_training = {}, model.training
        model.eval()
        if self.val is not None:
            metrics.update(self.evaluate_retrieval(model))
        if self.config.train.zeroshot_folder:
            metrics.update(self.evaluate_zero_shot(model))
        model.train(was_training)
        return metrics

    def embed_images(self, model: CLIP, name: str, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings for evaluation, readable [N] bool), as `encode_image_paths` gives them (rows of
        unreadable images zero), from the locked tower's kept outputs when it is wholly locked."""
        if not (self.config.finetune.cache_features and self.image_tower_frozen()):
            from clipsnail.inference.evaluate import encode_image_paths

            return encode_image_paths(model, paths, progress=False)
        features = self.tower_outputs(model, name, paths)
        readable = ~features.isnan().any(dim=1)
        with torch.no_grad():
            embedded = model.project_image(features[readable]).cpu()
        return torch.zeros(len(paths), embedded.shape[1]).index_copy_(0, readable.nonzero()[:, 0], embedded), readable

    def embed_texts(self, model: CLIP, name: str, texts: list[str]) -> torch.Tensor:
        from clipsnail.inference.evaluate import encode_texts

        if not (self.config.finetune.cache_features and self.config.finetune.lock_text):
            return encode_texts(model, texts)
        with torch.no_grad():
            return model.project_text(self.tower_outputs(model, name, texts)).cpu()

    def evaluate_retrieval(self, model: CLIP) -> dict[str, float]:
        from clipsnail.inference.evaluate import retrieval_metrics

        names, captions, c2i = self.val
        keep = len(names) if len(names) <= self.config.data.max_eval_images else self.config.data.max_eval_images
        pairs = [(c, i) for c, i in zip(captions, c2i) if i < keep]
        paths = [Path(self.config.data.images) / n for n in names[:keep]]
        image_emb, _ = self.embed_images(model, "val_image", paths)
        text_emb = self.embed_texts(model, "val_text", [c for c, _ in pairs])
        metrics = retrieval_metrics(image_emb, text_emb, [i for _, i in pairs], ks=(1, 5, 10))
        # The gallery's size says what a recall means: R@5 over 15 images is 1/3 by chance alone.
        return {**{f"val_{k}": v for k, v in metrics.items() if "recall" in k},
                "val_num_images": len(paths), "val_num_captions": len(pairs)}

    def evaluate_zero_shot(self, model: CLIP) -> dict[str, float]:
        """open_clip's zero-shot evaluation while training: the class names in the default prompt templates,
        ensembled; at most data.max_eval_images images, spread evenly over the folder's sorted order."""
        from clipsnail.data.images import list_image_folder
        from clipsnail.inference.evaluate import default_templates, zero_shot_accuracy, zero_shot_weights

        paths, labels, classes = list_image_folder(self.config.train.zeroshot_folder)
        step = max(1, math.ceil(len(paths) / self.config.data.max_eval_images))
        image_emb, readable = self.embed_images(model, "zeroshot_image", paths[::step])
        metrics = zero_shot_accuracy(image_emb, readable, labels[::step],
                                     zero_shot_weights(model, classes, default_templates()))
        return {f"zeroshot_{k}": v for k, v in metrics.items()}

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        if self.train_dataset.skipped:
            log.warning("%d corrupt training images skipped so far", self.train_dataset.skipped)

    def save(self, model: CLIP, run_dir: Path) -> None:
        save_clip_run(run_dir, self.config, model, self.tokenizer)


def image_digest(path: Path) -> str | None:
    """The digest of an image file's bytes, or None when it cannot be read (said in the log)."""
    from clipsnail.core.safeio import read_regular

    try:
        return content_digest(read_regular(path))
    except DataError as e:
        log.warning("skipping %s", e)
        return None


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


def image_tower_outputs(clip: CLIP, cache: FeatureCache, paths: list[Path], progress: bool) -> torch.Tensor:
    """The image tower's outputs for `paths` through `cache` (items named by their files' bytes), decoded and
    preprocessed as for evaluation; NaN rows for images that cannot be read."""
    from clipsnail.inference.evaluate import encode_image_paths

    digests = [image_digest(p) for p in paths]
    readable = [i for i, d in enumerate(digests) if d is not None]
    if not readable:
        raise DataError(f"none of the {len(paths)} images for the {cache.name} features could be read, e.g. "
                        f"{paths[0]}" if paths else f"no images for the {cache.name} features")

    def encode(rows: list[int]) -> torch.Tensor:
        out, decoded = encode_image_paths(clip, [paths[readable[i]] for i in rows], progress=progress,
                                          encode=lambda x: clip.visual(x.to(clip.device)))
        return out.masked_fill(~decoded[:, None], math.nan)  # read, but not decodable: kept as such

    kept = cache.outputs([digests[i] for i in readable], encode)
    return torch.full((len(paths), kept.shape[1]), math.nan).index_copy_(0, torch.tensor(readable), kept)


def text_digests_and_encoder(clip: CLIP, tokens: torch.Tensor, batch_size: int = 256):
    """(a digest of each caption's token ids, and the text tower's outputs for rows of them, in batches): what
    `FeatureCache.outputs` takes."""
    digests = [content_digest(t.numpy().tobytes()) for t in tokens]

    @torch.no_grad()
    def encode(rows: list[int]) -> torch.Tensor:
        chosen = tokens[rows]
        return torch.cat([clip.text(chosen[i:i + batch_size].to(clip.device)).float().cpu()
                          for i in range(0, len(chosen), batch_size)])

    return digests, encode



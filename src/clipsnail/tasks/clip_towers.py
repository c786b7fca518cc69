"""The locked towers of a CLIP fine-tuning (LiT: Zhai et al. 2022): when a tower is wholly locked under
deterministic inputs, it runs once over the training images or captions, and over the validation and zero-shot
sets, instead of at every step; its outputs are kept in RUN/feature_cache (`clipsnail.train.feature_cache`) for a
resume, and remembered for its weights so that each evaluation costs only the heads.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from clipsnail.core import distributed as dist
from clipsnail.core.errors import DataError
from clipsnail.data.datasets import CaptionImageDataset
from clipsnail.data.tokenizers import TextTokenizer
from clipsnail.families.clip import ClipDataConfig, FinetuneConfig
from clipsnail.models.clip import CLIP
from clipsnail.train.feature_cache import FeatureCache, content_digest, weights_digest

log = logging.getLogger(__name__)


class LockedTowers:
    """Which towers of a CLIP run are locked and cached (`finetune`, `data`), their kept outputs, and the
    embeddings that evaluation takes from them."""

    def __init__(self, finetune: FinetuneConfig, data: ClipDataConfig, tokenizer: TextTokenizer):
        self.finetune, self.data, self.tokenizer = finetune, data, tokenizer
        self.memo: dict[tuple[str, str], torch.Tensor] = {}  # see `outputs`
        self.cache_folder: Path | None = None  # RUN/feature_cache, once training has started (`prepare`)

    def image_tower_frozen(self) -> bool:
        """Wholly locked and in eval mode: the tower gives an image the same output at every step."""
        ft = self.finetune
        return ft.lock_image and not ft.lock_image_unlocked_groups and ft.lock_image_freeze_bn_stats

    def cached(self) -> tuple[bool, bool]:
        """(image, text): which towers run once over the training data instead of at every step. Where a locked
        tower cannot, one line says why it runs at every step."""
        ft, data = self.finetune, self.data
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

    def prepare(self, clip: CLIP, dataset: CaptionImageDataset, run_dir: Path, progress: bool) -> None:
        """Locked towers under deterministic inputs encode the training set here, once (kept in RUN/feature_cache
        for a resume); the dataset then gives their outputs instead of pixels and tokens."""
        image, text = self.cached()
        self.cache_folder = run_dir / "feature_cache"
        if image:  # NaN rows: images that cannot be read, skipped by the dataset as it skips undecodable ones
            paths = [dataset.image_path(i) for i in range(len(dataset.image_names))]
            dataset.image_features = dist.from_main(lambda: self.outputs(clip, "image", paths, progress))
            unreadable = int(dataset.image_features.isnan().any(dim=1).sum())
            if unreadable == len(paths):  # every sample would be skipped: no step could ever be made
                raise DataError(f"no training image could be read ({unreadable} skipped)")
        if text:
            dataset.text_features = dist.from_main(lambda: self.outputs(clip, "text", dataset.captions))

    def outputs(self, clip: CLIP, name: str, items: list, progress: bool = False) -> torch.Tensor:
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

    def embed_images(self, model: CLIP, name: str, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings for evaluation, readable [N] bool), as `encode_image_paths` gives them (rows of
        unreadable images zero), from the locked tower's kept outputs when it is wholly locked."""
        if not (self.finetune.cache_features and self.image_tower_frozen()):
            from clipsnail.inference.evaluate import encode_image_paths

            return encode_image_paths(model, paths, progress=False)
        features = self.outputs(model, name, paths)
        readable = ~features.isnan().any(dim=1)
        with torch.no_grad():
            embedded = model.project_image(features[readable]).cpu()
        return torch.zeros(len(paths), embedded.shape[1]).index_copy_(0, readable.nonzero()[:, 0], embedded), readable

    def embed_texts(self, model: CLIP, name: str, texts: list[str]) -> torch.Tensor:
        from clipsnail.inference.evaluate import encode_texts

        if not (self.finetune.cache_features and self.finetune.lock_text):
            return encode_texts(model, texts)
        with torch.no_grad():
            return model.project_text(self.outputs(model, name, texts)).cpu()


def image_digest(path: Path) -> str | None:
    """The digest of an image file's bytes, or None when it cannot be read (said in the log)."""
    from clipsnail.core.safeio import read_regular

    try:
        return content_digest(read_regular(path))
    except DataError as e:
        log.warning("skipping %s", e)
        return None


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

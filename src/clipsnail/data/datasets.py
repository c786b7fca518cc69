"""Datasets over caption corpora. Items are addressed by (index, seed) so that augmentation randomness is a pure
function of the engine's data order, which is what makes resume exact (see `clipsnail.train.engine`)."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from clipsnail.core.errors import DataError
from clipsnail.core.rng import seeded
from clipsnail.data.images import load_image
from clipsnail.data.photo_facts import decoded_photo_facts

log = logging.getLogger(__name__)


class CaptionImageDataset(Dataset):
    """Images with one or more captions each.

    sampling="image": one item per image, with one of its captions drawn at random (each epoch sees every image
    once and a batch never holds the same image twice); sampling="pair": one item per caption.
    A corrupt image yields None (collate drops it and counts it) unless strict. Decoded images are kept in memory
    up to `cache_mb` (small corpora are then decoded once, not once per epoch).

    `image_features` [images, D] / `text_features` [captions, D], when a task sets them: the kept outputs of a
    locked tower, given in place of the image ("image_features") or beside the caption ("text_features"); the
    items and their order stay those of the pixels. A NaN row is an image that could not be read.
    """

    def __init__(
        self,
        images_dir: str | Path,
        image_names: Sequence[str],
        captions: Sequence[str],
        caption_to_image: Sequence[int],
        transform: Callable,
        sampling: str = "image",
        strict: bool = False,
        cache_mb: float = 0,
    ):
        if sampling not in ("image", "pair"):
            raise ValueError(f"sampling must be 'image' or 'pair', got {sampling!r}")
        self.images_dir = Path(images_dir)
        self.image_names, self.captions = list(image_names), list(captions)
        self.caption_to_image = list(caption_to_image)
        self.captions_of: list[list[int]] = [[] for _ in self.image_names]
        for c, i in enumerate(self.caption_to_image):
            self.captions_of[i].append(c)
        # Identical caption texts (common in small synthetic corpora) get one id: the loss may treat them as positives.
        text_ids: dict[str, int] = {}
        self.caption_text_id = [text_ids.setdefault(" ".join(c.lower().split()), len(text_ids)) for c in captions]
        self.transform, self.sampling, self.strict = transform, sampling, strict
        self.skipped = 0
        self._cache: dict[int, Image.Image] = {}
        self._cache_left = cache_mb * 2**20
        self.image_features: torch.Tensor | None = None
        self.text_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_names) if self.sampling == "image" else len(self.captions)

    def image_path(self, i: int) -> Path:
        return self.images_dir / self.image_names[i]

    def load(self, i: int) -> Image.Image:
        image = self._cache.get(i)
        if image is None:
            image = load_image(self.image_path(i))
            nbytes = image.width * image.height * len(image.getbands())
            if nbytes <= self._cache_left:
                self._cache[i], self._cache_left = image, self._cache_left - nbytes
        return image

    def __getitem__(self, item: tuple[int, int] | int):
        index, seed = item if isinstance(item, tuple) else (item, item)
        with seeded(seed):
            if self.sampling == "image":
                image_id = index
                caption_id = random.choice(self.captions_of[index])
            else:
                caption_id, image_id = index, self.caption_to_image[index]
            if self.image_features is not None:
                sample = {"image_features": self.image_features[image_id]}
                if sample["image_features"].isnan().any():  # unreadable, said once when the tower encoded it
                    return None
            else:
                try:
                    sample = {"image": self.transform(self.load(image_id))}
                except DataError as e:
                    if self.strict:
                        raise
                    log.warning("skipping %s", e)
                    return None
        sample.update(caption=self.captions[caption_id], image_id=image_id,
                      caption_id=self.caption_text_id[caption_id])
        if self.text_features is not None:
            sample["text_features"] = self.text_features[caption_id]
        return sample


class CaptionTargets(Dataset):
    """Every caption once per epoch, with the row of its image in a table of precomputed image features (tasks
    whose image side is a frozen encoder, run once over the images): items (caption, image row)."""

    def __init__(self, captions: list[str], caption_to_image: list[int]):
        self.captions, self.caption_to_image = captions, caption_to_image

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[str, int]:
        index = item[0] if isinstance(item, tuple) else item
        return self.captions[index], self.caption_to_image[index]


class ImageListDataset(Dataset):
    """Plain list of image paths for encoding (search, evaluation); unreadable files yield None.
    min_side: decode each image only to about this shorter side (`load_image`); None: full size.
    with_facts: items are (index, (image, PhotoFacts)), the facts read from the same decode (an index's catalogue)."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable, strict: bool = False,
                 min_side: int | None = None, with_facts: bool = False):
        self.paths, self.transform, self.strict = [Path(p) for p in paths], transform, strict
        self.min_side, self.with_facts = min_side, with_facts

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            if not self.with_facts:
                return index, self.transform(load_image(path, min_side=self.min_side))
            facts = []
            mtime = os.stat(path).st_mtime

            def inspect(opened, full_size, stored):
                facts.append(decoded_photo_facts(opened, full_size, stored, mtime))
            image = self.transform(load_image(path, min_side=self.min_side, inspect=inspect))
            return index, (image, facts[0])
        except OSError as e:  # the stat of a file gone since it was listed
            if self.strict:
                raise DataError(f"{path}: cannot read image: {e.strerror or e}") from e
            log.warning("skipping %s: %s", path, e.strerror or e)
            return index, None
        except DataError as e:
            if self.strict:
                raise
            log.warning("skipping %s", e)
            return index, None


def collate_indexed_images(items):
    """-> (indices of the readable images, stacked images or None), and their facts (a list) for items of an
    ImageListDataset with_facts."""
    kept = [(i, im) for i, im in items if im is not None]
    if not kept:
        return torch.empty(0, dtype=torch.long), None
    indices = torch.tensor([i for i, _ in kept])
    if isinstance(kept[0][1], tuple):
        return indices, torch.stack([im for _, (im, _) in kept]), [facts for _, (_, facts) in kept]
    return indices, torch.stack([im for _, im in kept])

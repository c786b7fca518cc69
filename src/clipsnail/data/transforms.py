"""Image transforms (torchvision.transforms.v2). Positions matter in captions ("to the left of"), so the CLIP
training transform never flips; it only jitters scale slightly, as open_clip's RandomResizedCrop(0.9, 1.0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from clipsnail.core.errors import ConfigError

INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"the image interpolation must be 'bilinear' or 'bicubic', got {name!r}")
    return INTERPOLATIONS[name]


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side, centre-crop, normalise. OpenAI's and open_clip's CLIP resize bicubically."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(size, interpolation=interpolation_mode(interpolation), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def clip_train_transform(size: int, mean: Sequence[float], std: Sequence[float], augment: bool = True,
                         interpolation: str = "bilinear"):
    if not augment:
        return eval_transform(size, mean, std, interpolation)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(0.95, 1.05),
                             interpolation=interpolation_mode(interpolation), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])

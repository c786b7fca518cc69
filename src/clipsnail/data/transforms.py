"""Image transforms (torchvision.transforms.v2). Positions matter in captions ("to the left of"), so the CLIP
training transform never flips; it only jitters scale slightly, as open_clip's RandomResizedCrop(0.9, 1.0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(size, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def clip_train_transform(size: int, mean: Sequence[float], std: Sequence[float], augment: bool = True):
    if not augment:
        return eval_transform(size, mean, std)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(0.95, 1.05), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])

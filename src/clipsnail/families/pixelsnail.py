"""A PixelSNAIL run: its config (the official code's optimiser as the default), how it is loaded, and its
likelihood in bits/dim, for evaluation and sampling without the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import build_described, build_for_weights, load_run_weights
from clipsnail.data.classes import ClassData, ClassImageDataset
from clipsnail.layers.mixture import bits_per_dim, discretized_mix_logistic_nll
from clipsnail.models.pixelsnail import CONFIGS, PixelSNAIL, PixelSNAILConfig


def pixelsnail_optim() -> OptimConfig:
    """The optimiser of the official PixelSNAIL code, for every PixelSNAIL task: Adam (no weight decay) with betas
    (0.95, 0.9995) and eps 1e-6 at lr 1e-3, no warmup, the learning rate multiplied by 0.999998 after every step,
    no gradient clipping."""
    return OptimConfig(lr=1e-3, weight_decay=0.0, betas=(0.95, 0.9995), eps=1e-6, warmup_steps=0,
                       schedule="exponential", lr_decay=0.999998, grad_clip=0.0)


@dataclasses.dataclass
class PixelSNAILDataConfig:
    data: str = ""  # mnist:DIR | cifar:DIR | folder:ROOT | ROOT
    image_size: int = 0  # 0: the data's own size (folders: 32)
    val_fraction: float = 0.0
    test_fraction: float = 0.1
    eval_split: str = "test"  # bits/dim reported after every epoch on this split (no model selection on it)
    max_eval_images: int = 1000
    condition: str = ""  # "class": condition on the label (one-hot h); "": unconditional
    samples_per_epoch: int = 16  # sample grid after every epoch (0: none)


@dataclasses.dataclass
class PixelSNAILTaskConfig:
    preset: str = "small"  # a named architecture (models.pixelsnail.CONFIGS); model.* overrides its fields
    model: PixelSNAILConfig = dataclasses.field(default_factory=PixelSNAILConfig)
    data: PixelSNAILDataConfig = dataclasses.field(default_factory=PixelSNAILDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=pixelsnail_optim)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=32, ema_decay=0.9995))
    class_names: list[str] = dataclasses.field(default_factory=list)  # filled in from the data


def preset_overrides(name: str) -> list[str]:
    """`--config small` -> ["model.filters=64", ...]: a preset is a list of defaults that --set can override."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown PixelSNAIL config {name!r}; choose from {', '.join(CONFIGS)}")
    return [f"preset={name}"] + [f"model.{k}={v}" for k, v in CONFIGS[name].items()]


def load_run(run_dir: Path, data: dict, weights: str = "model") -> PixelSNAIL:
    """The PixelSNAIL of a run directory, with `config` (the run's PixelSNAILTaskConfig: image size, classes)."""
    config = build_described(run_dir, lambda: from_dict(PixelSNAILTaskConfig, data))
    model = build_for_weights(run_dir, lambda: PixelSNAIL(config.model), weights)
    load_run_weights(model, run_dir, weights)
    model.config = config
    return model


def image_transform(size: int, native: int | None) -> v2.Compose:
    """PIL image -> float tensor in [-1, 1] on the 256 levels k / 127.5 - 1 (no augmentation, as the paper)."""
    steps: list = [v2.ToImage()]
    if native != size:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Lambda(_to_signed)])


def _to_signed(t: torch.Tensor) -> torch.Tensor:  # a named function, not a lambda: DataLoader workers pickle it
    return t * 2 - 1


def one_hot_condition(labels: torch.Tensor, cond_dim: int) -> torch.Tensor | None:
    """Class labels -> the one-hot `h` of a class-conditional PixelSNAIL; None when it is unconditional."""
    return F.one_hot(labels, cond_dim).float() if cond_dim else None


@torch.no_grad()
def mean_bits_per_dim(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], nr_mix: int,
                      dims: int) -> float | None:
    """Mean negative log-likelihood in bits per dimension over (images, h) batches, in eval mode (no dropout), on
    the model's device; None when the batches held no image."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for images, h in batches:
            images = images.to(device)
            h = h.to(device) if h is not None else None
            total += discretized_mix_logistic_nll(images, model(images, h=h).float(), nr_mix,
                                                  reduce=False).sum().item()
            count += len(images)
    finally:
        model.train(was_training)
    return bits_per_dim(total / count, dims) if count else None


@torch.no_grad()
def evaluate_bits_per_dim(model: nn.Module, data: ClassData, transform, config: PixelSNAILTaskConfig,
                          batch_size: int = 64, progress: bool = False) -> float:
    """Mean negative log-likelihood of `data` in bits per dimension (eval mode: no dropout)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dataset = ClassImageDataset(data, transform)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
    batches = ((batch["images"], one_hot_condition(batch["labels"], config.model.cond_dim))
               for batch in tqdm(loader, disable=not progress, desc="bits/dim", leave=False) if batch is not None)
    bpd = mean_bits_per_dim(model, batches, config.model.nr_mix, config.model.channels * config.data.image_size ** 2)
    if bpd is None:
        raise DataError(f"{data.source}: no readable images in split {data.split!r}")
    return bpd

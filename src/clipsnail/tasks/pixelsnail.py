"""The PixelSNAIL task: images -> PixelSNAIL -> discretised-logistic-mixture likelihood, reported in bits/dim.

As the official code: Adam with betas (0.95, 0.9995), the learning rate decayed by 0.999998 after every step,
Polyak averaging (EMA 0.9995) whose weights are evaluated and sampled, dropout, data-dependent initialisation on the
first batch. After every epoch: test bits/dim and a grid of samples.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import build_described, build_for_weights, load_run_weights, save_run
from clipsnail.data.classes import ClassData, ClassImageDataset, read_class_data
from clipsnail.layers.causal import data_dependent_init
from clipsnail.layers.mixture import bits_per_dim, discretized_mix_logistic_nll
from clipsnail.models.pixelsnail import CONFIGS, PixelSNAIL, PixelSNAILConfig
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


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


def initialised_model(config: PixelSNAILConfig, dataset: Sequence, collate: Callable[[list], dict],
                      inputs: Callable[[dict], tuple[torch.Tensor, torch.Tensor | None]],
                      batch_size: int) -> PixelSNAIL:
    """A new PixelSNAIL after data-dependent initialisation on the first max(batch_size, 16) training samples (a
    fixed, seeded choice). `inputs(batch)` is the task's (images, h) of a collated batch."""
    model = PixelSNAIL(config)
    n = min(len(dataset), max(batch_size, 16))
    images, h = inputs(collate([dataset[(i, i)] for i in range(n)]))
    data_dependent_init(model, images, h=h)
    return model


def nll_loss(model: nn.Module, images: torch.Tensor, h: torch.Tensor | None, nr_mix: int,
             dims: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss (mean negative log-likelihood per image, in nats) and its bits/dim for the log."""
    loss = discretized_mix_logistic_nll(images, model(images, h=h).float(), nr_mix)
    return loss, {"bits_per_dim": bits_per_dim(loss.item(), dims)}


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


def read_images(cfg: PixelSNAILTaskConfig, split: str) -> ClassData:
    if not cfg.data.data:
        raise DataError("no training data: give --data mnist:DIR | cifar:DIR | folder:ROOT")
    return read_class_data(cfg.data.data, split, cfg.data.val_fraction, cfg.data.test_fraction)


class PixelSNAILTask(Task):
    name = "pixelsnail"
    progress_logs = ("bits_per_dim",)  # the progress bar in the unit the paper and the evaluation report

    def __init__(self, config: PixelSNAILTaskConfig, run_dir: str | Path | None = None):
        self.config = config
        train = read_images(config, "train")
        m = config.model
        m.channels = train.channels
        size = config.data.image_size or train.native_size or 32
        config.data.image_size = size
        if config.data.condition == "class":
            if config.class_names and config.class_names != train.classes:
                raise DataError(f"{config.data.data}: classes differ from the run's {config.class_names[:5]}...")
            config.class_names, m.cond_dim = list(train.classes), len(train.classes)
        elif config.data.condition:
            raise ConfigError(f"data.condition must be 'class' or empty, got {config.data.condition!r}")
        self.train_data = train
        self.transform = image_transform(size, train.native_size)
        self.train_dataset = ClassImageDataset(train, self.transform)
        self.eval_data = None
        try:
            self.eval_data = read_images(config, config.data.eval_split)
            if len(self.eval_data) > config.data.max_eval_images:
                self.eval_data = self.eval_data.subset(range(config.data.max_eval_images))
        except DataError as e:
            log.info("no evaluation during training (%s)", e)
        self.dims = m.channels * size * size
        log.info("PixelSNAIL %s on %d images %dx%dx%d (%s)", config.preset, len(train), size, size, m.channels,
                 train.split_rule or train.source)

    def condition(self, labels: torch.Tensor) -> torch.Tensor | None:
        return one_hot_condition(labels, self.config.model.cond_dim)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return batch["images"], self.condition(batch["labels"])

    def build_model(self) -> PixelSNAIL:
        return initialised_model(self.config.model, self.train_dataset, self.collate, self.inputs,
                                 self.config.train.batch_size)

    def collate(self, samples: list) -> dict | None:
        return self.train_dataset.collate(samples)

    def loss(self, model: nn.Module, batch: dict):
        return nll_loss(model, *self.inputs(batch), self.config.model.nr_mix, self.dims)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        return {f"{self.config.data.eval_split}_bits_per_dim": evaluate_bits_per_dim(
            model, self.eval_data, self.transform, self.config, batch_size=self.config.train.batch_size)}

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        n = self.config.data.samples_per_epoch
        if n <= 0:
            return
        from clipsnail.inference.sampling import sample, save_sample_grid

        labels = torch.arange(n) % self.config.model.cond_dim if self.config.model.cond_dim else None
        images = sample(model, n, self.config.data.image_size, h=self.condition(labels) if labels is not None
                        else None, seed=epoch)
        save_sample_grid(images, run_dir / "samples" / f"epoch_{epoch + 1:03d}.png",
                         title=f"epoch {epoch + 1}")

    def save(self, model: nn.Module, run_dir: Path) -> None:
        save_run(run_dir, self.name, self.config, model)


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


def load_run(run_dir: Path, data: dict, weights: str = "model") -> PixelSNAIL:
    """The PixelSNAIL of a run directory, with `config` (the run's PixelSNAILTaskConfig: image size, classes)."""
    config = build_described(run_dir, lambda: from_dict(PixelSNAILTaskConfig, data))
    model = build_for_weights(run_dir, lambda: PixelSNAIL(config.model), weights)
    load_run_weights(model, run_dir, weights)
    model.config = config
    return model

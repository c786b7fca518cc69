"""The PixelSNAIL task: images -> PixelSNAIL -> discretised-logistic-mixture likelihood, reported in bits/dim.

As the official code: Adam with betas (0.95, 0.9995), the learning rate decayed by 0.999998 after every step,
Polyak averaging (EMA 0.9995) whose weights are evaluated and sampled, dropout, data-dependent initialisation on the
first batch. After every epoch: test bits/dim and a grid of samples.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import save_run
from clipsnail.data.classes import ClassData, ClassImageDataset, read_class_data
from clipsnail.families.pixelsnail import (
    PixelSNAILTaskConfig,
    evaluate_bits_per_dim,
    image_transform,
    one_hot_condition,
)
from clipsnail.layers.causal import data_dependent_init
from clipsnail.layers.mixture import bits_per_dim, discretized_mix_logistic_nll
from clipsnail.models.pixelsnail import PixelSNAIL, PixelSNAILConfig
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


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


def read_images(cfg: PixelSNAILTaskConfig, split: str) -> ClassData:
    if not cfg.data.data:
        raise DataError("no training data: give --data mnist:DIR | cifar:DIR | folder:ROOT")
    return read_class_data(cfg.data.data, split, cfg.data.val_fraction, cfg.data.test_fraction)


class PixelSNAILTask(Task):
    name = "pixelsnail"
    progress_logs = ("bits_per_dim",)  # the progress bar in the unit the paper and the evaluation report

    def __init__(self, config: PixelSNAILTaskConfig, run_dir: str | Path | None = None):
        # settled here from the data (sizes, classes, the tokenizer's facts), in a copy: the caller's stays as given
        self.config = config = copy.deepcopy(config)
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



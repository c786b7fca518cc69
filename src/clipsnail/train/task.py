"""What a task gives the engine (`engine.fit`), as a base class whose optional parts have their defaults: a task
overrides what it needs and the engine probes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from clipsnail.train.optim import param_groups_by_prefix


class Task:
    """A model, its data, loss and evaluation, for the one training engine.

    `train_dataset[(index, seed)]` returns one sample (or None to skip it); it may also be a streaming
    IterableDataset with `num_samples` and `set_epoch(epoch, rank=, world_size=, batch_size=, skip_batches=)`
    (clipsnail.data.shards.ShardStream). `config` has `.train` (TrainConfig) and `.optim` (OptimConfig)."""

    name: str = ""  # what config.json records, and what `clipsnail.load` reads back
    config: Any
    train_dataset: Dataset
    # Names of `loss` logs the progress bar shows instead of the raw loss (PixelSNAIL's bits/dim, not nats).
    progress_logs: tuple[str, ...] = ()
    # The loss couples the samples of a batch (CLIP's contrastive loss): under gradient accumulation the engine
    # embeds the whole batch first and calls `embed` and `loss_from_embeddings` instead of `loss`.
    couples_batch: bool = False

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict]:
        """[{"name", "params": [(name, p), ...], "lr"}, ...]: by default one group at the configured rate."""
        return param_groups_by_prefix(model, [], self.config.optim.lr)

    def prepare(self, model: nn.Module, device: torch.device, run_dir: Path, progress: bool) -> None:
        """Once the model is built and resumed, before the first step, on every rank (inside the time budget):
        CLIP runs its locked towers over the training data here, once."""

    def collate(self, samples: list) -> dict | None:  # None: nothing usable in this batch
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:  # couples_batch tasks only
        raise NotImplementedError

    def loss_from_embeddings(self, model: nn.Module, parts: list[dict], batch: dict,
                             fresh: int) -> tuple[torch.Tensor, dict[str, float]]:  # couples_batch tasks only
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module) -> None:
        """After each optimiser step (CLIP clamps its temperature here)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics at the end of an evaluation epoch, logged as eval/NAME; none by default."""
        return {}

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        """After each epoch's evaluation (PixelSNAIL writes a sample grid here)."""

    def save(self, model: nn.Module, run_dir: Path) -> None:  # config.json, model.safetensors, tokenizer...
        raise NotImplementedError

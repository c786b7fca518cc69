"""Which batches an epoch draws, in which order, and from where a resumed epoch takes up.

The order is a pure function of (seed, epoch): a resumed run skips exactly the batches its checkpoint says were
consumed, and each sample carries a seed of its own for its augmentation, so neither DataLoader workers nor skipped
samples can shift what later samples draw. Under torchrun each rank takes its slice of every global batch.

The batches come with the number of samples that could not be read (`Collated`): a DataLoader worker counts them in
its own copy of the dataset, which the main process never sees, so the count travels back with each batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from clipsnail.core import distributed as dist
from clipsnail.core.config import TrainConfig
from clipsnail.core.errors import ClipsnailError
from clipsnail.train.task import Task


class ResumableBatchSampler(Sampler):
    """Batches of (index, sample_seed) in an order fixed by (seed, epoch); can start mid-epoch.

    Drops the last incomplete batch: contrastive losses want full batches, and it keeps steps/epoch fixed.
    With `world_size` > 1 it yields this rank's contiguous slice of each global batch: the global order is the
    same for any number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, skip_batches: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ClipsnailError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.skip_batches, self.shuffle = skip_batches, shuffle
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(self.n // self.batch_size - self.skip_batches, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        share = self.batch_size // self.world_size
        for b in range(self.skip_batches, self.n // self.batch_size):
            start = b * self.batch_size + self.rank * share
            sl = slice(start, start + share)
            yield list(zip(order[sl].tolist(), seeds[sl].tolist()))


def dataset_size(dataset) -> int:
    return dataset.num_samples if isinstance(dataset, IterableDataset) else len(dataset)


def steps_per_epoch(task: Task) -> int:
    return dataset_size(task.train_dataset) // task.config.train.batch_size


# ----------------------------------------------------------------------------------------------- skipped samples


class Collated(NamedTuple):
    """One batch as the loader hands it over. A NamedTuple, so that pin_memory pins the batch inside it."""

    batch: Any  # the task's collated batch; None when none of its samples could be read
    skipped: int  # samples the loading process's dataset counted as skipped since its previous batch
    in_worker: bool  # counted in a DataLoader worker's copy of the dataset, not in the main process's


def skipped_count(dataset) -> int:
    """The dataset's count of samples it could not read (`skipped`), or 0 for a dataset that keeps none."""
    value = getattr(dataset, "skipped", 0)
    return value if isinstance(value, int) else 0


class CountingCollate:
    """`task.collate`, with the growth of `task.train_dataset.skipped` since the previous batch beside each batch.

    Reading the counter before and after covers a dataset that counts while a sample is read (the shard stream) as
    well as a collate that counts the samples it drops. Each worker gets its own copy of this object and of the
    dataset, both taken as the loader starts, so each worker's deltas add up to exactly what it counted."""

    def __init__(self, task: Task):
        self.task = task
        self.counted = skipped_count(task.train_dataset)

    def __call__(self, samples: list) -> Collated:
        batch = self.task.collate(samples)
        now = skipped_count(self.task.train_dataset)
        skipped, self.counted = now - self.counted, now
        return Collated(batch, skipped, get_worker_info() is not None)


def take_skipped(collated: Collated, dataset) -> tuple[Any, int]:
    """In the main process, as a batch arrives: (batch, samples skipped while loading it). A worker's count is
    added to the main process's dataset, whose `skipped` the tasks report; the main process's own loading (no
    workers) has counted there already."""
    if collated.in_worker and collated.skipped:
        dataset.skipped += collated.skipped
    return collated.batch, collated.skipped


def train_loader(task: Task, cfg: TrainConfig, epoch: int, skip: int, device: torch.device) -> Iterator[Collated]:
    """This rank's batches of one epoch, starting after `skip` batches (resume)."""
    rank, world = dist.rank(), dist.world_size()
    common = dict(collate_fn=CountingCollate(task), num_workers=cfg.num_workers,
                  pin_memory=device.type == "cuda", persistent_workers=False,
                  # Its own generator: creating the loader must not draw from the global RNG that resume restores.
                  generator=torch.Generator().manual_seed(cfg.seed + epoch))
    dataset = task.train_dataset
    if isinstance(dataset, IterableDataset):  # an endless stream: take exactly the epoch's remaining batches
        dataset.set_epoch(epoch, rank=rank, world_size=world, batch_size=cfg.batch_size // world, skip_batches=skip)
        loader = DataLoader(dataset, batch_size=cfg.batch_size // world, **common)
        return itertools.islice(loader, max(steps_per_epoch(task) - skip, 0))
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, epoch, skip, rank=rank, world_size=world)
    return iter(DataLoader(dataset, batch_sampler=sampler, **common))

"""The one training loop. Every task (CLIP, classification, PixelSNAIL, text-to-image) supplies only what differs
(model, data, loss, evaluation); the engine owns the rest: optimiser groups, warmup + cosine schedule, mixed
precision, gradient clipping, EMA, time budget, checkpoint/resume, logging and the progress bar.

Resuming is exact: a run killed at any point (SIGKILL included) and restarted with the same command ends with
the same weights as an uninterrupted run. That needs three things beyond model/optimiser state:
- the data order is a pure function of (seed, epoch), and the checkpoint stores how many batches of the epoch
  were consumed, so the sampler skips exactly those;
- per-sample randomness (augmentation) is seeded from (seed, epoch, position), not from a global stream that
  worker processes or skipped samples would perturb;
- the global RNG states (dropout, drop-path) are checkpointed and restored.
Ctrl-C or SIGTERM finishes the step in progress, checkpoints it and stops (`stop_signals_finish_the_step`); a second
one stops at once, and the message says which step the last checkpoint holds.

Under `torchrun` the same loop runs data-parallel (DDP): `batch_size` is the global batch and each of the N
processes takes its slice of every batch, so the data order and the optimisation do not depend on N, and a run
can resume with a different number of processes. Only rank 0 logs, shows progress, evaluates and writes files.
`accum_steps` splits each process's slice into micro-batches. Tasks whose loss couples the samples of a batch
(CLIP's contrastive loss) provide `embed` + `loss_from_embeddings`, and the engine then follows open_clip's
accumulation: embed every micro-batch without gradients, then re-embed one at a time with gradients and compute
the loss on the whole batch, so the contrastive batch stays whole and the gradients equal the full batch's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler
from tqdm.auto import tqdm

from clipsnail.core import distributed as dist
from clipsnail.core.config import TrainConfig, parse_duration, to_dict
from clipsnail.core.devices import resolve_device
from clipsnail.core.errors import ClipsnailError, DataError, Interrupted
from clipsnail.core.rng import rng_state, set_rng_state
from clipsnail.core.runs import CHECKPOINT, check_run_dir, load_weights, save_weights
from clipsnail.core.safeio import atomic_path, atomic_write_json, atomic_write_text, read_json_object, writer_lock
from clipsnail.train.optim import build_optimizer, lr_lambda, warmup_steps
from clipsnail.train.task import Task

log = logging.getLogger(__name__)



@dataclass
class FitResult:
    step: int
    epoch: int
    completed: bool  # False when the time budget stopped the run early
    metrics: dict[str, float]
    run_dir: Path


# ----------------------------------------------------------------------------------------------- devices/precision


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """-> autocast dtype, or None for full fp32. bf16 on CPU is opt-in: it is slower without AMX units."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ClipsnailError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise ClipsnailError("precision fp16 needs a GPU; use bf16 on the CPU")
    return table[precision]


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


# ----------------------------------------------------------------------------------------------- data order


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


def split_batch(batch: Any, parts: int) -> list[Any]:
    """A collated batch (tensors, lists, dicts of them) -> `parts` micro-batches along the first dimension."""
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        split = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch):  # a tuple of fields
            fields = [split_batch(v, parts) for v in batch]
            return [type(batch)(f[i] for f in fields) for i in range(parts)]
        size = math.ceil(len(batch) / parts)  # a list of samples
        return [batch[i * size: (i + 1) * size] for i in range(parts)]
    return [batch] * parts


def train_loader(task: Task, cfg: TrainConfig, epoch: int, skip: int, device: torch.device) -> Iterator:
    """This rank's batches of one epoch, starting after `skip` batches (resume)."""
    rank, world = dist.rank(), dist.world_size()
    common = dict(collate_fn=task.collate, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=False,
                  # Its own generator: creating the loader must not draw from the global RNG that resume restores.
                  generator=torch.Generator().manual_seed(cfg.seed + epoch))
    dataset = task.train_dataset
    if isinstance(dataset, IterableDataset):  # an endless stream: take exactly the epoch's remaining batches
        dataset.set_epoch(epoch, rank=rank, world_size=world, batch_size=cfg.batch_size // world, skip_batches=skip)
        loader = DataLoader(dataset, batch_size=cfg.batch_size // world, **common)
        return itertools.islice(loader, max(steps_per_epoch(task) - skip, 0))
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, epoch, skip, rank=rank, world_size=world)
    return iter(DataLoader(dataset, batch_sampler=sampler, **common))


# ----------------------------------------------------------------------------------------------- checkpoints


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Nested dicts/lists of tensors and plain values -> JSON skeleton + flat tensor dict (for safetensors)."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": flatten_state(torch.from_numpy(obj.copy()), tensors, prefix)}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot checkpoint dict keys at {prefix!r}")
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix!r}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return unflatten_state(obj["__ndarray__"], tensors).numpy()
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_state(path: Path, state: dict) -> None:
    """One safetensors file (tensors + JSON skeleton in its metadata), written to a temp name then renamed, so a
    kill at any moment leaves either the previous checkpoint or the new one, never half of one."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})


def load_state(path: Path) -> dict:
    """A checkpoint written by `save_state`. A file cut short or otherwise damaged (it can only happen outside
    this program: a full disk, a copy cut short) is a DataError that says how to start over."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})["state"])
        return unflatten_state(skeleton, load_file(str(path)))
    except Exception as e:  # safetensors' own error types, OSError, a missing or malformed skeleton
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError):
            reason = f"no {reason} entry"
        raise DataError(f"{path}: damaged checkpoint ({reason}); delete {path.parent} to start the run over, "
                        f"or train into another --out") from None


# ----------------------------------------------------------------------------------------------- the loop


def backward(task: Task, model: nn.Module, batch: Any, accum_steps: int, scaler: torch.amp.GradScaler,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradients of the task's loss on `batch`, in `accum_steps` micro-batches -> (loss, logs)."""
    if accum_steps == 1:
        with autocast():
            loss, logs = task.loss(model, batch)
        scaler.scale(loss).backward()
        return loss.detach(), logs
    micro = split_batch(batch, accum_steps)
    last = accum_steps - 1

    def sync(j: int):  # DDP: all-reduce the gradients once, in the last micro-step's backward
        return contextlib.nullcontext() if j == last or not hasattr(model, "no_sync") else model.no_sync()

    if task.couples_batch:
        # The loss couples all samples (open_clip's accum_freq): embed everything once without gradients, then
        # re-embed each micro-batch with gradients in place of its cached copy, loss over the whole batch.
        with torch.no_grad(), autocast():
            cached = [task.embed(model, mb) for mb in micro]
        for j, mb in enumerate(micro):
            with sync(j):
                with autocast():
                    parts = [*cached[:j], task.embed(model, mb), *cached[j + 1:]]
                    loss, logs = task.loss_from_embeddings(model, parts, batch, fresh=j)
                scaler.scale(loss).backward()
        return loss.detach(), logs
    # Losses that are means over samples: the mean of the micro-batch means is the batch mean.
    total = 0.0
    for j, mb in enumerate(micro):
        with sync(j):
            with autocast():
                loss, logs = task.loss(model, mb)
            scaler.scale(loss / accum_steps).backward()
        total = total + loss.detach() / accum_steps
    return total, logs


class MetricsLog:
    """metrics.jsonl (always) and RUN/tensorboard (when tensorboard is installed: pip install
    'clipsnail[tensorboard]'), each record flushed as it is written, so a killed run keeps its curves."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # not installed: metrics.jsonl and curves.png only
            return
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        weakref.finalize(self, self.tb.close)  # its writer thread ends with the log (when the training ends)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint so the log reads as one uninterrupted run."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if _record_step(ln) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl line; infinite (dropped on resume) for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def fit(task: Task, run_dir: str | Path, progress: bool = True, on_step: Callable[[int], None] | None = None,
        on_model: Callable[[nn.Module], None] | None = None) -> FitResult:
    """Train `task` into `run_dir`, resuming from `run_dir/checkpoint` when present. `on_step(step)` runs after
    every step; `on_model(model)` once the model is built (rank 0 only: the command line prints its table).

    Under torchrun every process calls this; it joins the process group (unless one already exists) and leaves it
    at the end if it created it."""
    owns_group = dist.init_from_env()
    try:
        # One writer per run directory (under torchrun, rank 0 writes it for all).
        with writer_lock(run_dir, "run directory") if dist.rank() == 0 else contextlib.nullcontext():
            return Training(task, Path(run_dir), progress, on_step, on_model).run()
    finally:
        if owns_group:
            dist.shutdown()


# Settings a resumed run may change: how long it trains and how it runs, not what it learns.
RESUMABLE_CHANGES = {f"train.{key}" for key in ("epochs", "max_steps", "time_budget", "device", "num_workers",
                                                "log_every", "checkpoint_every", "eval_every", "compile")}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def check_same_settings(run_dir: Path, config: Any) -> None:
    """ClipsnailError when a run is resumed with settings other than those its config.json records (beyond
    RESUMABLE_CHANGES): the checkpoint would go on under the new ones and config.json would then say the whole run
    used them."""
    recorded = read_json_object(run_dir / "config.json")
    if recorded is None:
        return  # stopped before its first save: nothing recorded to differ from
    recorded.pop("task", None)
    old, new = _flat(recorded), _flat(json.loads(json.dumps(to_dict(config))))
    # Keys on one side only are settings that another clipsnail version added or dropped, not changes of the user.
    changed = [k for k in sorted(set(old) & set(new)) if old[k] != new[k] and k not in RESUMABLE_CHANGES]
    if changed:
        first = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])}{'...' if len(changed) > 4 else ''})" \
            if len(changed) > 1 else ""
        raise ClipsnailError(f"{run_dir}: resuming with other settings than the run's: {first} was "
                             f"{old.get(first)!r}, now {new.get(first)!r}{more}. Resume with the run's settings "
                             f"(its config.json), or train into a new --out")


# Bytes per parameter while training with AdamW in fp32: the weight, its gradient and two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def _available_memory(device: torch.device) -> int | None:
    """Free memory of `device` in bytes (the CPU's: MemAvailable), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_model_fits(task: Task, device: torch.device) -> None:
    """ClipsnailError before the model is built when its parameters alone, trained with AdamW, need more memory
    than `device` has free: the model is first built on the meta device, which allocates nothing. (Linux lends
    memory it does not have, so a huge model would otherwise be built and then killed, or swap for minutes.)"""
    try:
        # Quiet: loading start weights into the skeleton is a no-op PyTorch warns about.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = task.build_model()
    except Exception:  # a model that cannot be built without memory: the real build says what is wrong
        return
    params = sum(p.numel() for p in skeleton.parameters())
    needed, available = params * TRAINING_BYTES_PER_PARAMETER, _available_memory(device)
    if available is not None and needed > available:
        raise ClipsnailError(f"the model has {params:,} parameters: training it needs about {needed / 2**30:.1f} "
                             f"GiB, and {device.type} has {available / 2**30:.1f} GiB free; check its sizes "
                             f"(model.embed_dim, model.*_width, model.*_depth, vocab_size)")


class Training:
    """One `fit`: what it trains (model, optimiser, schedule, scaler, EMA), where it stands (step, epoch, batch,
    best metric, the step the checkpoint on disk holds), and the parts of the loop, each a method:
    `__init__` prepares, `resume` takes up a checkpoint, `train_step` is one optimiser step, `end_of_epoch`
    evaluates and saves, `checkpoint` writes the whole state. `run` is the loop."""

    def __init__(self, task: Task, run_dir: Path, progress: bool, on_step: Callable[[int], None] | None,
                 on_model: Callable[[nn.Module], None] | None = None):
        self.task, self.run_dir, self.on_step = task, run_dir, on_step
        self.cfg: TrainConfig = task.config.train
        cfg = self.cfg
        self.rank, world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if self.main:
            check_run_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and dist.is_distributed():
            self.device = torch.device("cuda", dist.local_rank())
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        # Dropout and drop-path masks differ per rank (their data differ anyway); data order and augmentation do not
        # come from these generators (see ResumableBatchSampler).
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        np.random.seed((cfg.seed + self.rank) % 2**32)
        share = cfg.batch_size // world
        if cfg.batch_size % world or share % cfg.accum_steps:
            raise ClipsnailError(f"batch_size {cfg.batch_size} must split evenly over {world} process(es) x "
                                 f"{cfg.accum_steps} accumulation step(s)")
        self.model = self.build_model()
        if on_model is not None and self.main:
            on_model(self.model)
        self.optimizer = build_optimizer(task.config.optim, task.param_groups(self.model), self.model)
        self.per_epoch = steps_per_epoch(task)
        if self.per_epoch == 0:
            raise ClipsnailError(
                f"the training set has {dataset_size(task.train_dataset)} samples, fewer than one batch of "
                f"{cfg.batch_size}: lower --set batch_size or add data")
        self.total_steps = cfg.max_steps or cfg.epochs * self.per_epoch
        o = task.config.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(min(warmup_steps(o, self.per_epoch), self.total_steps), self.total_steps,
                                      o.schedule, o.min_lr_ratio, o.lr_decay))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            # Warm-up: the decay ramps from 0 towards ema_decay (1 - (1 + step)^-2/3), so the average of a short
            # run is not dominated by its random initialisation.
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True)
        self.metrics_log = MetricsLog(run_dir) if self.main else None
        self.ckpt_path = run_dir / CHECKPOINT
        self.step, self.start_epoch, self.batches_done_in_epoch = 0, 0, 0
        self.best: float | None = None  # best value of cfg.best_metric so far
        self.saved_step: int | None = None  # the step the checkpoint on disk holds
        self.metrics: dict[str, float] = {}
        self.stop = StopRequest()
        self.progress = progress

    def build_model(self) -> nn.Module:
        check_model_fits(self.task, self.device)
        try:
            model = self.task.build_model().to(self.device)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClipsnailError(f"the model does not fit in memory ({first}): check its sizes (model.embed_dim, "
                                 f"model.*_width, model.*_depth, vocab_size)") from None
        if self.cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ClipsnailError(f"{type(model).__name__} does not support grad_checkpointing")
            model.set_grad_checkpointing(True)
        return model

    def resume(self) -> None:
        """Take up the checkpoint in the run directory, if there is one; then cut the metrics log back to it, so
        that the log reads as one run (all of it when starting over)."""
        if self.ckpt_path.exists():
            if self.main:
                check_same_settings(self.run_dir, self.task.config)
            state = load_state(self.ckpt_path)
            # A checkpoint that does not fit was written with other model or optimiser settings.
            advice = (f"this run's settings differ from those the checkpoint was written with: run with those, or "
                      f"delete {self.ckpt_path.parent} to start the run over")
            load_weights(self.model, state.get("model", {}), self.ckpt_path, "the model of this run's settings",
                         advice)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                self.scaler.load_state_dict(state["scaler"])
                if self.ema is not None and "ema" in state:
                    self.ema.module.load_state_dict(state["ema"])
                set_rng_state(state["rng"])
                self.step, self.start_epoch = state["step"], state["epoch"]
                self.batches_done_in_epoch = state["batches_done_in_epoch"]
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                reason = f"no {e} entry" if isinstance(e, KeyError) else str(e).strip().splitlines()[0]
                raise DataError(f"{self.ckpt_path}: cannot resume from it ({reason}); {advice}") from None
            if self.rank:  # the checkpoint holds rank 0's generators; keep the ranks' dropout masks apart
                torch.manual_seed(int(torch.randint(2**62, ())) + self.rank)
            self.best = state.get("best", self.best)
            self.saved_step = self.step
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.ckpt_path, self.step, self.start_epoch,
                     self.batches_done_in_epoch)
        if self.main:
            self.metrics_log.truncate_after(self.step)

    def wrap_for_training(self) -> nn.Module:
        """The module the steps run through: DDP under torchrun (built after the checkpoint is loaded; it also
        broadcasts rank 0's weights, so every rank starts equal), compiled when train.compile is set."""
        train_model = self.model
        if dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        return torch.compile(train_model) if self.cfg.compile else train_model

    def checkpoint(self, epoch: int, batches_done: int) -> None:
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "step": self.step, "epoch": epoch, "batches_done_in_epoch": batches_done, "best": self.best,
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        save_state(self.ckpt_path, state)
        self.saved_step = self.step

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, train_model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimiser step on `batch` (accumulated over train.accum_steps micro-batches): (loss, logs)."""
        o, device, amp_dtype = self.task.config.optim, self.device, self.amp_dtype
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = backward(self.task, train_model, move_to(batch, device), self.cfg.accum_steps, self.scaler,
                              lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                     enabled=amp_dtype is not None))
        if not torch.isfinite(loss):
            raise ClipsnailError(f"loss became {loss.item()} at step {self.step}: lower the learning rate")
        if o.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            logs.setdefault("grad_norm", torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip).item())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.task.after_optimizer_step(self.model)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        return loss, logs

    def end_of_epoch(self, epoch: int) -> None:
        """Rank 0 evaluates (every train.eval_every epochs and at the end), keeps the best weights, checkpoints and
        saves the run; the other ranks wait for it at the barrier that follows."""
        if not self.main:
            return
        last_epoch = self.step >= self.total_steps
        if last_epoch or (self.cfg.eval_every and (epoch + 1) % self.cfg.eval_every == 0):
            self.metrics = self.task.evaluate(self.model)
            if self.ema is not None:  # the average is judged on its own, next to the raw weights
                self.metrics.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module).items()})
            self.model.train()
            if self.cfg.best_metric:
                judged = self.ema.module if self.cfg.best_metric.startswith("ema_") else self.model
                self.best = _keep_best(self.cfg.best_metric, self.metrics, self.best, judged, self.run_dir,
                                       self.step, epoch)
            if self.metrics:
                self.metrics_log.write({"step": self.step, "epoch": epoch,
                                        **{f"eval/{k}": v for k, v in self.metrics.items()}})
                log.info("epoch %d step %d: %s", epoch, self.step, _fmt(self.metrics))
        self.task.after_epoch(self.eval_model(), self.run_dir, epoch)
        self.checkpoint(epoch + 1, 0)
        self.task.save(self.eval_model(), self.run_dir)

    def stop_at_step_boundary(self, epoch: int, batches_done: int) -> None:
        """Between two steps, where the state is whole: checkpoint it (unless done already) and stop."""
        if self.saved_step != self.step:
            self.checkpoint(epoch, batches_done)
        raise KeyboardInterrupt

    def interruption(self) -> str:
        self.bar.close()  # first, so that the message gets a line of its own
        if self.saved_step is None:
            return (f"interrupted after step {self.step} of {self.total_steps}, before the first checkpoint: the "
                    f"same command starts the run over")
        return (f"interrupted after step {self.step} of {self.total_steps}; {self.ckpt_path.parent} holds step "
                f"{self.saved_step}: run the same command again to resume from there")

    def run(self) -> FitResult:
        self.resume()
        train_model = self.wrap_for_training()
        cfg, epoch, out_of_time = self.cfg, self.start_epoch, False
        budget, started = parse_duration(cfg.time_budget), time.monotonic()
        self.task.prepare(self.model, self.device, self.run_dir, self.progress)
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.progress and self.main),
                        dynamic_ncols=True, desc="train")
        self.step_log = StepLog(self)
        with stop_signals_finish_the_step(self.stop, self.interruption):
            for epoch in itertools.count(self.start_epoch):
                if self.step >= self.total_steps:
                    break
                skip = self.batches_done_in_epoch if epoch == self.start_epoch else 0
                loader = train_loader(self.task, cfg, epoch, skip, self.device)
                step_before = self.step
                self.model.train()
                self.batch_index = skip  # batches of this epoch done, counted as they are drawn
                for batch in self.batches(loader, epoch):
                    self.batch_index += 1
                    if batch is None:  # every sample unreadable (and skipped, counted by the task)
                        if dist.is_distributed():  # the other ranks would wait for this one's gradients forever
                            raise ClipsnailError(f"rank {self.rank}: a whole batch of unreadable samples at step "
                                                 f"{self.step}")
                        continue
                    loss, logs = self.train_step(train_model, batch)
                    self.step_log.after_step(epoch, loss, logs)
                    if self.on_step is not None:
                        try:
                            self.on_step(self.step)
                        except KeyboardInterrupt:  # a callback stops the run the way Ctrl-C does
                            self.stop.requested = True
                    if self.step >= self.total_steps:
                        break
                    if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
                        self.checkpoint(epoch, self.batch_index)
                    if self.stop.requested:
                        self.stop_at_step_boundary(epoch, self.batch_index)
                    if budget is not None and dist.any_rank(time.monotonic() - started > budget, self.device):
                        out_of_time = True
                        break
                if self.step == step_before and skip < self.per_epoch:  # the next epoch would fare no better
                    raise DataError(f"no training image could be read: epoch {epoch} made no step, every sample "
                                    f"of its {self.batch_index - skip} batches was skipped")
                if out_of_time and not (self.batch_index >= self.per_epoch or self.step >= self.total_steps):
                    self.checkpoint(epoch, self.batch_index)  # stopped inside the epoch: resume there
                    break
                self.end_of_epoch(epoch)
                if self.stop.requested:
                    self.stop_at_step_boundary(epoch + 1, 0)
                dist.barrier()
                if out_of_time:
                    break
        self.bar.close()
        return self.finish(epoch, out_of_time)

    def batches(self, loader: Iterator, epoch: int) -> Iterator:
        """The loader's batches; when Ctrl-C reached the DataLoader workers too and they exited, stop cleanly at
        the step boundary instead of raising their error."""
        while True:
            try:
                batch = next(loader)
            except StopIteration:
                return
            except Exception:
                if self.stop.requested:
                    self.stop_at_step_boundary(epoch, self.batch_index)
                raise
            yield batch

    def finish(self, epoch: int, out_of_time: bool) -> FitResult:
        completed = self.step >= self.total_steps
        if self.main:
            self.task.save(self.eval_model(), self.run_dir)
            _plot_curves(self.run_dir)
        dist.barrier()
        if out_of_time and not completed:
            log.info("time budget %s spent at step %d of %d; run the same command again to continue",
                     self.cfg.time_budget, self.step, self.total_steps)
        return FitResult(step=self.step, epoch=epoch, completed=completed, metrics=self.metrics,
                         run_dir=self.run_dir)


class StepLog:
    """After each step: the progress bar, and every train.log_every steps a metrics.jsonl record (the loss averaged
    over the ranks, the learning rate, samples/s since the last record, the task's logs)."""

    def __init__(self, training: Training):
        self.training = training
        self.last_log, self.samples = time.monotonic(), 0

    def after_step(self, epoch: int, loss: torch.Tensor, logs: dict[str, float]) -> None:
        t = self.training
        self.samples += t.cfg.batch_size
        lr = t.optimizer.param_groups[0]["lr"]
        t.bar.update(1)
        shown = {k: logs[k] for k in t.task.progress_logs if k in logs} or {"loss": loss.item()}
        t.bar.set_postfix({**{k: f"{v:.4f}" for k, v in shown.items()}, "lr": f"{lr:.2e}"}, refresh=False)
        if t.step % t.cfg.log_every == 0 or t.step == t.total_steps:
            mean_loss = dist.all_reduce_mean(loss).item()  # every rank takes part; rank 0 writes
            now = time.monotonic()
            if t.main:
                record = {"step": t.step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                          "samples_per_s": self.samples / max(now - self.last_log, 1e-9)}
                record.update({k: float(v) for k, v in logs.items()})
                t.metrics_log.write(record)
            self.last_log, self.samples = now, 0


@dataclass
class StopRequest:
    requested: bool = False


# What Ctrl-C sends, and what job schedulers (Slurm, Kubernetes, systemd) send before they kill a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_finish_the_step(stop: StopRequest, interruption: Callable[[], str]) -> Iterator[None]:
    """While the block runs, a first Ctrl-C (SIGINT) or SIGTERM only sets `stop.requested`: the loop finishes the
    step in progress, checkpoints it and stops, so the interrupted run resumes exactly. A second one raises
    KeyboardInterrupt at once. Any KeyboardInterrupt leaves the block as `Interrupted(interruption())`, a message
    saying where the run stopped and what resumes it.

    A handler is installed only in the main thread of a single-process run, for a signal that has its default
    handler (Python's for SIGINT, the system's for SIGTERM); elsewhere (torchrun, a host application's own
    handler) the signal acts as before."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    main_process = threading.current_thread() is threading.main_thread() and not dist.is_distributed()
    ours = [s for s in STOP_SIGNALS if main_process and signal.getsignal(s) is defaults[s]]
    pid = os.getpid()

    def handler(signum, frame):
        if stop.requested or os.getpid() != pid:  # a second signal, or a forked DataLoader worker
            raise KeyboardInterrupt
        stop.requested = True
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        log.warning("%s: stopping after this step (%s again to stop at once)", signal.Signals(signum).name, again)

    previous = {s: signal.signal(s, handler) for s in ours}
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(interruption()) from None
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _keep_best(name: str, metrics: dict[str, float], best: float | None, model: nn.Module, run_dir: Path,
               step: int, epoch: int) -> float | None:
    """Save `model` to best.safetensors when metric `name` improved (higher is better, except losses/bits)."""
    if name not in metrics:
        raise ClipsnailError(f"best_metric {name!r} is not among the evaluation metrics: {', '.join(sorted(metrics))}")
    value = metrics[name]
    lower = "loss" in name or "bits" in name
    if best is not None and (value >= best if lower else value <= best):
        return best
    save_weights(model, run_dir / "best.safetensors", metadata={"metric": name, "value": str(value)})
    atomic_write_json(run_dir / "best.json", {"metric": name, "value": value, "step": step, "epoch": epoch + 1},
                      indent=None)
    log.info("best %s so far: %.4f (epoch %d) -> best.safetensors", name, value, epoch + 1)
    return value


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _plot_curves(run_dir: Path) -> None:
    from clipsnail.inference.plots import plot_training_curves

    try:
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    except Exception as e:  # a plot must never lose a finished run
        log.warning("could not plot training curves: %s", e)

"""The one training loop. Every task (CLIP, classification, PixelSNAIL, text-to-image) supplies only what differs
(model, data, loss, evaluation); the engine owns the rest: optimiser groups, warmup + cosine schedule, mixed
precision, gradient clipping, EMA, time budget, checkpoint/resume, logging and the progress bar.

This module is the loop; its parts live beside it:
- `data_order`: which batches an epoch draws, in which order, from where a resumed epoch takes up, and the count of
  unreadable samples that comes back with each batch;
- `checkpoints`: the checkpoint format, and which settings a resumed run may change;
- `metrics_log`: metrics.jsonl, TensorBoard, the progress bar's figures, curves.png;
- `signals`: Ctrl-C and SIGTERM;
- `placement`: the device's precision and memory.

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
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from clipsnail.core import distributed as dist
from clipsnail.core.config import TrainConfig, parse_duration
from clipsnail.core.devices import resolve_device
from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.core.rng import rng_state, set_rng_state
from clipsnail.core.runs import CHECKPOINT, check_run_dir, load_weights, save_weights
from clipsnail.core.safeio import atomic_write_json, writer_lock
from clipsnail.train.budget import BudgetPlan
from clipsnail.train.checkpoints import check_same_settings, load_state, save_state
from clipsnail.train.data_order import (
    Collated,
    dataset_size,
    steps_per_epoch,
    take_skipped,
    train_loader,
)
from clipsnail.train.metrics_log import MetricsLog, StepLog, format_metrics, plot_curves
from clipsnail.train.optim import build_optimizer, lr_lambda, warmup_steps
from clipsnail.train.placement import check_model_fits, move_to, resolve_precision
from clipsnail.train.signals import StopRequest, stop_signals_finish_the_step
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    step: int
    epoch: int
    completed: bool  # False when the time budget stopped the run early
    metrics: dict[str, float]
    run_dir: Path
    skipped: int = 0  # training samples that could not be read, in the batches this call drew (this rank's)


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


class Training:
    """One `fit`: what it trains (model, optimiser, schedule, scaler, EMA), where it stands (step, epoch, batch,
    best metric, the step the checkpoint on disk holds), and the parts of the loop, each a method:
    `__init__` prepares, `resume` takes up a checkpoint, `run` is the loop over epochs and `train_epoch` the loop
    over one epoch's batches, `train_step` is one optimiser step, `end_of_epoch` evaluates and saves,
    `checkpoint` writes the whole state, `finish` saves the run."""

    def __init__(self, task: Task, run_dir: Path, progress: bool, on_step: Callable[[int], None] | None,
                 on_model: Callable[[nn.Module], None] | None = None):
        self.task, self.run_dir, self.on_step, self.progress = task, run_dir, on_step, progress
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
        self.schedule = lr_lambda(min(warmup_steps(o, self.per_epoch), self.total_steps), self.total_steps,
                                  o.schedule, o.min_lr_ratio, o.lr_decay)
        self.configured_span = (self.schedule.warmup, self.schedule.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        # Under a time budget (train.budget_schedule "fit"): the plan of the steps that fit, made after the first
        # steps and kept by a resumed run (`budget_plan` in the checkpoint)
        self.budget_plan: BudgetPlan | None = None
        self.planned_span: tuple[int, int] | None = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            # Warm-up: the decay ramps from 0 towards ema_decay (1 - (1 + step)^-2/3), so the average of a short
            # run is not dominated by its random initialisation.
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True)
        self.metrics_log: MetricsLog | None = MetricsLog(run_dir) if self.main else None
        self.ckpt_path = run_dir / CHECKPOINT
        self.step, self.start_epoch, self.batches_done_in_epoch = 0, 0, 0
        self.batch_index = 0  # batches of the current epoch drawn so far (those skipped on resume included)
        self.skipped = 0  # unreadable samples in the batches drawn so far
        self.best: float | None = None  # best value of cfg.best_metric so far
        self.saved_step: int | None = None  # the step the checkpoint on disk holds
        self.metrics: dict[str, float] = {}
        self.stop = StopRequest()
        # Made by `run` once the task is prepared, so that the task's own progress bars come first.
        self.bar: tqdm | None = None
        self.step_log: StepLog | None = None

    def build_model(self) -> nn.Module:
        check_model_fits(self.task, self.device)
        try:
            model = self.task.build_model().to(self.device)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClipsnailError(f"the model does not fit in memory ({first}): check its sizes (its widths, "
                                 f"depths, embedding and vocabulary sizes)") from None
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
                _moments_in_param_layout(self.optimizer)
                self.scheduler.load_state_dict(state["scheduler"])
                # The schedule of the configured epochs (which a resumed run may change), or the budget's plan
                plan = state.get("budget_plan")
                self.set_span(*(plan if plan else self.configured_span), planned=bool(plan))
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
        if self.metrics_log is not None:
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

    def set_span(self, warmup: int, total: int, planned: bool = True) -> None:
        """The steps the schedule spans (and the run takes): the configured ones, or a time budget's plan."""
        self.schedule.warmup, self.schedule.total = warmup, total
        self.total_steps = total
        self.planned_span = (warmup, total) if planned else None
        if self.bar is not None:
            self.bar.total = total
            self.step_log.total_steps = total

    def run(self) -> FitResult:
        self.resume()
        train_model = self.wrap_for_training()
        epoch, out_of_time = self.start_epoch, False
        budget, started = parse_duration(self.cfg.time_budget), time.monotonic()

        def budget_spent() -> bool:  # every rank asks at the same point: it is a collective under torchrun
            return budget is not None and dist.any_rank(time.monotonic() - started > budget, self.device)

        fit_to_budget = budget is not None and self.cfg.budget_schedule == "fit"
        self.task.prepare(self.model, self.device, self.run_dir, self.progress)
        if fit_to_budget:
            prepared = time.monotonic()
            log.info("prepared in %.1f s of the %s time budget", prepared - started, self.cfg.time_budget)
            if self.planned_span is None:  # a resumed run keeps its plan
                self.budget_plan = BudgetPlan(budget, started, prepared, self.step, self.configured_span)
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.progress and self.main),
                        dynamic_ncols=True, desc="train")
        self.step_log = StepLog(self.metrics_log, self.bar, batch_size=self.cfg.batch_size,
                                log_every=self.cfg.log_every, total_steps=self.total_steps,
                                progress_logs=self.task.progress_logs)
        with stop_signals_finish_the_step(self.stop, self.interruption):
            for epoch in itertools.count(self.start_epoch):
                if self.step >= self.total_steps:
                    break
                skip = self.batches_done_in_epoch if epoch == self.start_epoch else 0
                out_of_time = self.train_epoch(train_model, epoch, skip, budget_spent)
                if out_of_time and fit_to_budget:
                    self.set_span(min(self.schedule.warmup, self.step), self.step)  # the plan ends here
                if out_of_time and not (self.batch_index >= self.per_epoch or self.step >= self.total_steps):
                    self.checkpoint(epoch, self.batch_index)  # stopped inside the epoch: resume there
                    break
                epoch_end = time.monotonic()
                self.end_of_epoch(epoch)
                if self.budget_plan is not None:
                    self.budget_plan.end_of_epoch_s = time.monotonic() - epoch_end
                if self.stop.requested:
                    self.stop_at_step_boundary(epoch + 1, 0)
                dist.barrier()
                if out_of_time:
                    break
        self.bar.close()
        return self.finish(epoch, out_of_time)

    def train_epoch(self, train_model: nn.Module, epoch: int, skip: int, budget_spent: Callable[[], bool]) -> bool:
        """One step per batch of `epoch` from batch `skip` on, until the epoch or the run ends (-> False) or the
        time budget is spent (-> True). Checkpoints every train.checkpoint_every steps, and stops at the step's
        end when Ctrl-C or SIGTERM came."""
        loader = train_loader(self.task, self.cfg, epoch, skip, self.device)
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
            if self.budget_plan is not None:
                span = self.budget_plan.after_step(self.step, time.monotonic())
                if span is not None:
                    self.set_span(*dist.broadcast_ints(span, self.device))  # every rank takes rank 0's plan
                    self.budget_plan.agreed(self.step, self.total_steps)
            self.step_log.after_step(self.step, epoch, loss, logs, [g["lr"] for g in self.optimizer.param_groups])
            if self.on_step is not None:
                try:
                    self.on_step(self.step)
                except KeyboardInterrupt:  # a callback stops the run the way Ctrl-C does
                    self.stop.requested = True
            if self.step >= self.total_steps:
                break
            if self.cfg.checkpoint_every > 0 and self.step % self.cfg.checkpoint_every == 0:
                self.checkpoint(epoch, self.batch_index)
            if self.stop.requested:
                self.stop_at_step_boundary(epoch, self.batch_index)
            if budget_spent():
                return True
        if self.step == step_before and skip < self.per_epoch:  # the next epoch would fare no better
            raise DataError(f"no training image could be read: epoch {epoch} made no step, every sample "
                            f"of its {self.batch_index - skip} batches was skipped")
        return False

    def batches(self, loader: Iterator[Collated], epoch: int) -> Iterator:
        """The loader's batches, with their unreadable samples counted here, in the main process (a DataLoader
        worker counts them in its own copy of the dataset). When Ctrl-C reached the workers too and they exited,
        stop cleanly at the step boundary instead of raising their error."""
        while True:
            try:
                collated = next(loader)
            except StopIteration:
                return
            except Exception:
                if self.stop.requested:
                    self.stop_at_step_boundary(epoch, self.batch_index)
                raise
            batch, skipped = take_skipped(collated, self.task.train_dataset)
            self.skipped += skipped
            yield batch

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
                log.info("epoch %d step %d: %s", epoch, self.step, format_metrics(self.metrics))
        self.task.after_epoch(self.eval_model(), self.run_dir, epoch)
        if self.cfg.checkpoint_each_epoch or last_epoch or not self.cfg.checkpoint_every:
            self.checkpoint(epoch + 1, 0)
            self.task.save(self.eval_model(), self.run_dir)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self, epoch: int, batches_done: int) -> None:
        """The whole state, as `resume` takes it up: `batches_done` batches of `epoch` are consumed."""
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "step": self.step, "epoch": epoch, "batches_done_in_epoch": batches_done, "best": self.best,
        }
        if self.planned_span is not None:
            state["budget_plan"] = list(self.planned_span)
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        save_state(self.ckpt_path, state)
        self.saved_step = self.step

    def stop_at_step_boundary(self, epoch: int, batches_done: int) -> None:
        """Between two steps, where the state is whole: checkpoint it (unless done already) and stop."""
        if self.saved_step != self.step:
            self.checkpoint(epoch, batches_done)
        raise KeyboardInterrupt

    def interruption(self) -> str:
        if self.bar is not None:
            self.bar.close()  # first, so that the message gets a line of its own
        if self.saved_step is None:
            return (f"interrupted after step {self.step} of {self.total_steps}, before the first checkpoint: the "
                    f"same command starts the run over")
        return (f"interrupted after step {self.step} of {self.total_steps}; {self.ckpt_path.parent} holds step "
                f"{self.saved_step}: run the same command again to resume from there")

    def finish(self, epoch: int, out_of_time: bool) -> FitResult:
        completed = self.step >= self.total_steps
        if self.main:
            self.task.save(self.eval_model(), self.run_dir)
            plot_curves(self.run_dir)
        dist.barrier()
        if out_of_time and not completed:
            log.info("time budget %s spent at step %d of %d; run the same command again to continue",
                     self.cfg.time_budget, self.step, self.total_steps)
        return FitResult(step=self.step, epoch=epoch, completed=completed, metrics=self.metrics,
                         run_dir=self.run_dir, skipped=self.skipped)


def _moments_in_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimiser state tensor its parameter's memory layout. A checkpoint stores them row-major;
    a parameter kept channels-last (a convolution's weight) had its moments made in its own layout, and the fused
    AdamW kernel walks a parameter and its moments in memory order, so it would pair the wrong elements."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


# ----------------------------------------------------------------------------------------------- one step's gradients


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


# ----------------------------------------------------------------------------------------------- the best weights


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

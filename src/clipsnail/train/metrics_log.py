"""What a training run records as it goes: metrics.jsonl (and TensorBoard), the progress bar's figures after each
step, and curves.png at the end."""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clipsnail.core import distributed as dist
from clipsnail.core.safeio import atomic_write_text

log = logging.getLogger(__name__)


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


class StepLog:
    """After each step: the progress bar, and every `log_every` steps a metrics.jsonl record (the loss averaged
    over the ranks, the learning rate, samples/s since the last record, the task's logs).

    `metrics_log` is None on the ranks other than 0: they write nothing but still take part in averaging the loss.
    `progress_logs` names the task's logs the bar shows instead of the raw loss."""

    def __init__(self, metrics_log: MetricsLog | None, bar: tqdm, *, batch_size: int, log_every: int,
                 total_steps: int, progress_logs: tuple[str, ...] = ()):
        self.metrics_log, self.bar = metrics_log, bar
        self.batch_size, self.log_every, self.total_steps = batch_size, log_every, total_steps
        self.progress_logs = progress_logs
        self.last_log, self.samples = time.monotonic(), 0

    def after_step(self, step: int, epoch: int, loss: torch.Tensor, logs: dict[str, float],
                   lrs: list[float]) -> None:
        """`step`: the steps done so far, this one included; `lrs`: the learning rates of the next step, one per
        parameter group (the bar shows each distinct one, largest first; the log records the largest)."""
        self.samples += self.batch_size
        self.bar.update(1)
        shown = {k: logs[k] for k in self.progress_logs if k in logs} or {"loss": loss.item()}
        rates = sorted(set(lrs), reverse=True)
        lr = rates[0]
        self.bar.set_postfix({**{k: f"{v:.4f}" for k, v in shown.items()},
                              "lr": "/".join(f"{r:.1e}" for r in rates[:4])}, refresh=False)
        if step % self.log_every == 0 or step == self.total_steps:
            mean_loss = dist.all_reduce_mean(loss).item()  # every rank takes part; rank 0 writes
            now = time.monotonic()
            if self.metrics_log is not None:
                record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                          "samples_per_s": self.samples / max(now - self.last_log, 1e-9)}
                record.update({k: float(v) for k, v in logs.items()})
                self.metrics_log.write(record)
            self.last_log, self.samples = now, 0


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def plot_curves(run_dir: Path) -> None:
    """curves.png from the run's metrics.jsonl; a failure is a warning, never the loss of a finished run."""
    from clipsnail.inference.plots import plot_training_curves

    try:
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    except Exception as e:  # a plot must never lose a finished run
        log.warning("could not plot training curves: %s", e)

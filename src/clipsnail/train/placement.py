"""Where a training runs and in what precision: the autocast dtype, batches moved to the device, and whether the
model can be trained in the device's memory at all, told before it is built."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from clipsnail.core.errors import ClipsnailError
from clipsnail.train.task import Task


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
                             f"(its widths, depths, embedding and vocabulary sizes)")

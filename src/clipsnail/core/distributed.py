"""Data-parallel training under `torchrun`: process-group set-up and the few collectives the engine and the
losses need.

Nothing here is needed for a single process: every function answers as if it were the only rank when no
process group is running, so library code calls them unconditionally.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it starts; `init_from_env`
joins that group with NCCL when the process has a GPU and gloo otherwise (so `torchrun --nproc-per-node 2` also
works, slowly, on a CPU, which is how the tests run it).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment. Returns True when this call created it
    (the caller then owns `shutdown`); False when running alone or when a group already exists."""
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():  # NCCL for GPU tensors; gloo still serves CPU ones (e.g. --set train.device=cpu)
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if rank() != 0:  # one voice: the other ranks only warn
        logging.getLogger("clipsnail").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s)", world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_main(make: Callable[[], Any]) -> Any:
    """`make()` run on rank 0 only, its result sent to every rank (e.g. a tokenizer trained once, so that every
    rank encodes text identically)."""
    if not is_distributed():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def broadcast_ints(values: tuple[int, ...], device: torch.device) -> tuple[int, ...]:
    """Rank 0's values on every rank (a plan every rank must follow alike)."""
    if not is_distributed():
        return tuple(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return tuple(int(v) for v in t.tolist())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any: decisions that end a loop must be taken together."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` of every rank along dim 0, rank order, as open_clip's gather_with_grad. Gradients flow back
    to each rank's own slice, summed over the ranks (every rank's loss used it)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forwards; the backward sums every rank's gradient of the gathered tensor and keeps this rank's
    slice: what `torch.distributed.nn.functional.all_gather` computes, which torch 2.14 deprecates."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The task's own model inside the DDP and torch.compile wrappers the engine may put around it."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model

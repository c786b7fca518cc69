"""The optimiser every task trains with: AdamW over the task's parameter groups (weight decay only on weight
matrices), and the learning-rate schedule (linear warmup, then cosine, constant or exponential)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from clipsnail.core.config import OptimConfig
from clipsnail.core.errors import ClipsnailError


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Gains, biases, embeddings-like scalars and the temperature: decaying them only hurts (CLIP, open_clip)."""
    return p.ndim < 2 or "logit_scale" in name or name.endswith(("bias", "pos_embed", "cls_token", "meta_tokens"))


def build_optimizer(cfg: OptimConfig, param_groups: list[dict], model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over `param_groups` ({"name", "params": [(name, parameter)], "lr"?}: a task's `param_groups(model)`),
    each split into a decayed and an undecayed group; frozen parameters are left out."""
    groups = []
    named = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # timm models say which

    def exempt(n: str, p: torch.Tensor) -> bool:
        return no_weight_decay(n, p) or n in named

    for group in param_groups:
        params = [(n, p) for n, p in group["params"] if p.requires_grad]
        decay = [p for n, p in params if not exempt(n, p)]
        skip = [p for n, p in params if exempt(n, p)]
        lr = group.get("lr", cfg.lr)
        for ps, wd in ((decay, cfg.weight_decay), (skip, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": group.get("name", "")})
    if not groups:
        raise ClipsnailError("nothing to train: every parameter is frozen")
    # The fused kernel updates every parameter in one pass; PyTorch has it for CUDA and for the CPU, where the
    # default per-tensor loop costs most of a small model's step. (A resumed run gives its moments back their
    # parameters' memory layout first: engine._moments_in_param_layout.)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def warmup_steps(o, per_epoch: int) -> int:
    return round(o.warmup_epochs * per_epoch) if o.warmup_epochs > 0 else o.warmup_steps


class LrSchedule:
    """The learning-rate factor of each step: linear warmup over `warmup` steps, then cosine down to min_ratio at
    `total` (or constant, or exponential decay). `warmup` and `total` may be changed between steps: a run under a
    time budget spans its schedule over the steps that fit (`clipsnail.train.budget`, `engine.Training.set_span`)."""

    def __init__(self, warmup: int, total: int, schedule: str, min_ratio: float, decay: float = 1.0):
        if schedule not in ("cosine", "constant", "exponential"):
            raise ClipsnailError(f"unknown schedule {schedule!r}; choose cosine, constant or exponential")
        self.warmup, self.total, self.schedule, self.min_ratio, self.decay = warmup, total, schedule, min_ratio, decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "exponential":
            return self.decay ** (step - self.warmup)
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


lr_lambda = LrSchedule  # the name LambdaLR gives what it calls


def param_groups_by_prefix(model: nn.Module, lrs: Sequence[tuple[str, tuple[str, ...], float | None]],
                           default_lr: float) -> list[dict]:
    """Split parameters into named groups by name prefix, each with its own lr (None: default_lr)."""
    groups = {name: {"name": name, "params": [], "lr": lr or default_lr} for name, _, lr in lrs}
    rest = {"name": "other", "params": [], "lr": default_lr}
    for n, p in model.named_parameters():
        for name, prefixes, _ in lrs:
            if n.startswith(prefixes):
                groups[name]["params"].append((n, p))
                break
        else:
            rest["params"].append((n, p))
    return [g for g in [*groups.values(), rest] if g["params"]]

"""A model summary table: layers to a given depth, their output shapes on an example input, parameter counts,
and whether they train or are frozen (what torchinfo's summary shows)."""

from __future__ import annotations

import torch
from torch import nn


def _shape(out) -> str:
    if isinstance(out, torch.Tensor):
        return "x".join(map(str, out.shape))
    if isinstance(out, (tuple, list)):
        return ", ".join(_shape(o) for o in out if isinstance(o, (torch.Tensor, tuple, list)))
    return ""


def model_summary(model: nn.Module, example_inputs: tuple | None = None, depth: int = 2) -> str:
    shapes: dict[str, str] = {}
    hooks = []
    modules = [(n, m) for n, m in model.named_modules() if n and n.count(".") < depth]
    if example_inputs is not None:
        def record(name):
            def hook(module, inputs, output):  # must return None: a returned value replaces the output
                shapes.setdefault(name, _shape(output))

            return hook

        for name, module in modules:
            hooks.append(module.register_forward_hook(record(name)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(*example_inputs)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    rows = [("layer", "type", "output shape", "params", "train")]
    for name, module in modules:
        params = list(module.parameters())
        n = sum(p.numel() for p in params)
        trainable = {p.requires_grad for p in params}
        state = "-" if not params else "yes" if trainable == {True} else "frozen" if trainable == {False} else "mixed"
        indent = "  " * name.count(".")
        rows.append((indent + name.rsplit(".", 1)[-1], type(module).__name__, shapes.get(name, ""), f"{n:,}", state))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append("-" * len(lines[0]))
    lines.append(f"total params: {total:,}   trainable: {trainable:,}   frozen: {total - trainable:,}")
    return "\n".join(lines)

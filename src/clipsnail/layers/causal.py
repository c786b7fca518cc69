"""Building blocks of autoregressive image models (PixelCNN++, PixelSNAIL), as in the official TensorFlow code.

Causality without masks: a convolution is made causal by padding only above (and to the left) and, where the output
must not see its own position, by shifting the result one row down (`down_shift`) or one column right
(`right_shift`). Every convolution is weight-normalised (Salimans & Kingma 2016) and initialised from data: on the
first batch each layer's gain and bias are set so that its pre-activations have zero mean and unit variance
(`data_dependent_init`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Row r receives row r - 1; row 0 becomes zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2]]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Column c receives column c - 1; column 0 becomes zeros."""
    return F.pad(x, (1, 0))[..., : x.shape[3]]


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of x and of -x, stacked on channels (PixelCNN++): both signs carry information. Doubles the width."""
    return F.elu(torch.cat([x, -x], dim=1))


NONLINEARITIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "elu": (F.elu, 1),  # (function, width multiplier)
    "concat_elu": (concat_elu, 2),
}


class WNConv2d(nn.Module):
    """Weight-normalised convolution with explicit padding (left, right, top, bottom) and no implicit padding.

    `init_scale` is the target standard deviation of the output after data-dependent initialisation (0.1 for the
    last convolution of a gated residual block, so that each block starts close to the identity).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 padding: tuple[int, int, int, int] = (0, 0, 0, 0), init_scale: float = 1.0):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        nn.init.normal_(conv.weight, 0.0, 0.05)
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv)  # weight = g * v / |v|, g per output channel
        self.padding, self.init_scale = tuple(padding), init_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding) if any(self.padding) else x)


def down_shifted_conv2d(cin: int, cout: int, kernel: tuple[int, int] = (2, 3), init_scale: float = 1.0) -> WNConv2d:
    """Output (r, c) sees rows r-kh+1..r and columns c-(kw-1)/2..c+(kw-1)/2: the current row and those above."""
    kh, kw = kernel
    return WNConv2d(cin, cout, kernel, ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0), init_scale)


def down_right_shifted_conv2d(cin: int, cout: int, kernel: tuple[int, int] = (2, 2),
                              init_scale: float = 1.0) -> WNConv2d:
    """Output (r, c) sees rows r-kh+1..r and columns c-kw+1..c: the current position and those above-left."""
    kh, kw = kernel
    return WNConv2d(cin, cout, kernel, (kw - 1, 0, kh - 1, 0), init_scale)


def nin(cin: int, cout: int, init_scale: float = 1.0) -> WNConv2d:
    """Network-in-network: a weight-normalised 1x1 convolution (a dense layer at every position)."""
    return WNConv2d(cin, cout, (1, 1), init_scale=init_scale)


@torch.no_grad()
def data_dependent_init(model: nn.Module, *inputs, **kwargs) -> None:
    """Initialise every WNConv2d of `model` from one batch, in forward order (Salimans & Kingma 2016; official code).

    Each layer first computes its output with unit gain and zero bias, then sets gain = init_scale / std and
    bias = -mean * gain per output channel (statistics over batch and positions) and passes the normalised output
    on, so that the next layer is initialised on what it will really see.
    """

    def hook(module: WNConv2d, args, output):
        mean = output.mean(dim=(0, 2, 3))
        var = output.var(dim=(0, 2, 3), unbiased=False)
        scale = module.init_scale / torch.sqrt(var + 1e-10)
        p = module.conv.parametrizations.weight
        p.original0.copy_(scale.view(-1, 1, 1, 1))  # g: the norm of each output channel's filter
        module.conv.bias.copy_(-mean * scale)
        return (output - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)

    handles = []
    for m in model.modules():
        if isinstance(m, WNConv2d):
            m.conv.parametrizations.weight.original0.fill_(1.0)
            m.conv.bias.zero_()
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.train()
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class GatedResidualBlock(nn.Module):
    """x + a * sigmoid(b), with [a, b] = conv(dropout(nl(conv(nl(x)) + nin(nl(aux))))) + h W.

    `aux` is an auxiliary input (the attention output in PixelSNAIL); `h` a conditioning vector per image that adds
    a learned per-channel bias to every gated block (Conditional PixelCNN, van den Oord et al. 2016).
    """

    def __init__(self, channels: int, conv: str = "down_right", nonlinearity: str = "elu", dropout: float = 0.0,
                 aux_channels: int = 0, cond_dim: int = 0):
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}")
        self.nl, mult = NONLINEARITIES[nonlinearity]
        make = {"down_right": down_right_shifted_conv2d, "nin": nin}[conv]
        self.conv1 = make(mult * channels, channels)
        self.aux = nin(mult * aux_channels, channels) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = make(mult * channels, 2 * channels, init_scale=0.1)
        self.cond = nn.Linear(cond_dim, 2 * channels, bias=False) if cond_dim else None
        if self.cond is not None:
            nn.init.normal_(self.cond.weight, 0.0, 0.05)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None, h: torch.Tensor | None = None):
        c = self.conv1(self.nl(x))
        if aux is not None:
            c = c + self.aux(self.nl(aux))
        c = self.conv2(self.dropout(self.nl(c)))
        if h is not None:
            c = c + self.cond(h)[:, :, None, None]
        a, b = c.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     downsample: int = 1) -> torch.Tensor:
    """Single-head attention over the image in raster order with a STRICT causal mask: pixel i attends to pixels
    j < i only, and pixel 0, which has nothing to attend to, gets 0 (as the official code).

    query, key: (B, Dk, H, W); value: (B, Dv, H, W) -> (B, Dv, H, W). Scale 1/sqrt(Dk). With `downsample` s > 1 keys
    and values are max-pooled over s x s cells and a query sees a cell only when every pixel of the cell is before
    it (the official `get_causal_mask(rate)`).
    """
    B, Dk, H, W = query.shape
    if downsample > 1:
        key = F.max_pool2d(key, downsample, ceil_mode=True)
        value = F.max_pool2d(value, downsample, ceil_mode=True)
    q = query.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, Dk)
    k = key.flatten(2).transpose(1, 2).unsqueeze(1)
    v = value.flatten(2).transpose(1, 2).unsqueeze(1)
    if downsample == 1:
        # Strict causality without a mask tensor: query i+1 attends to keys 0..i, which is SDPA's (top-left aligned)
        # is_causal over queries 1..N-1 and keys 0..N-2. The fused (flash) kernel then never builds the N x N weights,
        # but it wants one head size for q, k and v: zero-padding q and k to the value size leaves every q.k, and
        # so the attention, unchanged (the scale stays 1/sqrt(Dk)). On a CPU this halves a training step.
        dv = v.shape[-1]
        width = max(Dk, dv)
        # (contiguous: the kernel also wants unit-stride channels, which NCHW flattened to (N, C) does not have)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t.contiguous() for t in (q, k, v))
        out = q.new_zeros(B, 1, H * W, width)
        out[:, :, 1:] = F.scaled_dot_product_attention(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1], is_causal=True,
                                                       scale=Dk**-0.5)
        return out[..., :dv].squeeze(1).transpose(1, 2).reshape(B, -1, H, W)
    mask = causal_mask(H, W, downsample, query.device)
    # Rows with no visible key (pixel 0; with pooling, the whole first cell row) must output 0, not NaN.
    visible = mask.any(dim=1)
    out = q.new_zeros(B, 1, H * W, v.shape[-1])
    rows = visible.nonzero().squeeze(1)
    if len(rows):
        first = int(rows[0])  # the rows without a visible key are exactly the first ones
        out[:, :, first:] = F.scaled_dot_product_attention(q[:, :, first:], k, v, attn_mask=mask[first:])
    return out.squeeze(1).transpose(1, 2).reshape(B, -1, H, W)


def causal_mask(height: int, width: int, downsample: int = 1, device=None) -> torch.Tensor:
    """(N, M) boolean: query pixel i may attend to key j (pooled cell j when downsample > 1)."""
    n = height * width
    i = torch.arange(n, device=device)
    if downsample == 1:
        return i[:, None] > i[None, :]
    s = downsample
    rows, cols = -(-height // s), -(-width // s)
    # In raster order a cell's latest pixel is its bottom-right one: the query must come after it.
    cell_r = torch.arange(rows, device=device).repeat_interleave(cols)
    cell_c = torch.arange(cols, device=device).repeat(rows)
    last = (torch.clamp((cell_r + 1) * s, max=height) - 1) * width + torch.clamp((cell_c + 1) * s, max=width) - 1
    return i[:, None] > last[None, :]

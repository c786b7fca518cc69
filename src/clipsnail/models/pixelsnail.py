"""PixelSNAIL (Chen, Mishra, Rohaninejad, Abbeel 2017): an autoregressive image model that mixes causal
convolutions (local context, PixelCNN++) with causal self-attention (the whole past, in one step).

Follows the model `_base_noup_smallkey_spec` of the authors' TensorFlow code (pixelsnail-public):
- input: the image in [-1, 1] plus a channel of ones (so that zero padding is distinguishable from black);
- stem: down_shift(down_shifted_conv [1,3]) + right_shift(down_right_shifted_conv [2,1]): row above and pixel to
  the left, strictly before the current pixel;
- `blocks` times: `nr_resnet` gated residual blocks with 2x2 down-right-shifted convolutions; then keys (16) and
  values (F/2) from a 1x1 gated block over [image, features, background], a query (16) from [features, background],
  single-head attention with a strict causal mask, and a 1x1 gated block that adds the attention output;
- head: 1x1 conv of elu(features) to the parameters of a discretised mixture of logistics.
The optional vector `h` (a class one-hot, a text embedding) conditions every gated block; with `null_condition` a
learned vector stands for "no condition" (classifier-free guidance).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from clipsnail.core.config import check_at_least, check_choice, check_positive, check_probability
from clipsnail.core.errors import ConfigError
from clipsnail.layers.causal import (
    NONLINEARITIES,
    GatedResidualBlock,
    causal_attention,
    down_right_shifted_conv2d,
    down_shift,
    down_shifted_conv2d,
    nin,
    right_shift,
)

KEY_CHANNELS = 16  # "smallkey": 16-dimensional queries and keys


@dataclasses.dataclass
class PixelSNAILConfig:
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    filters: int = 256  # F: the width of the feature stream
    blocks: int = 12  # attention blocks ("h12")
    nr_resnet: int = 4  # gated residual blocks before each attention
    nr_mix: int = 10  # logistic mixture components
    dropout: float = 0.5
    nonlinearity: str = "elu"  # "elu" (official default) or "concat_elu"
    attn_downsample: int = 1  # 2: keys and values pooled 2x2 ("pool2")
    cond_dim: int = 0  # size of the conditioning vector h (0: unconditional)
    # A learned "no condition" vector (classifier-free guidance): training swaps it in for h now and then, and
    # the guided sampler contrasts the conditional prediction with the one under it.
    null_condition: bool = False
    attention: bool = True  # False: the gated convolution blocks only, a PixelCNN baseline of the same width

    @property
    def out_channels(self) -> int:
        # per mixture: a logit, and per channel a mean and a log-scale (+ 3 channel coefficients for RGB)
        return (10 if self.channels == 3 else 3) * self.nr_mix


CONFIGS = {
    "h12_noup_smallkey": dict(filters=256, blocks=12, nr_resnet=4),  # the paper's CIFAR-10 model
    "h8_noup_smallkey": dict(filters=256, blocks=8, nr_resnet=4),
    "h12_pool2_smallkey": dict(filters=256, blocks=12, nr_resnet=4, attn_downsample=2),
    "small": dict(filters=64, blocks=4, nr_resnet=2, nr_mix=5, dropout=0.1),  # trains in minutes on a CPU
    # 1.71M parameters at 28x28x1, the size of rosinality's public port (1.64M), for speed comparisons
    "medium": dict(filters=128, blocks=3, nr_resnet=2, nr_mix=5, dropout=0.1),
    "tiny": dict(filters=32, blocks=2, nr_resnet=1, nr_mix=3, dropout=0.0),  # tests
}


def check_config(cfg: PixelSNAILConfig) -> None:
    """ConfigError naming the first invalid key of `cfg` (as `--set` spells it: model.filters)."""
    if cfg.channels not in (1, 3):
        raise ConfigError(f"model.channels must be 1 or 3, got {cfg.channels!r}")
    check_positive(cfg, "filters", "nr_mix", "attn_downsample")
    if cfg.filters % 2:
        raise ConfigError(f"model.filters must be even (values have filters/2 channels), got {cfg.filters}")
    check_at_least(cfg, 0, "blocks", "nr_resnet", "cond_dim")
    check_probability(cfg, "dropout")
    check_choice(cfg, "nonlinearity", NONLINEARITIES)
    if cfg.null_condition and not cfg.cond_dim:
        raise ConfigError("model.null_condition needs a conditional model (model.cond_dim > 0)")


def background(height: int, width: int, batch: int, device, dtype) -> torch.Tensor:
    """Two channels holding each position's row and column, centred and scaled: (i - H/2) / H."""
    rows = (torch.arange(height, device=device, dtype=dtype) - height / 2) / height
    cols = (torch.arange(width, device=device, dtype=dtype) - width / 2) / width
    grid = torch.stack([rows[:, None].expand(height, width), cols[None, :].expand(height, width)])
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class AttentionBlock(nn.Module):
    """nr_resnet causal gated blocks, then causal attention over the whole past, added through a 1x1 gated block."""

    def __init__(self, cfg: PixelSNAILConfig):
        super().__init__()
        F_, C = cfg.filters, cfg.channels
        gated = dict(nonlinearity=cfg.nonlinearity, dropout=cfg.dropout, cond_dim=cfg.cond_dim)
        self.resnets = nn.ModuleList(GatedResidualBlock(F_, "down_right", **gated) for _ in range(cfg.nr_resnet))
        self.attention = cfg.attention
        if not self.attention:
            return
        self.kv_block = GatedResidualBlock(C + F_ + 2, "nin", **gated)
        self.kv = nin(C + F_ + 2, KEY_CHANNELS + F_ // 2)
        self.q_block = GatedResidualBlock(F_ + 2, "nin", **gated)
        self.q = nin(F_ + 2, KEY_CHANNELS)
        self.out_block = GatedResidualBlock(F_, "nin", aux_channels=F_ // 2, **gated)
        self.downsample = cfg.attn_downsample

    def forward(self, x: torch.Tensor, ul: torch.Tensor, bg: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        for resnet in self.resnets:
            ul = resnet(ul, h=h)
        if not self.attention:
            return ul
        # Keys/values at pixel j may use the image at j: the strict mask only lets pixels i > j read them.
        key, value = self.kv(self.kv_block(torch.cat([x, ul, bg], 1), h=h)).split(
            [KEY_CHANNELS, self.kv.conv.out_channels - KEY_CHANNELS], dim=1)
        query = self.q(self.q_block(torch.cat([ul, bg], 1), h=h))
        mixed = causal_attention(query, key, value, self.downsample)
        return self.out_block(ul, aux=mixed, h=h)


class PixelSNAIL(nn.Module):
    def __init__(self, cfg: PixelSNAILConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.stem_down = down_shifted_conv2d(cfg.channels + 1, cfg.filters, (1, 3))
        self.stem_down_right = down_right_shifted_conv2d(cfg.channels + 1, cfg.filters, (2, 1))
        self.blocks = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.blocks))
        self.head = nin(cfg.filters, cfg.out_channels)
        if cfg.null_condition:
            self.null_h = nn.Parameter(torch.zeros(cfg.cond_dim))

    def unconditional(self, batch: int) -> torch.Tensor:
        """The learned null condition for `batch` images (B, cond_dim)."""
        if not self.cfg.null_condition:
            raise ValueError("this model has no learned null condition: train it with null_condition=true")
        return self.null_h.expand(batch, -1)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> mixture parameters (B, P, H, W); output at pixel i depends on pixels < i."""
        if x.shape[1] != self.cfg.channels:
            raise ValueError(f"expected {self.cfg.channels}-channel images, got {x.shape[1]} channels")
        if (h is None) != (self.cfg.cond_dim == 0):
            raise ValueError("this model is conditional: pass h" if h is None else "this model takes no h")
        B, _, H, W = x.shape
        x_pad = torch.cat([x, x.new_ones(B, 1, H, W)], 1)
        ul = down_shift(self.stem_down(x_pad)) + right_shift(self.stem_down_right(x_pad))
        bg = background(H, W, B, x.device, x.dtype)
        for block in self.blocks:
            ul = block(x, ul, bg, h)
        return self.head(F.elu(ul))

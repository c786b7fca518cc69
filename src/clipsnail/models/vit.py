"""A small Vision Transformer in the shape CLIP uses (Radford et al. 2021): patchify, class token, learned
positions, ln_pre, pre-norm blocks, ln_post on the pooled token. The default image tower of CLIP here."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from clipsnail.layers import TransformerBlock


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        width: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if pool not in ("cls", "avg"):
            raise ValueError(f"pool must be 'cls' or 'avg', got {pool!r}")
        self.image_size, self.patch_size, self.pool = image_size, patch_size, pool
        self.num_features = width
        grid = image_size // patch_size
        # CLIP's conv1 has no bias: ln_pre right after makes one redundant.
        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, drop_path=r) for r in rates)
        self.ln_post = nn.LayerNorm(width)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, 1 + grid*grid, width] (class token first)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

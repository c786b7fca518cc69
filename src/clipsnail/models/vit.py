"""A small Vision Transformer in the shape CLIP uses (Radford et al. 2021): patchify, class token, learned
positions, ln_pre, pre-norm blocks, ln_post on the pooled token. The default image tower of CLIP here.

`stem="conv"` replaces the single patchify convolution by a stack of stride-2 3x3 convolutions (Xiao et al.
2021, "Early convolutions help transformers see better"): same token grid, but a local inductive bias that
ViTs trained from scratch on little data lack. On the shapes data a patchify stem learns colour at once but
not the shapes' outlines within a 10-minute CPU budget (see BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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
        stem: str = "patch",
        activation: str = "gelu",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if pool not in ("cls", "avg"):
            raise ValueError(f"pool must be 'cls' or 'avg', got {pool!r}")
        self.image_size, self.patch_size, self.pool = image_size, patch_size, pool
        self.num_features = width
        grid = image_size // patch_size
        if stem == "patch":
            # CLIP's conv1 has no bias: ln_pre right after makes one redundant.
            self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=False)
        elif stem == "conv":
            self.patch_embed = ConvStem(in_chans, width, patch_size)
        else:
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, drop_path=r, activation=activation) for r in rates
        )
        self.ln_post = nn.LayerNorm(width)
        self.grad_checkpointing = False
        # CLIP's initialisation: embeddings ~ width^-0.5, attention input projections Xavier (as in
        # nn.MultiheadAttention), everything else PyTorch's default Linear init.
        nn.init.normal_(self.pos_embed, std=width**-0.5)
        nn.init.normal_(self.cls_token, std=width**-0.5)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's method name):
        a third more compute for activation memory of one block instead of all; training mode only."""
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups, first to last: the stem (patchify, class token, positions, ln_pre), then one group
        a block, the last block with the final norm (as open_clip groups its ViT for `lock_image_unlocked_groups`)."""
        return dict(stem=r"^patch_embed|^cls_token|^pos_embed|^ln_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^ln_post", (len(self.blocks) - 1,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, 1 + grid*grid, width] (class token first)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(x)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvStem(nn.Sequential):
    """log2(patch) stride-2 3x3 conv + BN + ReLU stages (channels doubling up to width/2), then a 1x1 conv to
    width: the token grid of a patch-`patch` ViT (Xiao et al. 2021)."""

    def __init__(self, in_chans: int, width: int, patch: int):
        if patch & (patch - 1) or patch < 2:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch}")
        stages = patch.bit_length() - 1
        layers, c_in = [], in_chans
        for i in range(stages):
            c_out = max(width // 2 ** (stages - i), 16)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        super().__init__(*layers)



"""LeMeViT (Jiang et al. 2024, "Efficient Vision Transformer with Learnable Meta Tokens").

A hierarchical ViT whose dense image tokens exchange information with a few (16) learnable meta tokens instead of
with each other. Five stages, one attention kind each:
  C  cross attention: meta tokens (queries) read the image tokens; image tokens pass through unchanged;
  D  dual cross attention: image queries read the meta tokens and meta queries read the image tokens, so the cost
     is O(N*M) instead of O(N^2) where the image grid is dense (strides 4 and 8);
  S  standard self-attention, applied to the image tokens and to the meta tokens separately (same weights),
     where the grid is small (strides 16 and 32).
Before every stage the meta tokens go through an MLP that maps them to the next width; the head averages the
BatchNorm-ed image grid and the LayerNorm-ed meta tokens, sums them, and classifies.

Faithful to the official `models/lemevit.py` (ViTAE-Transformer/LeMeViT): parameter counts at 1000 classes are
8,635,816 / 16,400,456 / 53,098,152 and the state-dict keys are identical, so official checkpoints load strictly.
Where it departs, it is on purpose:
- a uniform timm API (integer `num_features`, one-argument `forward_features`, `forward_head`, a working
  `reset_classifier`, `forward_intermediates`, `no_weight_decay` that names the meta tokens);
- `drop_rate` is the head dropout as in every timm model (the official file feeds it to the projections; use
  `proj_drop_rate` for that);
- `mlp_dwconv` applies its depthwise conv to image tokens on their grid (the official code would feed it a token
  sequence and crash); meta tokens have no grid and skip it;
- D attention computes the paper's resolution-dependent scale (`d_scale="dim"`). The official file does too in
  its flash-attn/xformers branches, but its plain-PyTorch branch calls SDPA without a scale, i.e. head_dim^-0.5;
  `d_scale="head"` reproduces that branch.
- `stem_stride` 2 or 1 (instead of 4) keeps more tokens for small inputs such as 32x32 CIFAR images; the weights
  have the same shapes, only the conv strides change.

Layout: between stages the image grid is NCHW (convolutions); inside a stage the image tokens are a (B, N, C)
sequence. The NCHW <-> (B, N, C) changes are views, not copies, when the grid is channels_last, which is what the
stem produces for a channels_last input (`model.to(memory_format=torch.channels_last)`, as the paper benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipsnail.core.errors import ConfigError

__all__ = ["LeMeViT", "checkpoint_filter_fn"]

ATTENTION_TYPES = ("C", "D", "D2", "S")


try:  # oneDNN's matmul with fused bias/GELU: the kernel torch.compile's CPU backend emits for Linear (+GELU)
    _onednn_linear = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN
    _onednn_linear = None


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """layer(x), followed by GELU when asked.

    For float32 inference on a CPU it runs as one oneDNN call with the bias and the GELU fused: no second pass over
    the output, which in the dense stages (3136 tokens at 224px, a 4x-wide hidden layer) is a good part of the time.
    The numbers are the same (tests compare with the plain path).
    """
    if (_onednn_linear is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and layer.bias is not None):
        return _onednn_linear(x, layer.weight, layer.bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    x = layer(x)
    return F.gelu(x) if gelu else x


def _split_heads(t: torch.Tensor, parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts*C) from one fused projection -> `parts` views of shape (B, heads, N, head_dim)."""
    B, N, _ = t.shape
    return t.view(B, N, parts, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)


class _AttentionBase(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def _sdpa(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        p = self.attn_drop if self.training else 0.0
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale))


class CrossAttention(_AttentionBase):
    """C: meta tokens query the image tokens. Returns the meta-token update only."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        (q,) = _split_heads(linear(c, self.q), 1, self.num_heads)
        k, v = _split_heads(linear(x, self.kv), 2, self.num_heads)
        return self.proj_drop(linear(self._sdpa(q, k, v), self.proj))


class DualCrossAttention(_AttentionBase):
    """D: image queries read meta keys/values and meta queries read image keys/values, in one block.

    The image->meta softmax runs over only M=16 keys while its queries are N (thousands): the paper scales its
    logits by log(M)/log(N) (on top of dim^-0.5 with dim the full width, as the official code does) so that its
    entropy matches what attention over N keys would have. Meta->image uses the plain dim^-0.5.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 d_scale: str = "dim"):
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        self.qkv1 = nn.Linear(dim, 3 * dim)  # image tokens
        self.qkv2 = nn.Linear(dim, 3 * dim)  # meta tokens
        self.proj_x = nn.Linear(dim, dim)
        self.proj_c = nn.Linear(dim, dim)
        self.d_scale = d_scale
        self.scale = dim**-0.5

    def scales(self, n_image: int, n_meta: int) -> tuple[float | None, float | None]:
        """(image->meta, meta->image) softmax scales; None is SDPA's default head_dim^-0.5."""
        if self.d_scale == "head":
            return None, None
        # log_N(M); a 1-token grid has no resolution to correct for.
        ratio = math.log(n_meta) / math.log(n_image) if n_image > 1 else 1.0
        return ratio * self.scale, self.scale

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale_x, scale_c = self.scales(x.shape[1], c.shape[1])
        q1, k1, v1 = _split_heads(linear(x, self.qkv1), 3, self.num_heads)
        q2, k2, v2 = _split_heads(linear(c, self.qkv2), 3, self.num_heads)
        x = self.proj_drop(linear(self._sdpa(q1, k2, v2, scale_x), self.proj_x))
        c = self.proj_drop(linear(self._sdpa(q2, k1, v1, scale_c), self.proj_c))
        return x, c


class DualCrossAttentionV2(DualCrossAttention):
    """D2: the lighter variant of the official code: image tokens give queries and values, meta tokens keys and
    values; the image queries double as the keys the meta tokens attend to (2 projections per stream, not 3)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 d_scale: str = "dim"):
        _AttentionBase.__init__(self, dim, num_heads, attn_drop, proj_drop)
        self.qv1 = nn.Linear(dim, 2 * dim)
        self.kv2 = nn.Linear(dim, 2 * dim)
        self.proj_x = nn.Linear(dim, dim)
        self.proj_c = nn.Linear(dim, dim)
        self.d_scale = d_scale
        self.scale = dim**-0.5

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale_x, scale_c = self.scales(x.shape[1], c.shape[1])
        q, v1 = _split_heads(linear(x, self.qv1), 2, self.num_heads)
        k, v2 = _split_heads(linear(c, self.kv2), 2, self.num_heads)
        x = self.proj_drop(linear(self._sdpa(q, k, v2, scale_x), self.proj_x))
        c = self.proj_drop(linear(self._sdpa(k, q, v1, scale_c), self.proj_c))
        return x, c


class StandardAttention(_AttentionBase):
    """S: ordinary multi-head self-attention (one fused qkv projection)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(linear(x, self.qkv), 3, self.num_heads)
        return self.proj_drop(linear(self._sdpa(q, k, v), self.proj))


class DWConv(nn.Module):
    """Depthwise 3x3 conv over the image grid inside the MLP (`mlp_dwconv`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if hw is None:  # meta tokens: no grid
            return x
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).view(B, C, *hw)).flatten(2).transpose(1, 2)


class Mlp(nn.Sequential):
    """Linear -> (DWConv) -> GELU -> Linear. A Sequential so the keys are the official `mlp.0` / `mlp.3`."""

    def __init__(self, dim: int, hidden: int, dwconv: bool = False, drop: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), DWConv(hidden) if dwconv else nn.Identity(), nn.GELU(),
                         nn.Linear(hidden, dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        fc1, dw, act, fc2 = self[0], self[1], self[2], self[3]
        if isinstance(dw, DWConv):
            x = act(dw(fc1(x), hw))
        else:
            x = linear(x, fc1, gelu=True)
        return self.drop(linear(self.drop(x), fc2))


class LeMeBlock(nn.Module):
    """One block: conditional position encoding on the image grid, then attention of the given type and an MLP,
    with norm1/norm2/MLP shared by the image and the meta stream."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str,
        mlp_ratio: float = 4.0,
        mlp_dwconv: bool = False,
        cpe_ks: int = 3,
        pre_norm: bool = True,
        layer_scale_init_value: float | None = None,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        d_scale: str = "dim",
    ):
        super().__init__()
        if attn_type not in ATTENTION_TYPES:
            raise ValueError(f"attention type {attn_type!r} is not one of {', '.join(ATTENTION_TYPES)}")
        self.attn_type = attn_type
        # Conditional position encoding (CPVT): a depthwise conv, so any input size works.
        self.pos_embed = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim) if cpe_ks > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # eps 1e-6 as the official code: "avoids attention collapse"
        if attn_type == "C":
            self.attn = CrossAttention(dim, num_heads, attn_drop, proj_drop)
        elif attn_type == "D":
            self.attn = DualCrossAttention(dim, num_heads, attn_drop, proj_drop, d_scale)
        elif attn_type == "D2":
            self.attn = DualCrossAttentionV2(dim, num_heads, attn_drop, proj_drop, d_scale)
        else:
            self.attn = StandardAttention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), mlp_dwconv, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.pre_norm = pre_norm
        if layer_scale_init_value is not None and layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((1, 1, dim), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((1, 1, dim), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None

    def _residual(self, t: torch.Tensor, update: torch.Tensor, gamma, norm: nn.Module) -> torch.Tensor:
        """Pre-norm: t + f(norm(t)) with f already applied to the normed input; post-norm: norm(t + f(t))."""
        update = self.drop_path(update if gamma is None else gamma * update)
        return t + update if self.pre_norm else norm(t + update)

    def _mlp(self, t: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        return self._residual(t, self.mlp(self.norm2(t) if self.pre_norm else t, hw), self.gamma2, self.norm2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: image tokens (B, H*W, C); c: meta tokens (B, M, C)."""
        x_in = x
        if self.pos_embed is not None:
            B, N, C = x.shape
            x = x + self.pos_embed(x.transpose(1, 2).view(B, C, *hw)).flatten(2).transpose(1, 2)
        n1 = self.norm1 if self.pre_norm else nn.Identity()
        if self.attn_type == "C":  # only the meta tokens change; keys come from the position-encoded grid
            c = self._residual(c, self.attn(n1(x), n1(c)), self.gamma1, self.norm1)
            return x_in, self._mlp(c, None)
        if self.attn_type == "S":
            x = self._residual(x, self.attn(n1(x)), self.gamma1, self.norm1)
            c = self._residual(c, self.attn(n1(c)), self.gamma1, self.norm1)
        else:
            dx, dc = self.attn(n1(x), n1(c))
            x = self._residual(x, dx, self.gamma1, self.norm1)
            c = self._residual(c, dc, self.gamma1, self.norm1)
        return self._mlp(x, hw), self._mlp(c, None)


def _check_args(depth, embed_dim, head_dim, mlp_ratios, attn_type, queries_len, in_chans, num_classes, global_pool,
                rates, cpe_ks, stem_stride, d_scale) -> None:
    """ConfigError naming the first invalid LeMeViT argument (as `model.args` spells it: head_dim=32)."""
    _check_stages(depth, embed_dim, head_dim, mlp_ratios, attn_type)
    _check_sizes(queries_len, in_chans, num_classes, cpe_ks, rates)
    _check_choices(stem_stride, d_scale, global_pool)


def _bad(problem: str) -> ConfigError:
    return ConfigError(f"LeMeViT: {problem}")


def _check_stages(depth, embed_dim, head_dim, mlp_ratios, attn_type) -> None:
    """The per-stage lists: one entry each per stage, every entry valid."""
    if len({len(depth), len(embed_dim), len(attn_type), len(mlp_ratios)}) != 1:
        raise _bad(f"depth, embed_dim, attn_type and mlp_ratios need one entry per stage, got {len(depth)}, "
                   f"{len(embed_dim)}, {len(attn_type)} and {len(mlp_ratios)}")
    if not depth:
        raise _bad("no stages (depth is empty)")
    if not head_dim > 0:
        raise _bad(f"head_dim must be positive, got {head_dim!r}")
    for i, (d, dim, ratio, kind) in enumerate(zip(depth, embed_dim, mlp_ratios, attn_type)):
        if not d >= 0:
            raise _bad(f"depth[{i}] must be at least 0, got {d!r}")
        if not dim > 0 or dim % head_dim:
            raise _bad(f"embed_dim[{i}]={dim!r} must be a positive multiple of head_dim={head_dim}")
        if not ratio > 0:
            raise _bad(f"mlp_ratios[{i}] must be positive, got {ratio!r}")
        if kind not in ATTENTION_TYPES:
            raise _bad(f"attn_type[{i}]={kind!r} is not one of {', '.join(ATTENTION_TYPES)}")
    if embed_dim[0] < 2:
        raise _bad(f"embed_dim[0] must be at least 2 (the stem's first conv has embed_dim[0] // 2), got {embed_dim[0]}")


def _check_sizes(queries_len, in_chans, num_classes, cpe_ks, rates) -> None:
    """The counts, the position-encoding kernel and the dropout rates."""
    for name, value, low in (("queries_len", queries_len, 1), ("in_chans", in_chans, 1),
                             ("num_classes", num_classes, 0), ("cpe_ks", cpe_ks, 0)):
        if not value >= low:
            raise _bad(f"{name} must be at least {low}, got {value!r}")
    if cpe_ks % 2 == 0 and cpe_ks:
        raise _bad(f"cpe_ks must be odd (or 0: no position encoding), got {cpe_ks}")
    for name, rate in zip(("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"), rates):
        if not 0 <= rate < 1:
            raise _bad(f"{name} must be in [0, 1), got {rate!r}")


def _check_choices(stem_stride, d_scale, global_pool) -> None:
    if stem_stride not in (1, 2, 4):
        raise _bad(f"stem_stride must be 1, 2 or 4, got {stem_stride!r}")
    if d_scale not in ("dim", "head"):
        raise _bad(f"d_scale must be 'dim' or 'head', got {d_scale!r}")
    if global_pool not in ("avg", "meta", "image", ""):
        raise _bad(f"global_pool must be 'avg', 'meta', 'image' or '', got {global_pool!r}")


def _meta_token_mlp(dim: int, out_dim: int) -> nn.Sequential:
    """Maps the meta tokens to the next stage's width (keys `meta_token_downsample.i.{0,1,3,4}`)."""
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.LayerNorm(4 * dim), nn.GELU(), nn.Linear(4 * dim, out_dim),
                         nn.LayerNorm(out_dim))


class LeMeViT(nn.Module):
    def __init__(
        self,
        depth: Sequence[int] = (1, 2, 2, 8, 2),
        embed_dim: Sequence[int] = (64, 64, 128, 192, 320),
        head_dim: int = 32,
        mlp_ratios: float | Sequence[float] = 4.0,
        attn_type: Sequence[str] = ("C", "D", "D", "S", "S"),
        queries_len: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cpe_ks: int = 3,
        pre_norm: bool = True,
        mlp_dwconv: bool = False,
        layer_scale_init_value: float | None = None,
        stem_stride: int = 4,
        d_scale: str = "dim",
    ):
        super().__init__()
        num_stages = len(depth)
        mlp_ratios = [mlp_ratios] * num_stages if isinstance(mlp_ratios, (int, float)) else list(mlp_ratios)
        _check_args(depth, embed_dim, head_dim, mlp_ratios, attn_type, queries_len, in_chans, num_classes,
                    global_pool, (drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate), cpe_ks, stem_stride,
                    d_scale)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_stages, self.embed_dim = num_stages, list(embed_dim)
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.num_prefix_tokens = queries_len  # forward_features puts the meta tokens first, like a cls token
        self.grad_checkpointing = False
        self.inference_chunk_size = 2**20  # activations (tokens x width) per chunk, see _run_stage; 0: no chunks

        # Two 3x3 convs (UniFormer's stem) instead of one big patchify conv.
        s1, s2 = {4: (2, 2), 2: (1, 2), 1: (1, 1)}[stem_stride]
        stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0] // 2, 3, s1, 1), nn.BatchNorm2d(embed_dim[0] // 2), nn.GELU(),
            nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, s2, 1), nn.BatchNorm2d(embed_dim[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        # How much each stage's downsampling shrinks the grid: the stem, then 2 (or 1 after the C stage).
        self.stage_strides = [stem_stride] + [1 if attn_type[i] == "C" else 2 for i in range(num_stages - 1)]
        reduction, self.feature_info = 1, []
        for i in range(num_stages - 1):
            if attn_type[i] == "C":  # C leaves the grid unchanged, so the next stage works at the same resolution
                self.downsample_layers.append(nn.Identity())
            else:
                self.downsample_layers.append(nn.Sequential(
                    nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, 2, 1), nn.BatchNorm2d(embed_dim[i + 1])))
        for i in range(num_stages):
            reduction *= self.stage_strides[i]
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=reduction, module=f"stages.{i}"))

        # std-1 init as in the official code (they are inputs to a LayerNorm-ed MLP, so the scale washes out).
        self.meta_tokens = nn.Parameter(torch.randn(queries_len, embed_dim[0]))
        self.meta_token_downsample = nn.ModuleList(
            [_meta_token_mlp(embed_dim[0], embed_dim[0])]
            + [_meta_token_mlp(embed_dim[i], embed_dim[i + 1]) for i in range(num_stages - 1)]
        )

        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()  # also under a meta device
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            first = sum(depth[:i])
            self.stages.append(nn.ModuleList([
                LeMeBlock(embed_dim[i], embed_dim[i] // head_dim, attn_type[i], mlp_ratios[i], mlp_dwconv, cpe_ks,
                          pre_norm, layer_scale_init_value, rates[first + j], attn_drop_rate, proj_drop_rate, d_scale)
                for j in range(depth[i])
            ]))

        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.norm_c = nn.LayerNorm(embed_dim[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------------ timm API

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"meta_tokens"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^downsample_layers\.0|^meta_tokens|^meta_token_downsample\.0",
            blocks=[
                (r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^meta_token_downsample\.(\d+)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", "meta", "image", ""):
                raise ValueError(f"global_pool must be 'avg', 'meta', 'image' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------------------ forward

    def _run_stage(self, i: int, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One stage on an NCHW grid and (B, M, C) meta tokens; returns the same layout."""
        stride = self.stage_strides[i]  # the grid after the stage's downsampling: ceil(H / stride) x ceil(W / stride)
        size = x.shape[0] * -(-x.shape[-2] // stride) * -(-x.shape[-1] // stride) * self.embed_dim[i]
        if not torch.is_grad_enabled() and not self.training and size > self.inference_chunk_size > 0:
            # Inference on a dense grid: a few images at a time. Whole-batch activations (the 4x-wide MLP hidden
            # layer is 100 MB at batch 32 and 224px) come as fresh pages from the OS on every call and stream through
            # memory; chunks of ~16 MB are reused by the allocator and stay in cache (29 -> 40 img/s for
            # lemevit_tiny, BENCHMARKS.md). In eval mode every op is per image, so the result is the same.
            step = max(1, self.inference_chunk_size * x.shape[0] // size)
            parts = [self._run_stage_all(i, xs, cs) for xs, cs in zip(x.split(step), c.split(step))]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._run_stage_all(i, x, c)

    def _run_stage_all(self, i: int, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.downsample_layers[i](x)
        c = self.meta_token_downsample[i](c)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C): a view for a channels_last grid
        for block in self.stages[i]:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x, c = checkpoint(block, x, c, (H, W), use_reentrant=False)
            else:
                x, c = block(x, c, (H, W))
        return x.transpose(1, 2).view(B, C, H, W), c

    def _meta_tokens(self, batch: int) -> torch.Tensor:
        return self.meta_tokens.unsqueeze(0).expand(batch, -1, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, M + H/32 * W/32, C): the normed meta tokens, then the normed grid."""
        c = self._meta_tokens(x.shape[0])
        for i in range(self.num_stages):
            x, c = self._run_stage(i, x, c)
        return self._final_tokens(x, c)

    def _final_tokens(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The normed meta tokens, then the normed grid as tokens: (B, M + H*W, C)."""
        return torch.cat([self.norm_c(c), self.norm(x).flatten(2).transpose(1, 2)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        M = self.num_prefix_tokens
        if self.global_pool == "avg":  # the official head: mean of the grid + mean of the meta tokens
            x = x[:, M:].mean(1) + x[:, :M].mean(1)
        elif self.global_pool == "meta":
            x = x[:, :M].mean(1)
        elif self.global_pool == "image":
            x = x[:, M:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Image grids after the chosen stages (NCHW; strides 4, 4, 8, 16, 32 at the default stem), for dense
        prediction. `norm` applies the final BatchNorm to the last stage's grid when it is taken."""
        if output_fmt != "NCHW":
            raise ValueError("LeMeViT intermediates are NCHW grids")
        take, max_index = feature_take_indices(self.num_stages, indices)
        c = self._meta_tokens(x.shape[0])
        last = max_index if stop_early else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x, c = self._run_stage(i, x, c)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == self.num_stages - 1 else x)
        if intermediates_only:
            return intermediates
        if last < self.num_stages - 1:
            raise ValueError("stop_early without intermediates_only has no final features")
        return self._final_tokens(x, c), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(self.num_stages, indices)
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        self.meta_token_downsample = self.meta_token_downsample[: max_index + 1]
        self.num_stages = max_index + 1
        if prune_norm:
            self.norm, self.norm_c = nn.Identity(), nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_filter_fn(state_dict: dict, model: LeMeViT | None = None) -> dict[str, torch.Tensor]:
    """Official or timm-train checkpoint -> our state dict. Our keys are the official ones, so this only unwraps
    the containers timm's train script writes (`state_dict_ema` preferred, then `state_dict`, `model`) and strips the
    `module.` prefix of DataParallel/DDP. A head of another size is dropped when `model` has a different one."""
    for key in ("state_dict_ema", "state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if model is not None and "head.weight" in out:
        head = model.state_dict().get("head.weight")
        if head is None or head.shape != out["head.weight"].shape:
            out.pop("head.weight")
            out.pop("head.bias", None)
    return out


# ---------------------------------------------------------------------------------------------- named models


def _create_lemevit(variant: str, pretrained: bool = False, **kwargs) -> LeMeViT:
    out_indices = kwargs.pop("out_indices", (1, 2, 3, 4))
    return build_model_with_cfg(
        LeMeViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "fixed_input_size": False,
        "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lemevit_tiny": _cfg(),
    "lemevit_small": _cfg(),
    "lemevit_base": _cfg(),
    # 32x32 inputs (CIFAR): a stride-2 stem keeps a 16x16 grid for the dense D stages (stride 4 would leave 8x8).
    "lemevit_tiny_cifar": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0,
                               mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
})

_SHARED = dict(head_dim=32, mlp_ratios=4, attn_type=("C", "D", "D", "S", "S"), queries_len=16, cpe_ks=3,
               pre_norm=True)


@register_model
def lemevit_tiny(pretrained: bool = False, **kwargs) -> LeMeViT:
    args = dict(_SHARED, depth=(1, 2, 2, 8, 2), embed_dim=(64, 64, 128, 192, 320))
    return _create_lemevit("lemevit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def lemevit_small(pretrained: bool = False, **kwargs) -> LeMeViT:
    args = dict(_SHARED, depth=(1, 2, 2, 6, 2), embed_dim=(96, 96, 192, 320, 384))
    return _create_lemevit("lemevit_small", pretrained, **dict(args, **kwargs))


@register_model
def lemevit_base(pretrained: bool = False, **kwargs) -> LeMeViT:
    args = dict(_SHARED, depth=(2, 4, 4, 18, 4), embed_dim=(96, 96, 192, 384, 512))
    return _create_lemevit("lemevit_base", pretrained, **dict(args, **kwargs))


@register_model
def lemevit_tiny_cifar(pretrained: bool = False, **kwargs) -> LeMeViT:
    """lemevit_tiny for 32x32 images: stride-2 stem, grids 16, 16, 8, 4, 2. Same weights shapes as lemevit_tiny."""
    args = dict(_SHARED, depth=(1, 2, 2, 8, 2), embed_dim=(64, 64, 128, 192, 320), stem_stride=2, num_classes=10)
    return _create_lemevit("lemevit_tiny_cifar", pretrained, **dict(args, **kwargs))

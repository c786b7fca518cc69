"""A plain functional re-statement of the official LeMeViT forward pass, read from a state dict by the official key
names. It follows the official code step by step (NCHW <-> token rearranges, explicit softmax(QK^T * scale)V,
separate image and meta streams), with nothing fused or reordered, so that the optimised model in
`clipsnail.models.lemevit` can be checked against it (tests) and timed against it (bench/lemevit.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _lin(t, sd, p):
    return F.linear(t, sd[p + ".weight"], sd[p + ".bias"])


def _ln(t, sd, p, eps):
    return F.layer_norm(t, (t.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _bn(t, sd, p):
    return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _attend(q, k, v, heads, scale=None):
    """q (B, Nq, C), k/v (B, Nk, C) -> (B, Nq, C); scale None: head_dim ** -0.5."""
    B, Nq, C = q.shape
    d = C // heads
    q = q.reshape(B, Nq, heads, d).permute(0, 2, 1, 3).contiguous()
    k = k.reshape(B, -1, heads, d).permute(0, 2, 1, 3).contiguous()
    v = v.reshape(B, -1, heads, d).permute(0, 2, 1, 3).contiguous()
    attn = (q @ k.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    out = attn.softmax(-1) @ v
    return out.permute(0, 2, 1, 3).reshape(B, Nq, C).contiguous()


def _mlp(t, sd, p, grid=None, dwconv=False):
    h = _lin(t, sd, p + ".0")
    if dwconv and grid is not None:
        B, N, C = h.shape
        H, W = grid
        g = h.permute(0, 2, 1).reshape(B, C, H, W).contiguous()
        g = F.conv2d(g, sd[p + ".1.dwconv.weight"], sd[p + ".1.dwconv.bias"], padding=1, groups=C)
        h = g.reshape(B, C, N).permute(0, 2, 1).contiguous()
    return _lin(F.gelu(h), sd, p + ".3")


def _block(x, c, sd, p, kind, heads, pre_norm, layer_scale, d_scale, dwconv):
    B, C, H, W = x.shape
    x_in = x
    w = sd[p + ".pos_embed.weight"]
    x = x + F.conv2d(x, w, sd[p + ".pos_embed.bias"], padding=w.shape[-1] // 2, groups=C)
    x = x.reshape(B, C, H * W).permute(0, 2, 1).contiguous()
    g1 = sd[p + ".gamma1"] if layer_scale else 1.0
    g2 = sd[p + ".gamma2"] if layer_scale else 1.0

    def n1(t):
        return _ln(t, sd, p + ".norm1", 1e-6)

    def n2(t):
        return _ln(t, sd, p + ".norm2", 1e-6)

    def attn(xi, ci):
        a = p + ".attn"
        if kind == "C":
            q = _lin(ci, sd, a + ".q")
            k, v = _lin(xi, sd, a + ".kv").chunk(2, dim=-1)
            return _lin(_attend(q, k, v, heads), sd, a + ".proj")
        if kind == "S":
            q, k, v = _lin(xi, sd, a + ".qkv").chunk(3, dim=-1)
            return _lin(_attend(q, k, v, heads), sd, a + ".proj")
        N, M = xi.shape[1], ci.shape[1]
        scale = C**-0.5
        sx, sc = (math.log(M, N) * scale, math.log(N, N) * scale) if d_scale == "dim" else (None, None)
        if kind == "D":
            q1, k1, v1 = _lin(xi, sd, a + ".qkv1").chunk(3, dim=-1)
            q2, k2, v2 = _lin(ci, sd, a + ".qkv2").chunk(3, dim=-1)
            xo, co = _attend(q1, k2, v2, heads, sx), _attend(q2, k1, v1, heads, sc)
        else:  # D2
            q, v1 = _lin(xi, sd, a + ".qv1").chunk(2, dim=-1)
            k, v2 = _lin(ci, sd, a + ".kv2").chunk(2, dim=-1)
            xo, co = _attend(q, k, v2, heads, sx), _attend(k, q, v1, heads, sc)
        return _lin(xo, sd, a + ".proj_x"), _lin(co, sd, a + ".proj_c")

    def mlp(t, grid=None):
        return _mlp(t, sd, p + ".mlp", grid, dwconv)

    if kind == "C":
        if pre_norm:
            c = c + g1 * attn(n1(x), n1(c))
            c = c + g2 * mlp(n2(c))
        else:
            c = n1(c + g1 * attn(x, c))
            c = n2(c + g2 * mlp(c))
        return x_in, c
    if kind == "S":
        if pre_norm:
            x = x + g1 * attn(n1(x), None)
            x = x + g2 * mlp(n2(x), (H, W))
            c = c + g1 * attn(n1(c), None)
            c = c + g2 * mlp(n2(c))
        else:
            x = n1(x + g1 * attn(x, None))
            x = n2(x + g2 * mlp(x, (H, W)))
            c = n1(c + g1 * attn(c, None))
            c = n2(c + g2 * mlp(c))
    else:
        if pre_norm:
            xo, co = attn(n1(x), n1(c))
            x = x + g1 * xo
            x = x + g2 * mlp(n2(x), (H, W))
            c = c + g1 * co
            c = c + g2 * mlp(n2(c))
        else:
            xo, co = attn(x, c)
            x = n1(x + g1 * xo)
            x = n2(x + g2 * mlp(x, (H, W)))
            c = n1(c + g1 * co)
            c = n2(c + g2 * mlp(c))
    return x.permute(0, 2, 1).reshape(B, C, H, W).contiguous(), c


@torch.no_grad()
def reference_forward(sd, x, depth, attn_type, head_dim=32, pre_norm=True, layer_scale=False, d_scale="dim",
                      stem_stride=4, dwconv=False):
    """Logits of an eval-mode LeMeViT given its state dict `sd` (official key names)."""
    s1, s2 = {4: (2, 2), 2: (1, 2), 1: (1, 1)}[stem_stride]
    x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=s1, padding=1)
    x = F.gelu(_bn(x, sd, "downsample_layers.0.1"))
    x = F.conv2d(x, sd["downsample_layers.0.3.weight"], sd["downsample_layers.0.3.bias"], stride=s2, padding=1)
    x = _bn(x, sd, "downsample_layers.0.4")
    c = sd["meta_tokens"].repeat(x.shape[0], 1, 1)
    for i in range(len(depth)):
        if i > 0 and attn_type[i - 1] != "C":
            p = f"downsample_layers.{i}"
            x = _bn(F.conv2d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=2, padding=1), sd, p + ".1")
        p = f"meta_token_downsample.{i}"
        c = _ln(_lin(F.gelu(_ln(_lin(c, sd, p + ".0"), sd, p + ".1", 1e-5)), sd, p + ".3"), sd, p + ".4", 1e-5)
        heads = x.shape[1] // head_dim
        for j in range(depth[i]):
            x, c = _block(x, c, sd, f"stages.{i}.{j}", attn_type[i], heads, pre_norm, layer_scale, d_scale, dwconv)
    x = _bn(x, sd, "norm").flatten(2).mean(-1)
    c = _ln(c, sd, "norm_c", 1e-5).transpose(-2, -1).contiguous().mean(-1)
    return _lin(x + c, sd, "head")

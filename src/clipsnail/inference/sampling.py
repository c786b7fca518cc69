"""Sampling PixelSNAIL: the naive reference sampler and an exact cached one.

Naive (what the official code does): one full forward pass of the network per pixel, H*W passes per image.

Cached (Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models", extended to attention):
pixel i only needs each layer's output at position i. A causal convolution's output at i reads its input at i and
at a few earlier positions, so every convolution keeps a zero-padded buffer of its input; writing position i and
reading the kernel's window gives the output at i with one small matmul. 1x1 layers need no buffer. Attention keys
and values at pixel j depend only on features and the image at j, so they are computed once, right after pixel j is
sampled, and appended to a cache; the query of pixel i reads the cache. Every pixel of every layer is computed
exactly once, as in a single forward pass over the finished image, and with the same random numbers the image is
the same as the naive sampler's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipsnail.layers.causal import GatedResidualBlock, WNConv2d
from clipsnail.layers.mixture import guide_params, sample_from_discretized_mix_logistic, sampling_noise
from clipsnail.models.pixelsnail import KEY_CHANNELS, PixelSNAIL, background

log = logging.getLogger(__name__)


def _noise_at(noise: dict[str, torch.Tensor], r: int, c: int) -> dict[str, torch.Tensor]:
    return {k: v[:, :, r : r + 1, c : c + 1] for k, v in noise.items()}


class NaiveSampler:
    """The reference: the whole network over the whole (partly generated) batch for every pixel."""

    def __init__(self, model: PixelSNAIL, batch: int, height: int, width: int, h: torch.Tensor | None = None):
        param = next(model.parameters())
        self.model, self.h = model, h
        self.x = torch.zeros(batch, model.cfg.channels, height, width, device=param.device, dtype=param.dtype)

    def params_at(self, r: int, c: int) -> torch.Tensor:
        return self.model(self.x, h=self.h)[:, :, r, c]

    def write(self, r: int, c: int, pixel: torch.Tensor) -> None:
        self.x[:, :, r, c] = pixel


@torch.no_grad()
def naive_sample(model: PixelSNAIL, n: int, height: int, width: int | None = None, h: torch.Tensor | None = None,
                 temperature: float = 1.0, noise: dict | None = None, generator: torch.Generator | None = None,
                 progress: bool = False, guidance: float = 1.0) -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1], one full forward pass per pixel (what the official code does)."""
    return _generate(NaiveSampler, model, n, height, width or height, h, temperature, noise, generator, progress,
                     guidance)


# ----------------------------------------------------------------------------------------------- cached sampler


class _Conv:
    """A WNConv2d evaluated one position at a time. Its weight (g * v / |v|) is computed once; a k x k conv keeps a
    zero-padded buffer of its input so that output (r, c) is one matmul per kernel row with the window at (r, c).

    The buffer is channels-last (B, H, W, C): a kernel row's window (B, kw, C) is then one strided matrix that the
    matmul reads in place, with no gather copy per step."""

    def __init__(self, layer: WNConv2d, batch: int, height: int, width: int):
        weight = layer.conv.weight  # the parametrisation computes it; fixed from here on
        cout, cin, self.kh, self.kw = weight.shape
        self.bias = layer.conv.bias
        # (Cout, Cin, kh, kw) -> per kernel row a (Cout, kw * Cin) matrix ordered like the buffer's (kw, C) window
        self.rows = [weight[:, :, a].permute(0, 2, 1).reshape(cout, -1).contiguous() for a in range(self.kh)]
        left, right, top, bottom = layer.padding
        self.top, self.left = top, left
        self.buffer = None
        if (self.kh, self.kw) != (1, 1):
            self.buffer = weight.new_zeros(batch, height + top + bottom, width + left + right, cin)

    def write(self, r: int, c: int, value: torch.Tensor) -> None:
        self.buffer[:, r + self.top, c + self.left] = value

    def at(self, r: int, c: int) -> torch.Tensor:
        """The output at (r, c), from what the buffer holds."""
        B = self.buffer.shape[0]
        out = F.linear(self.buffer[:, r, c : c + self.kw].reshape(B, -1), self.rows[0], self.bias)
        for a in range(1, self.kh):
            out = out.addmm_(self.buffer[:, r + a, c : c + self.kw].reshape(B, -1), self.rows[a].T)
        return out

    def point(self, value: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv applied to one position's (B, Cin) features."""
        return F.linear(value, self.rows[0], self.bias)


class _Gated:
    """GatedResidualBlock at one position. For k x k convs it writes its inputs into the conv buffers first."""

    def __init__(self, block: GatedResidualBlock, batch: int, height: int, width: int, h: torch.Tensor | None):
        self.nl = block.nl  # elementwise or concatenating along dim 1: the same on (B, C) as on (B, C, H, W)
        self.conv1 = _Conv(block.conv1, batch, height, width)
        self.conv2 = _Conv(block.conv2, batch, height, width)
        self.aux = _Conv(block.aux, batch, height, width) if block.aux is not None else None
        self.spatial = self.conv1.buffer is not None
        self.cond = block.cond(h) if h is not None else None  # a constant per-image bias: computed once

    def __call__(self, x: torch.Tensor, r: int, c: int, aux: torch.Tensor | None = None) -> torch.Tensor:
        if self.spatial:
            self.conv1.write(r, c, self.nl(x))
            t = self.conv1.at(r, c)
        else:
            t = self.conv1.point(self.nl(x))
        if aux is not None:
            t = t + self.aux.point(self.nl(aux))
        t = self.nl(t)
        if self.spatial:
            self.conv2.write(r, c, t)
            t = self.conv2.at(r, c)
        else:
            t = self.conv2.point(t)
        if self.cond is not None:
            t = t + self.cond
        a, b = t.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class CachedSampler:
    """The state of a batch being generated: conv input buffers and attention key/value caches of every layer."""

    def __init__(self, model: PixelSNAIL, batch: int, height: int, width: int, h: torch.Tensor | None = None):
        cfg = model.cfg
        if cfg.attn_downsample != 1:
            raise NotImplementedError("the cached sampler supports attn_downsample=1; use the naive sampler")
        self.cfg, self.height, self.width = cfg, height, width
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.x = torch.zeros(batch, cfg.channels, height, width, device=device, dtype=dtype)
        self.stem_down = _Conv(model.stem_down, batch, height, width)
        self.stem_down_right = _Conv(model.stem_down_right, batch, height, width)
        self.bg = background(height, width, 1, device, dtype)[0]  # (2, H, W)
        self.blocks = []
        n = height * width
        for block in model.blocks:
            if not block.attention:
                self.blocks.append({"resnets": [_Gated(g, batch, height, width, h) for g in block.resnets]})
                continue
            self.blocks.append({
                "resnets": [_Gated(g, batch, height, width, h) for g in block.resnets],
                "kv_block": _Gated(block.kv_block, batch, height, width, h),
                "kv": _Conv(block.kv, batch, height, width),
                "q_block": _Gated(block.q_block, batch, height, width, h),
                "q": _Conv(block.q, batch, height, width),
                "out_block": _Gated(block.out_block, batch, height, width, h),
                "keys": torch.zeros(batch, 1, n, KEY_CHANNELS, device=device, dtype=dtype),
                "values": torch.zeros(batch, 1, n, cfg.filters // 2, device=device, dtype=dtype),
                "features": None,  # the block's features at the current pixel, for its key/value once it is sampled
            })
        self.head = _Conv(model.head, batch, height, width)

    def params_at(self, r: int, c: int) -> torch.Tensor:
        """Mixture parameters (B, P) of pixel (r, c); all earlier pixels must have been written."""
        B = self.x.shape[0]
        ul = torch.zeros(B, self.cfg.filters, device=self.x.device)
        if r > 0:  # down_shift(stem_down(x)): the conv's output one row up
            ul = ul + self.stem_down.at(r - 1, c)
        if c > 0:  # right_shift(stem_down_right(x)): one column left
            ul = ul + self.stem_down_right.at(r, c - 1)
        bg = self.bg[:, r, c].expand(B, 2)
        i = r * self.width + c
        for blk in self.blocks:
            for resnet in blk["resnets"]:
                ul = resnet(ul, r, c)
            if "keys" not in blk:  # no attention in this model
                continue
            blk["features"] = ul
            q = blk["q"].point(blk["q_block"](torch.cat([ul, bg], 1), r, c))
            if i == 0:  # nothing before the first pixel: the strict mask gives 0
                mixed = ul.new_zeros(B, self.cfg.filters // 2)
            else:
                mixed = F.scaled_dot_product_attention(q[:, None, None], blk["keys"][:, :, :i],
                                                       blk["values"][:, :, :i])[:, 0, 0]
            ul = blk["out_block"](ul, r, c, aux=mixed)
        return self.head.point(F.elu(ul))

    def write(self, r: int, c: int, pixel: torch.Tensor) -> None:
        """Pixel (r, c) is now known (B, C): into the image, the stem's buffers and every attention cache."""
        B = pixel.shape[0]
        self.x[:, :, r, c] = pixel
        padded = torch.cat([pixel, pixel.new_ones(B, 1)], 1)  # the channel of ones, as in the forward pass
        self.stem_down.write(r, c, padded)
        self.stem_down_right.write(r, c, padded)
        bg = self.bg[:, r, c].expand(B, 2)
        i = r * self.width + c
        for blk in self.blocks:
            if "keys" not in blk:
                continue
            kv = blk["kv"].point(blk["kv_block"](torch.cat([pixel, blk["features"], bg], 1), r, c))
            blk["keys"][:, 0, i] = kv[:, :KEY_CHANNELS]
            blk["values"][:, 0, i] = kv[:, KEY_CHANNELS:]


@torch.no_grad()
def cached_sample(model: PixelSNAIL, n: int, height: int, width: int | None = None, h: torch.Tensor | None = None,
                  temperature: float = 1.0, noise: dict | None = None, generator: torch.Generator | None = None,
                  progress: bool = False, guidance: float = 1.0) -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1], each layer computed once per pixel (see the module doc)."""
    return _generate(CachedSampler, model, n, height, width or height, h, temperature, noise, generator, progress,
                     guidance)


def _generate(sampler_class, model: PixelSNAIL, n: int, height: int, width: int, h: torch.Tensor | None,
              temperature: float, noise: dict | None, generator: torch.Generator | None, progress: bool,
              guidance: float) -> torch.Tensor:
    """The pixel loop both samplers share: parameters of pixel i, one draw, write it back; raster order.

    Guidance != 1 runs the network on 2n images, the first n under `h` and the last n under the model's learned
    null condition, mixes their parameters (`guide_params`) and writes the one drawn pixel into both halves.
    """
    cfg = model.cfg
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    if noise is None:
        noise = sampling_noise(n, height, width, cfg.nr_mix, cfg.channels, generator, param.device, param.dtype)
    guided = guidance != 1.0
    if guided:
        if h is None:
            raise ValueError("guidance needs a condition h")
        h = torch.cat([h, model.unconditional(n).to(h)])
    state = sampler_class(model, 2 * n if guided else n, height, width, h)
    desc = f"sampling ({sampler_class.__name__})"
    for i in tqdm(range(height * width), disable=not progress, desc=desc, leave=False):
        r, c = divmod(i, width)
        params = state.params_at(r, c)
        if guided:
            params = guide_params(params[:n], params[n:], guidance, cfg.nr_mix, cfg.channels)
        pixel = sample_from_discretized_mix_logistic(params[:, :, None, None], cfg.nr_mix, cfg.channels,
                                                     temperature, _noise_at(noise, r, c))[:, :, 0, 0]
        state.write(r, c, torch.cat([pixel, pixel]) if guided else pixel)
    model.train(was_training)
    return state.x[:n]


def sample(model: PixelSNAIL, n: int, size: int, h: torch.Tensor | None = None, temperature: float = 1.0,
           seed: int | None = None, method: str = "cached", progress: bool = False,
           guidance: float = 1.0) -> torch.Tensor:
    """n samples (n, C, size, size) in [-1, 1]; `seed` makes them reproducible without touching the global RNG.
    `guidance` != 1: classifier-free guidance with that scale (needs h and a model with a learned null condition)."""
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    if method == "cached" and model.cfg.attn_downsample != 1:
        log.info("attn_downsample=%d: using the naive sampler", model.cfg.attn_downsample)
        method = "naive"
    fn = {"cached": cached_sample, "naive": naive_sample}.get(method)
    if fn is None:
        raise ValueError(f"method must be 'cached' or 'naive', got {method!r}")
    if h is not None:
        h = h.to(next(model.parameters()).device)
    return fn(model, n, size, size, h=h, temperature=temperature, generator=generator, progress=progress,
              guidance=guidance)


def to_pil(images: torch.Tensor) -> list:
    """(B, C, H, W) in [-1, 1] -> PIL images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arr]


def save_sample_grid(images: torch.Tensor, path: str | Path, title: str = "", labels=None) -> Path:
    from clipsnail.inference.plots import image_grid, save_png

    cols = max(1, math.ceil(math.sqrt(len(images))))
    return save_png(image_grid(to_pil(images), title=title, labels=labels, cols=cols, cell=64), path)

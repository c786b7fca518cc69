"""Discretised mixture of logistics (PixelCNN++, Salimans et al. 2017; used unchanged by PixelSNAIL): the
negative log-likelihood of 8-bit images and the sampler, ported from the official TF code
(`pixel_cnn_pp/nn.py`: `discretized_mix_logistic_loss`, `sample_from_discretized_mix_logistic`) to channels-first
tensors.

Parameter layout. The head is a 1x1 conv, so `params` is (B, P, H, W) and the layout is along dim 1. It is the
official one (TF's last axis becomes our dim 1), so a converted official head keeps its output order:

    K = nr_mix, C = 3 (RGB), P = 10 * K
    [0, K)                  mixture logits
    [K + 3Kc, K + 3Kc + K)   means of channel c          (c = 0 R, 1 G, 2 B)
    [K + 3Kc + K, ... + 2K)  log-scales of channel c     (clamped at >= -7)
    [K + 3Kc + 2K, ... + 3K) raw tanh coefficient c      (tanh taken here)

    The coefficient slot of channel block c holds coefficient c, NOT "the coefficient used by channel c":
    c0 (block R) scales R in G's mean, c1 (block G) scales R in B's mean, c2 (block B) scales G in B's mean.

    C = 1 (grey), P = 3 * K: [0, K) logits, [K, 2K) means, [2K, 3K) log-scales (no coefficients).

Reshaped, everything after the logits is (B, C, 3K, H, W) (or (B, 1, 2K, H, W)): a slice and a view, no copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Pixel k in 0..255 is k / 127.5 - 1: neighbouring values are 2/255 apart, so a bin is +-1/255 around its value.
_HALF_BIN = 1.0 / 255.0
_LOG_HALF_LEVELS = math.log(127.5)  # log of 1 / bin width: turns a density into a bin probability
_MIN_LOG_SCALE = -7.0
# The official sampler draws its uniforms in [1e-5, 1 - 1e-5]: keeps log(u), log(1 - u) and -log(-log(u)) finite.
_U_EPS = 1e-5


def mixture_param_count(nr_mix: int, channels: int) -> int:
    """P, the number of head outputs per pixel: 10 * nr_mix for RGB, 3 * nr_mix for grey."""
    if channels == 3:
        return 10 * nr_mix
    if channels == 1:
        return 3 * nr_mix
    raise ValueError(f"the discretised mixture of logistics supports 1 or 3 channels, got {channels}")


def _unpack(
    params: torch.Tensor, nr_mix: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (B, K, H, W); means, clamped log-scales, tanh coefficients (B, C, K, H, W); coefficients None for C=1."""
    if params.dim() != 4:
        raise ValueError(f"params must be (B, P, H, W), got shape {tuple(params.shape)}")
    B, P, H, W = params.shape
    expected = mixture_param_count(nr_mix, channels)
    if P != expected:
        raise ValueError(f"params has {P} channels; {channels}-channel images with {nr_mix} mixtures need {expected}")
    per_channel = 3 if channels == 3 else 2
    logits = params[:, :nr_mix]
    rest = params[:, nr_mix:].reshape(B, channels, per_channel * nr_mix, H, W)
    means = rest[:, :, :nr_mix]
    log_scales = rest[:, :, nr_mix : 2 * nr_mix].clamp(min=_MIN_LOG_SCALE)
    coeffs = torch.tanh(rest[:, :, 2 * nr_mix :]) if channels == 3 else None
    return logits, means, log_scales, coeffs


def discretized_mix_logistic_nll(
    x: torch.Tensor, params: torch.Tensor, nr_mix: int, reduce: bool = True
) -> torch.Tensor:
    """Negative log-likelihood in nats of images `x` (B, C, H, W), C = 1 or 3, values k / 127.5 - 1 for k in 0..255,
    under the mixture `params` (B, P, H, W) laid out as in the module docstring.

    Returns the NLL of each image summed over its pixels and channels, (B,), when `reduce=False`; the mean of that
    over the batch when `reduce=True` (divide by C*H*W, or use `bits_per_dim`, for a per-dimension number).

    Same computation as the official `discretized_mix_logistic_loss`: G's mean is shifted by c0 * R and B's by
    c1 * R + c2 * G with the TRUE earlier channels (teacher forcing, so all channels are scored in one pass);
    value 0 takes all the mass below its bin (log CDF(x + 1/255)), value 255 all the mass above (log(1 - CDF(x -
    1/255))); a bin whose probability is below 1e-5 is scored by the density at its centre times the bin width,
    because the difference of two nearly equal sigmoids is too imprecise there. Compute in float64 if you need
    the exact branch choice of a float64 reference; float32 is what training uses.
    """
    log_mix, log_probs = _component_log_probs(x, params, nr_mix)
    nll = -torch.logsumexp(log_mix + log_probs.sum(dim=1), dim=1).sum(dim=(1, 2))
    return nll.mean() if reduce else nll


def discretized_mix_logistic_channel_log_probs(x: torch.Tensor, params: torch.Tensor, nr_mix: int) -> torch.Tensor:
    """log p(x[c] | x[<c] of the same pixel, earlier pixels) for every sub-pixel: (B, C, H, W), in nats.

    The mixture does not factorise over channels (the component is shared by R, G and B), so channel c's
    conditional is log sum_k pi_k prod_{d<=c} p_k(d) minus the same sum over d < c. Summed over C this is minus
    the per-pixel NLL of `discretized_mix_logistic_nll`. Used for per-channel bits/dim and the R -> G -> B
    causality test.
    """
    log_mix, log_probs = _component_log_probs(x, params, nr_mix)
    joint = torch.logsumexp(log_mix.unsqueeze(1) + log_probs.cumsum(dim=1), dim=2)  # log p(x[<=c]), (B, C, H, W)
    return torch.cat((joint[:, :1], joint[:, 1:] - joint[:, :-1]), dim=1)


def _component_log_probs(
    x: torch.Tensor, params: torch.Tensor, nr_mix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_k (B, K, H, W) and log p_k(x[c] | x[<c]) of every channel under every component (B, C, K, H, W)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    logits, means, log_scales, coeffs = _unpack(params, nr_mix, channels)
    if x.shape[0] != params.shape[0] or x.shape[2:] != params.shape[2:]:
        raise ValueError(f"x {tuple(x.shape)} and params {tuple(params.shape)} disagree on batch or spatial size")
    x = x.to(params.dtype).unsqueeze(2)  # (B, C, 1, H, W): broadcasts over the K mixtures
    if coeffs is not None:
        r, g = x[:, 0], x[:, 1]
        means = torch.stack(
            (means[:, 0], means[:, 1] + coeffs[:, 0] * r, means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g), dim=1
        )
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + _HALF_BIN)
    min_in = inv_stdv * (centered - _HALF_BIN)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): value 0 takes the whole left tail
    log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): value 255 takes the whole right tail
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    # torch.where back-propagates 0 * (local gradient) into the unselected branches, so every branch must stay
    # finite everywhere: hence the clamp inside the log (never selected, as in the official code).
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - _LOG_HALF_LEVELS)
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))
    return F.log_softmax(logits, dim=1), log_probs


def bits_per_dim(nll_nats_per_image: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """nats per image -> bits per sub-pixel: nll / (ln 2 * C * H * W). 8.0 is a uniform model over 256 values."""
    return nll_nats_per_image / (math.log(2.0) * num_dims)


def quantize_to_levels(x: torch.Tensor) -> torch.Tensor:
    """Round values in [-1, 1] to the nearest of the 256 levels k / 127.5 - 1 (the loss's bins)."""
    return torch.round((x + 1.0) * 127.5) / 127.5 - 1.0


def guide_params(cond: torch.Tensor, uncond: torch.Tensor, scale: float, nr_mix: int, channels: int) -> torch.Tensor:
    """Classifier-free guidance on mixture parameters (B, P, ...): the mixture logits and the means move from the
    unconditional prediction through the conditional one, `u + scale * (c - u)`; log-scales and RGB coefficients
    stay conditional (extrapolated log-scales can collapse or explode). scale 1 is the conditional model itself;
    > 1 exaggerates what the condition changes: more on-prompt, less varied samples."""
    if cond.shape != uncond.shape:
        raise ValueError(f"conditional {tuple(cond.shape)} and unconditional {tuple(uncond.shape)} params differ")
    mixture_param_count(nr_mix, channels)  # validates channels
    per_channel = 3 if channels == 3 else 2
    guided = cond.clone()
    slots = [slice(0, nr_mix)] + [slice(nr_mix + per_channel * nr_mix * c, nr_mix + per_channel * nr_mix * c + nr_mix)
                                  for c in range(channels)]
    for sl in slots:
        guided[:, sl] = torch.lerp(uncond[:, sl], cond[:, sl], scale)
    return guided


def sampling_noise(
    batch: int,
    height: int,
    width: int,
    nr_mix: int,
    channels: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The random numbers one call of `sample_from_discretized_mix_logistic` uses, drawn up front: uniforms in [0, 1)
    {"gumbel": (B, K, H, W), "logistic": (B, C, H, W)}. Draw them for a whole image and hand each sampler the same
    tensors (or the same pixel's slice) to make two samplers comparable sample by sample."""
    return {
        "gumbel": torch.rand(batch, nr_mix, height, width, generator=generator, device=device, dtype=dtype),
        "logistic": torch.rand(batch, channels, height, width, generator=generator, device=device, dtype=dtype),
    }


def sample_from_discretized_mix_logistic(
    params: torch.Tensor,
    nr_mix: int,
    channels: int,
    temperature: float = 1.0,
    noise: dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor] | None = None,
    quantize: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One sample per pixel of `params` (B, P, H, W) -> (B, C, H, W) in [-1, 1], as the official sampler: the
    mixture k by Gumbel-max on the logits, then per channel `mean + exp(log_s) * (log(u) - log(1 - u))` clipped to
    [-1, 1], R first, then G with mean + c0 * R, then B with mean + c1 * R + c2 * G, using the SAMPLED R and G.

    temperature: T = 1 is the model's own distribution (and the official sampler). Otherwise the Gumbel-max uses
    logits / T and the logistic noise is multiplied by T, so T < 1 picks likely mixtures more often and narrows
    each logistic around its mean; T = 0 is greedy: the most likely mixture's means (no noise used). It is a
    heuristic, not the tempered distribution p^(1/T) of the 256 values.

    noise: None draws fresh uniforms (from `generator` if given). Otherwise {"gumbel": (B, K, H, W), "logistic":
    (B, C, H, W)} or the tuple (gumbel, logistic), uniforms in [0, 1) as `sampling_noise` makes; they are mapped
    affinely onto [1e-5, 1 - 1e-5], the official sampler's range, so equal noise gives equal samples.

    quantize: round every channel to the nearest level k / 127.5 - 1 before it enters the later channels' means
    and in the output. That is the model's input domain (the loss only ever sees those 256 values, and the next
    pixel is predicted from this one), and it makes the joint sample of (R, G, B) exactly the discrete
    distribution the loss scores. `quantize=False` returns the official sampler's continuous values bit for bit.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits, means, log_scales, coeffs = _unpack(params, nr_mix, channels)
    B, _, H, W = params.shape
    if noise is None:
        noise = sampling_noise(B, H, W, nr_mix, channels, generator, params.device, params.dtype)
    gumbel_u, logistic_u = (noise["gumbel"], noise["logistic"]) if isinstance(noise, dict) else noise
    if gumbel_u.shape != (B, nr_mix, H, W) or logistic_u.shape != (B, channels, H, W):
        raise ValueError(
            f"noise shapes {tuple(gumbel_u.shape)}, {tuple(logistic_u.shape)}; "
            f"expected {(B, nr_mix, H, W)} and {(B, channels, H, W)}"
        )
    gumbel_u = _U_EPS + (1.0 - 2.0 * _U_EPS) * gumbel_u.to(params.dtype)
    logistic_u = _U_EPS + (1.0 - 2.0 * _U_EPS) * logistic_u.to(params.dtype)

    if temperature == 0:
        choice = logits.argmax(dim=1, keepdim=True)
    else:
        choice = (logits / temperature - torch.log(-torch.log(gumbel_u))).argmax(dim=1, keepdim=True)
    index = choice.unsqueeze(1).expand(B, channels, 1, H, W)  # (B, C, 1, H, W): the same mixture for every channel

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(2, index).squeeze(2)  # (B, C, H, W)

    mean = pick(means)
    logistic = torch.log(logistic_u) - torch.log(1.0 - logistic_u)  # the official form, kept for bit equality
    x = mean + (temperature * torch.exp(pick(log_scales))) * logistic if temperature != 0 else mean

    def finish(v: torch.Tensor) -> torch.Tensor:
        v = v.clamp(-1.0, 1.0)
        return quantize_to_levels(v) if quantize else v

    x0 = finish(x[:, 0])
    if coeffs is None:
        return x0.unsqueeze(1)
    c = pick(coeffs)
    x1 = finish(x[:, 1] + c[:, 0] * x0)
    x2 = finish(x[:, 2] + c[:, 1] * x0 + c[:, 2] * x1)
    return torch.stack((x0, x1, x2), dim=1)

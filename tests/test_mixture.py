import math
from collections import Counter

import numpy as np
import pytest
import torch

from clipsnail.layers.mixture import (
    bits_per_dim,
    discretized_mix_logistic_channel_log_probs,
    discretized_mix_logistic_nll,
    mixture_param_count,
    quantize_to_levels,
    sample_from_discretized_mix_logistic,
    sampling_noise,
)

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1


def slot(nr_mix, channels, c, kind):
    """First index of the means / log_scales / coeffs of channel c in the documented layout."""
    per_channel = 3 if channels == 3 else 2
    return nr_mix + per_channel * nr_mix * c + {"mean": 0, "log_scale": 1, "coeff": 2}[kind] * nr_mix


# ---------------------------------------------------------------- reference: plain per-pixel loops, float64


def _sigmoid(y):
    return 1.0 / (1.0 + math.exp(-y)) if y >= 0 else math.exp(y) / (1.0 + math.exp(y))


def reference_nll(x, params, nr_mix):
    """Per-image NLL written scalar by scalar from the PixelCNN++ definition; also counts which case scored each
    sub-pixel (so the tests can check that every case was exercised)."""
    x, params = np.asarray(x, np.float64), np.asarray(params, np.float64)
    B, C, H, W = x.shape
    K = nr_mix
    cases = Counter()
    out = np.zeros(B)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                logits = params[b, :K, i, j]
                log_pi = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
                per_mix = []
                for k in range(K):
                    total = log_pi[k]
                    for c in range(C):
                        v = x[b, c, i, j]
                        mean = params[b, slot(K, C, c, "mean") + k, i, j]
                        log_s = max(params[b, slot(K, C, c, "log_scale") + k, i, j], -7.0)
                        if c >= 1:
                            coef = [math.tanh(params[b, slot(K, C, n, "coeff") + k, i, j]) for n in range(3)]
                        if c == 1:
                            mean += coef[0] * x[b, 0, i, j]
                        if c == 2:
                            mean += coef[1] * x[b, 0, i, j] + coef[2] * x[b, 1, i, j]
                        s = math.exp(log_s)
                        cdf_plus = _sigmoid((v - mean + 1 / 255) / s)
                        cdf_min = _sigmoid((v - mean - 1 / 255) / s)
                        if v < -0.999:
                            cases["left edge"] += 1
                            lp = math.log(cdf_plus)
                        elif v > 0.999:
                            cases["right edge"] += 1
                            lp = math.log(_sigmoid(-(v - mean - 1 / 255) / s))  # 1 - cdf_min, without cancelling
                        elif cdf_plus - cdf_min > 1e-5:
                            cases["bin"] += 1
                            lp = math.log(cdf_plus - cdf_min)
                        else:
                            cases["fallback"] += 1
                            y = abs(v - mean) / s  # the logistic density is symmetric
                            lp = -y - log_s - 2 * math.log1p(math.exp(-y)) - math.log(127.5)
                        total += lp
                    per_mix.append(total)
                per_mix = np.array(per_mix)
                out[b] -= per_mix.max() + math.log(np.exp(per_mix - per_mix.max()).sum())
    return out, cases


def random_case(B, C, H, W, nr_mix, seed):
    g = torch.Generator().manual_seed(seed)
    P = mixture_param_count(nr_mix, C)
    k = torch.randint(0, 256, (B, C, H, W), generator=g)
    k[0, 0, 0, 0], k[-1, -1, -1, -1] = 0, 255  # both edge cases
    k[0, -1, 0, 1] = 127  # a mid value whose bin some mixture makes improbable, below
    params = torch.randn(B, P, H, W, generator=g, dtype=torch.float64)
    params[:, :nr_mix] *= 2
    for c in range(C):
        s = slot(nr_mix, C, c, "log_scale")
        params[:, s : s + nr_mix] = torch.empty(B, nr_mix, H, W, dtype=torch.float64).uniform_(-4, -0.5, generator=g)
        params[:, slot(nr_mix, C, c, "mean") : slot(nr_mix, C, c, "mean") + nr_mix] *= 0.5
    params[0, slot(nr_mix, C, 0, "log_scale"), 1, 0] = -9.0  # below the -7 clamp
    # mixture 0 of the last channel at pixel (0, 1): mean 0.5, scale e^-3 -> the bin of 127 has probability ~7e-6
    shift = 0.0
    if C == 3:  # B's mean also gets c1 * R + c2 * G, so cancel that to place its effective mean at 0.5
        rg = k[0, :2, 0, 1].double() / 127.5 - 1
        c1, c2 = (params[0, slot(nr_mix, C, n, "coeff"), 0, 1].tanh() for n in (1, 2))
        shift = c1 * rg[0] + c2 * rg[1]
    params[0, slot(nr_mix, C, C - 1, "mean"), 0, 1] = 0.5 - shift
    params[0, slot(nr_mix, C, C - 1, "log_scale"), 0, 1] = -3.0
    return k.double() / 127.5 - 1, params


@pytest.mark.parametrize("shape,nr_mix", [((2, 3, 2, 2), 3), ((2, 1, 3, 3), 4)])
def test_nll_equals_per_pixel_reference(shape, nr_mix):
    x, params = random_case(*shape, nr_mix, seed=shape[1])
    expected, cases = reference_nll(x, params, nr_mix)
    assert {"left edge", "right edge", "bin", "fallback"} <= set(cases)  # every branch was exercised
    ours = discretized_mix_logistic_nll(x, params, nr_mix, reduce=False)
    assert ours.shape == (shape[0],) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    assert discretized_mix_logistic_nll(x, params, nr_mix).item() == pytest.approx(expected.mean(), rel=1e-6)
    # float32, what training runs in
    ours32 = discretized_mix_logistic_nll(x.float(), params.float(), nr_mix, reduce=False)
    np.testing.assert_allclose(ours32.double().numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("channels", [3, 1])
def test_channel_log_probs_add_up_to_the_nll_and_each_conditional_is_normalised(channels):
    nr_mix = 4
    x, params = random_case(2, channels, 3, 2, nr_mix, seed=7)
    per_channel = discretized_mix_logistic_channel_log_probs(x, params, nr_mix)
    assert per_channel.shape == x.shape
    nll = discretized_mix_logistic_nll(x, params, nr_mix, reduce=False)
    torch.testing.assert_close(-per_channel.sum(dim=(1, 2, 3)), nll)
    # Each channel's conditional, given the true earlier channels of its pixel, sums to 1 over its 256 values.
    pixel = params[:1, :, :1, :1].expand(256, -1, -1, -1)
    for c in range(channels):
        values = x[:1, :, :1, :1].repeat(256, 1, 1, 1)
        values[:, c] = LEVELS.view(256, 1, 1)
        log_p = discretized_mix_logistic_channel_log_probs(values, pixel, nr_mix)[:, c]
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_channels_last_params_give_the_same_nll():
    x, params = random_case(2, 3, 2, 2, 3, seed=5)
    a = discretized_mix_logistic_nll(x, params, 3, reduce=False)
    b = discretized_mix_logistic_nll(x, params.contiguous(memory_format=torch.channels_last), 3, reduce=False)
    assert torch.equal(a, b)


def test_rejects_wrong_parameter_count():
    with pytest.raises(ValueError, match="need 30"):
        discretized_mix_logistic_nll(torch.zeros(1, 3, 2, 2), torch.zeros(1, 29, 2, 2), 3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        discretized_mix_logistic_nll(torch.zeros(1, 2, 2, 2), torch.zeros(1, 20, 2, 2), 2)


# ---------------------------------------------------------------- bits/dim and normalisation


def test_bits_per_dim_of_uniform_nll_is_8():
    C, H, W = 3, 32, 32
    assert bits_per_dim(C * H * W * math.log(256), C * H * W) == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([C * H * W * math.log(256)]), C * H * W).item() == pytest.approx(8.0)


def test_uniform_mixture_scores_8_bits_per_dim():
    # 256 equally weighted logistics, one peaked (log-scale clamped to -7) on each level: uniform to ~1e-6.
    # (A single logistic cannot do this: values 0 and 255 absorb its tails; the best one is ~8.28 bits/dim.)
    K = 256
    params = torch.cat([torch.zeros(K), LEVELS, torch.full((K,), -10.0, dtype=torch.float64)])
    params = params.view(1, 3 * K, 1, 1).expand(1, 3 * K, 4, 4)
    x = LEVELS[torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0))].view(1, 1, 4, 4)
    assert bits_per_dim(discretized_mix_logistic_nll(x, params, K), 16).item() == pytest.approx(8.0, abs=1e-4)


def test_single_logistic_cannot_beat_8_bits_on_uniform_data():
    x = LEVELS.view(1, 1, 16, 16)  # every value once: cross-entropy >= entropy = 8 bits
    for log_s in (-2.0, -1.0, 0.0, 2.0):
        params = torch.tensor([0.0, 0.0, log_s], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 16, 16)
        assert bits_per_dim(discretized_mix_logistic_nll(x, params, 1), 256).item() > 8.2


def _probabilities(x, params, nr_mix):
    return torch.exp(-discretized_mix_logistic_nll(x, params, nr_mix, reduce=False))


def test_grey_pixel_probabilities_sum_to_one():
    K = 4
    g = torch.Generator().manual_seed(1)
    params = torch.cat(
        [
            torch.randn(K, generator=g, dtype=torch.float64),
            torch.rand(K, generator=g, dtype=torch.float64) * 1.6 - 0.8,
            torch.tensor([-3.0, -1.0, 0.0, -7.0], dtype=torch.float64),
        ]
    )
    p = _probabilities(LEVELS.view(256, 1, 1, 1), params.view(1, 3 * K, 1, 1).expand(256, -1, -1, -1), K)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("free", [0, 1, 2])
def test_rgb_channel_conditionals_sum_to_one(free):
    # Channels before `free` are pinned to a value of probability 1 (mean +-100 puts all mass on 255 or 0), as are
    # those after it, so summing the joint over the free channel's 256 values sums its conditional (coefficient
    # shifts included) times pi_k: it must give 1. free=0 is the R marginal of the 3-channel model.
    K = 3
    g = torch.Generator().manual_seed(2)
    params = torch.randn(10 * K, generator=g, dtype=torch.float64)
    pinned = {0: 1.0, 1: -1.0, 2: 1.0}
    for c in range(3):
        m, s = slot(K, 3, c, "mean"), slot(K, 3, c, "log_scale")
        params[s : s + K] = torch.tensor([-3.0, -1.0, 0.0])
        if c != free:
            params[m : m + K] = 100.0 * pinned[c]
    x = torch.tensor([pinned[0], pinned[1], pinned[2]], dtype=torch.float64).repeat(256, 1)
    x[:, free] = LEVELS
    p = _probabilities(x.view(256, 3, 1, 1), params.view(1, -1, 1, 1).expand(256, -1, -1, -1), K)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- gradients


def test_gradients_are_finite_in_every_branch():
    x, params = random_case(2, 3, 2, 2, 3, seed=3)
    params = params.float()
    params[1, slot(3, 3, 1, "mean")] = 40.0  # a far mean with a tiny scale: cdf_delta underflows to exactly 0
    params[1, slot(3, 3, 1, "log_scale")] = -7.0
    params.requires_grad_(True)
    discretized_mix_logistic_nll(x.float(), params, 3).backward()
    assert torch.isfinite(params.grad).all()
    assert params.grad.abs().sum() > 0
    assert params.grad[0, slot(3, 3, 0, "log_scale"), 1, 0] == 0  # clamped at -7: no gradient, as tf.maximum


def test_gradcheck():
    x, params = random_case(1, 3, 2, 2, 2, seed=4)
    params.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: discretized_mix_logistic_nll(x, p, 2), (params,))


# ---------------------------------------------------------------- sampling


def on_grid(x):
    k = (x + 1) * 127.5
    return torch.allclose(k, k.round(), atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_shape_range_and_grid(channels):
    K = 5
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, mixture_param_count(K, channels), 4, 5, generator=g)
    x = sample_from_discretized_mix_logistic(params, K, channels, generator=g)
    assert x.shape == (2, channels, 4, 5) and x.dtype == params.dtype
    assert x.min() >= -1 and x.max() <= 1 and on_grid(x)
    raw = sample_from_discretized_mix_logistic(params, K, channels, quantize=False, generator=g)
    assert raw.min() >= -1 and raw.max() <= 1 and not on_grid(raw)


def test_fixed_noise_gives_identical_samples():
    K = 4
    params = torch.randn(3, 10 * K, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = sampling_noise(3, 3, 3, K, 3, generator=torch.Generator().manual_seed(1))
    a = sample_from_discretized_mix_logistic(params, K, 3, noise=noise)
    b = sample_from_discretized_mix_logistic(params, K, 3, noise=(noise["gumbel"], noise["logistic"]))
    assert torch.equal(a, b)
    c = sample_from_discretized_mix_logistic(params, K, 3, noise=sampling_noise(3, 3, 3, K, 3))
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="noise shapes"):
        sample_from_discretized_mix_logistic(params, K, 3, noise=sampling_noise(3, 3, 3, K, 1))


def official_sampler(params, nr_mix, gumbel_u, logistic_u):
    """The TF `sample_from_discretized_mix_logistic`, one pixel at a time in float64 (no rounding)."""
    params, gumbel_u, logistic_u = (np.asarray(t, np.float64) for t in (params, gumbel_u, logistic_u))
    B, _, H, W = params.shape
    K = nr_mix
    out = np.zeros((B, 3, H, W))
    for b in range(B):
        for i in range(H):
            for j in range(W):
                gu = 1e-5 + (1 - 2e-5) * gumbel_u[b, :, i, j]
                k = int(np.argmax(params[b, :K, i, j] - np.log(-np.log(gu))))
                prev = []
                for c in range(3):
                    mean = params[b, slot(K, 3, c, "mean") + k, i, j]
                    log_s = max(params[b, slot(K, 3, c, "log_scale") + k, i, j], -7.0)
                    coef = [math.tanh(params[b, slot(K, 3, n, "coeff") + k, i, j]) for n in range(3)]
                    u = 1e-5 + (1 - 2e-5) * logistic_u[b, c, i, j]
                    v = mean + math.exp(log_s) * (math.log(u) - math.log(1 - u))
                    if c == 1:
                        v += coef[0] * prev[0]
                    if c == 2:
                        v += coef[1] * prev[0] + coef[2] * prev[1]
                    prev.append(min(max(v, -1.0), 1.0))
                out[b, :, i, j] = prev
    return out


def test_unquantised_sampler_equals_official_sampler():
    K = 3
    params = torch.randn(2, 10 * K, 2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    noise = sampling_noise(2, 2, 3, K, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = sample_from_discretized_mix_logistic(params, K, 3, noise=noise, quantize=False)
    expected = official_sampler(params, K, noise["gumbel"], noise["logistic"])
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)


def _peaked_rgb(B, K, dominant, means, mean_sign_other=-1.0):
    params = torch.zeros(B, 10 * K, 1, 1, dtype=torch.float64)
    params[:, dominant] = 30.0  # beats any Gumbel draw in [1e-5, 1 - 1e-5] (at most ~14 apart)
    for c in range(3):
        m, s = slot(K, 3, c, "mean"), slot(K, 3, c, "log_scale")
        params[:, m : m + K, 0, 0] = mean_sign_other * means[:, c, None]
        params[:, m + dominant, 0, 0] = means[:, c]
        params[:, s : s + K] = -20.0  # clamped to -7
    return params


def test_peaked_mixture_samples_its_mean():
    # Means sit within 0.002 of a level and the logistic noise is kept to u in [0.2, 0.8] (|noise| < 0.00125), so
    # the sample must round to the mean's nearest level; the other mixtures' means are the negated ones.
    B, K = 64, 4
    g = torch.Generator().manual_seed(8)
    levels = torch.randint(0, 256, (B, 3), generator=g).double() / 127.5 - 1
    means = levels + (torch.rand(B, 3, generator=g, dtype=torch.float64) - 0.5) * 0.004
    params = _peaked_rgb(B, K, dominant=2, means=means)
    noise = {"gumbel": torch.rand(B, K, 1, 1, generator=g), "logistic": 0.2 + 0.6 * torch.rand(B, 3, 1, 1, generator=g)}
    x = sample_from_discretized_mix_logistic(params, K, 3, noise=noise)
    assert torch.allclose(x[:, :, 0, 0], levels, atol=1e-9)
    # temperature 0 is greedy: the most likely mixture's means, whatever the noise
    greedy = sample_from_discretized_mix_logistic(params, K, 3, temperature=0.0)
    assert torch.allclose(greedy[:, :, 0, 0], levels, atol=1e-9)


def test_coefficients_use_the_sampled_earlier_channels():
    # R is wide (mean 0, scale 1); G and B are peaked at mean + coefficient terms, so they can only be right if
    # the coefficients multiply the sampled R and G (the means of R would give 0).
    B, K = 256, 2
    g = torch.Generator().manual_seed(9)
    params = torch.zeros(B, 10 * K, 1, 1, dtype=torch.float64)
    params[:, 0] = 30.0
    params[:, slot(K, 3, 0, "log_scale")] = 0.0
    params[:, slot(K, 3, 1, "mean")], params[:, slot(K, 3, 2, "mean")] = 0.1, -0.2
    params[:, slot(K, 3, 1, "log_scale")] = params[:, slot(K, 3, 2, "log_scale")] = -7.0
    raw = torch.tensor([0.8, -0.5, 0.3], dtype=torch.float64)
    for n in range(3):
        params[:, slot(K, 3, n, "coeff")] = raw[n]
    c0, c1, c2 = raw.tanh().tolist()
    noise = {"gumbel": torch.rand(B, K, 1, 1, generator=g), "logistic": torch.rand(B, 3, 1, 1, generator=g)}
    u = 1e-5 + (1 - 2e-5) * noise["logistic"][:, :, 0, 0].double()
    eps = math.exp(-7.0) * (u.log() - (1 - u).log())
    for quantize in (False, True):
        q = quantize_to_levels if quantize else (lambda v: v)
        r, gr, bl = sample_from_discretized_mix_logistic(params, K, 3, noise=noise, quantize=quantize)[:, :, 0, 0].T
        assert r.std() > 0.3
        assert torch.allclose(gr, q((0.1 + c0 * r + eps[:, 1]).clamp(-1, 1)), atol=1e-12)
        assert torch.allclose(bl, q((-0.2 + c1 * r + c2 * gr + eps[:, 2]).clamp(-1, 1)), atol=1e-12)


def test_grey_sample_histogram_matches_bin_probabilities():
    K, n = 3, 20000
    params = torch.tensor([0.5, -0.3, 0.0, -0.6, 0.1, 0.7, -1.5, -2.0, -3.5], dtype=torch.float64).view(1, 9, 1, 1)
    x = sample_from_discretized_mix_logistic(
        params.expand(n, -1, -1, -1), K, 1, generator=torch.Generator().manual_seed(10)
    )
    counts = torch.bincount(((x.flatten() + 1) * 127.5).round().long(), minlength=256).double() / n
    probs = _probabilities(LEVELS.view(256, 1, 1, 1), params.expand(256, -1, -1, -1), K)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert (counts - probs).abs().max() < 0.01
    assert counts[0] > 0.02 and counts[255] > 0  # the clipped tails land on the edge values, as the loss scores them


def test_rgb_sample_marginals_match_the_loss():
    # B is pinned to 255, so p(R, G) is the loss's joint over all 65,536 (R, G) pairs; G's marginal depends on R
    # through c0 = tanh(1.5) = 0.9, so it checks the coefficient path of the sampler against the loss.
    K, n = 3, 20000
    g = torch.Generator().manual_seed(11)
    params = torch.randn(10 * K, generator=g, dtype=torch.float64) * 0.3
    for c in range(3):
        s = slot(K, 3, c, "log_scale")
        params[s : s + K] = torch.tensor([-2.0, -1.5, -3.0])
    params[slot(K, 3, 0, "coeff") : slot(K, 3, 0, "coeff") + K] = 1.5
    params[slot(K, 3, 2, "mean") : slot(K, 3, 2, "mean") + K] = 100.0
    params = params.view(1, -1, 1, 1)
    x = sample_from_discretized_mix_logistic(params.expand(n, -1, -1, -1), K, 3, generator=g)[:, :, 0, 0]
    assert (x[:, 2] == 1).all()
    r, gr = torch.meshgrid(LEVELS, LEVELS, indexing="ij")
    grid = torch.stack([r.flatten(), gr.flatten(), torch.ones(65536, dtype=torch.float64)], 1).view(-1, 3, 1, 1)
    joint = _probabilities(grid, params.expand(65536, -1, -1, -1), K).view(256, 256)
    assert joint.sum().item() == pytest.approx(1.0, abs=1e-4)
    for c, marginal in ((0, joint.sum(1)), (1, joint.sum(0))):
        counts = torch.bincount(((x[:, c] + 1) * 127.5).round().long(), minlength=256).double() / n
        assert (counts - marginal).abs().max() < 0.01

"""PixelSNAIL: causality by gradients, data-dependent init, conditioning, the strict attention mask, the cached
sampler against the naive one, and the train / eval / sample commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import logged_losses, write_idx

from clipsnail.cli import main
from clipsnail.families.pixelsnail import mean_bits_per_dim
from clipsnail.inference.sampling import cached_sample, naive_sample
from clipsnail.layers.causal import WNConv2d, causal_attention, causal_mask, data_dependent_init
from clipsnail.layers.mixture import (
    bits_per_dim,
    discretized_mix_logistic_channel_log_probs,
    discretized_mix_logistic_nll,
    sampling_noise,
)
from clipsnail.models.pixelsnail import CONFIGS, PixelSNAIL, PixelSNAILConfig


def _model(channels=3, **kw) -> PixelSNAIL:
    torch.manual_seed(0)
    cfg = PixelSNAILConfig(channels=channels, **{**CONFIGS["tiny"], **kw})
    return PixelSNAIL(cfg)


def _dependence(model, x, h=None):
    """dep[i, j] = True when the output at pixel i (any parameter) has a non-zero gradient wrt any channel of input
    pixel j (raster order)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    out = model(x, h=h)
    B, C, H, W = x.shape
    dep = torch.zeros(H * W, H * W, dtype=torch.bool)
    for i in range(H * W):
        r, c = divmod(i, W)
        (g,) = torch.autograd.grad(out[:, :, r, c].sum(), x, retain_graph=True)
        dep[i] = g.abs().sum(dim=(0, 1)).flatten() != 0
    return dep


@pytest.mark.parametrize("variant", [
    dict(channels=3), dict(channels=1), dict(channels=3, nonlinearity="concat_elu"),
    dict(channels=3, cond_dim=4), dict(channels=3, attn_downsample=2), dict(channels=1, nr_resnet=2, blocks=3),
    dict(channels=1, attention=False)])
def test_output_at_a_pixel_never_depends_on_that_pixel_or_later_ones(variant):
    model = _model(**variant)
    C = model.cfg.channels
    x = torch.rand(2, C, 6, 5) * 2 - 1
    h = torch.randn(2, 4) if model.cfg.cond_dim else None
    data_dependent_init(model, x, h=h)
    dep = _dependence(model, x, h)
    n = dep.shape[0]
    future = torch.ones(n, n, dtype=torch.bool).triu()  # j >= i, pixel 0 included
    assert not (dep & future).any()
    assert not dep[0].any()  # the first pixel sees nothing
    # ... and it is not vacuous: the last pixel depends on many earlier ones (convolutions and attention)
    assert dep[n - 1].sum() > n // 2


@pytest.mark.parametrize("channels", [3, 1])
def test_each_sub_pixel_likelihood_depends_only_on_earlier_sub_pixels(channels):
    """The whole model, network and mixture together, is autoregressive over sub-pixels in the order pixel by pixel
    (raster), R -> G -> B within a pixel: d log p(x[i, c] | ...) / d x[j, d] is 0 unless (j, d) <= (i, c)."""
    model = _model(channels=channels)
    H, W = 4, 3
    x = torch.randint(0, 256, (1, channels, H, W)).float() / 127.5 - 1
    data_dependent_init(model, x)
    model.eval()
    x.requires_grad_(True)
    log_p = discretized_mix_logistic_channel_log_probs(x, model(x), model.cfg.nr_mix)
    order = torch.arange(H * W * channels).view(H * W, channels).t().reshape(channels, H, W)  # sub-pixel index
    for c in range(channels):
        for i in range(H * W):
            (g,) = torch.autograd.grad(log_p[0, c].flatten()[i], x, retain_graph=True)
            depends = g[0] != 0
            me = order[c].flatten()[i]
            assert not (depends & (order > me)).any(), f"sub-pixel {c} of pixel {i} sees a later one"
            assert depends.flatten()[c * H * W + i]  # its own value (the target) always counts
            if c > 0:  # G sees R, B sees R and G of the same pixel: the mixture's linear coefficients
                assert depends[:c].flatten()[torch.arange(c) * H * W + i].all()
    assert depends.sum() > channels  # the last sub-pixel also depends on earlier pixels, through the network


def test_attention_mask_is_strict_and_the_first_pixel_gets_zero():
    mask = causal_mask(3, 3)
    assert not mask[0].any() and mask[4].tolist() == [True] * 4 + [False] * 5
    q, k, v = torch.randn(1, 16, 3, 3), torch.randn(1, 16, 3, 3), torch.randn(1, 8, 3, 3)
    out = causal_attention(q, k, v)
    assert torch.equal(out[:, :, 0, 0], torch.zeros(1, 8))
    assert torch.isfinite(out).all()
    # pixel 1 sees only pixel 0: its output is pixel 0's value exactly
    assert torch.allclose(out[:, :, 0, 1], v[:, :, 0, 0], atol=1e-6)
    # pooled keys: a query sees a 2x2 cell only after the cell's last (bottom-right) pixel
    pooled = causal_mask(4, 4, downsample=2)
    assert pooled.shape == (16, 4)
    assert not pooled[5].any() and pooled[6, 0] and not pooled[6, 1]


def test_data_dependent_init_gives_unit_variance_preactivations():
    model = _model()
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (output.mean(dim=(0, 2, 3)), output.std(dim=(0, 2, 3), unbiased=False), module.init_scale)
        return hook

    data_dependent_init(model, x)
    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, WNConv2d)]
    model.train()
    torch.manual_seed(0)  # dropout is off in "tiny"; the same batch must now give the init statistics
    model(x)
    for h in handles:
        h.remove()
    assert len(seen) > 10
    for name, (mean, std, scale) in seen.items():
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4), name
        assert torch.allclose(std, torch.full_like(std, scale), rtol=1e-3), name


def test_conditioning_changes_the_output():
    model = _model(cond_dim=3).eval()
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    with torch.no_grad():
        for m in model.modules():  # non-zero conditioning weights everywhere
            if hasattr(m, "cond") and m.cond is not None:
                m.cond.weight.normal_(0, 0.5)
        a = model(x, h=torch.eye(3)[[0, 0]])
        b = model(x, h=torch.eye(3)[[1, 1]])
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="conditional"):
        model(x)


@pytest.mark.parametrize("variant", [dict(channels=3), dict(channels=1, nonlinearity="concat_elu", cond_dim=2),
                                     dict(channels=1, attention=False)])
def test_cached_sampler_draws_the_same_images_as_the_naive_one(variant):
    model = _model(**variant).double()
    C = model.cfg.channels
    h = torch.eye(2, dtype=torch.float64)[[0, 1, 1]] if model.cfg.cond_dim else None
    data_dependent_init(model, torch.rand(3, C, 6, 5, dtype=torch.float64) * 2 - 1, h=h)
    noise = sampling_noise(3, 6, 5, model.cfg.nr_mix, C, torch.Generator().manual_seed(1), dtype=torch.float64)
    naive = naive_sample(model, 3, 6, 5, h=h, noise=noise)
    cached = cached_sample(model, 3, 6, 5, h=h, noise=noise)
    assert torch.equal(naive, cached)
    levels = (naive + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-6) and naive.abs().max() <= 1


@pytest.mark.parametrize("channels", [3, 1])
def test_guided_sampling_is_exact_and_mixes_conditional_with_the_null_condition(channels):
    model = _model(channels=channels, cond_dim=2, null_condition=True).double()
    h = torch.eye(2, dtype=torch.float64)[[0, 1]]
    data_dependent_init(model, torch.rand(2, channels, 4, 4, dtype=torch.float64) * 2 - 1, h=h)
    with torch.no_grad():
        model.null_h.normal_()  # a trained null vector is not zero
    noise = sampling_noise(2, 4, 4, model.cfg.nr_mix, channels, torch.Generator().manual_seed(3), dtype=torch.float64)
    guided = {s: cached_sample(model, 2, 4, 4, h=h, noise=noise, guidance=s) for s in (1.0, 3.0)}
    assert torch.equal(guided[3.0], naive_sample(model, 2, 4, 4, h=h, noise=noise, guidance=3.0))
    # scale 1 is the conditional model; another scale changes the draw
    assert torch.equal(guided[1.0], cached_sample(model, 2, 4, 4, h=h, noise=noise))
    assert not torch.equal(guided[3.0], guided[1.0])
    with pytest.raises(ValueError, match="null condition"):
        cached_sample(_model(channels=channels, cond_dim=2), 1, 4, 4, h=h[:1], guidance=2.0)


def test_guide_params_moves_logits_and_means_only():
    from clipsnail.layers.mixture import guide_params

    nr_mix = 2
    cond, uncond = torch.randn(3, 20, 2, 2), torch.randn(3, 20, 2, 2)
    out = guide_params(cond, uncond, 3.0, nr_mix, 3)
    moved = torch.zeros(20, dtype=torch.bool)
    moved[:2] = True  # logits
    for c in range(3):
        moved[2 + 6 * c : 4 + 6 * c] = True  # means of channel c
    torch.testing.assert_close(out[:, moved], uncond[:, moved] + 3.0 * (cond[:, moved] - uncond[:, moved]))
    assert torch.equal(out[:, ~moved], cond[:, ~moved])


def test_mean_bits_per_dim_is_the_eval_mode_nll_over_all_batches():
    model = _model(channels=1).train()
    x = torch.randint(0, 256, (5, 1, 6, 6), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    nr_mix = model.cfg.nr_mix
    bpd = mean_bits_per_dim(model, [(x[:3], None), (x[3:], None)], nr_mix, 36)
    assert model.training  # the mode is given back
    with torch.no_grad():
        expected = bits_per_dim(discretized_mix_logistic_nll(x, model.eval()(x), nr_mix).item(), 36)
    assert bpd == pytest.approx(expected, rel=1e-5)
    assert mean_bits_per_dim(model, [], nr_mix, 36) is None


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A tiny MNIST-format data set: 40 images 12x12 with a bar whose row encodes the label."""
    out = tmp_path_factory.mktemp("digits")
    labels = np.arange(40) % 4
    images = np.zeros((40, 12, 12), np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y : 4 + 2 * y, 2:10] = 255
    write_idx(out / "t10k-images-idx3-ubyte.gz", images)
    write_idx(out / "t10k-labels-idx1-ubyte.gz", labels)
    return out


def test_train_eval_sample_commands(digits_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pixelsnail", "train", "--data", f"mnist:{digits_dir}", "--config", "tiny", "--out", str(run),
            "--epochs", "3", "--no-progress", "--condition", "class", "--set", "batch_size=8", "--set",
            "log_every=1", "--set", "samples_per_epoch=4", "--set", "lr=2e-3"]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 < metrics["ema_test_bits_per_dim"] < 8
    losses = logged_losses(run)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (run / "samples" / "epoch_003.png").is_file()

    assert main(["pixelsnail", "eval", "--model", str(run), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_dim"] == pytest.approx(metrics["ema_test_bits_per_dim"], rel=1e-5)

    grid = tmp_path / "grid.png"
    assert main(["pixelsnail", "sample", "--model", str(run), "-n", "4", "--class", "2", "--out", str(grid),
                 "--no-progress"]) == 0
    assert grid.is_file()
    assert main(["pixelsnail", "sample", "--model", str(run), "-n", "2", "--out", str(grid), "--no-progress"]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_unknown_preset_is_refused(digits_dir, tmp_path, capsys):
    assert main(["pixelsnail", "train", "--data", f"mnist:{digits_dir}", "--config", "h99", "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    assert "h99" in capsys.readouterr().err


def test_the_progress_bar_shows_bits_per_dim_not_nats(digits_dir, tmp_path, capsys):
    assert main(["pixelsnail", "train", "--data", f"mnist:{digits_dir}", "--config", "tiny", "--out",
                 str(tmp_path / "run"), "--epochs", "1", "--set", "batch_size=8", "--set", "samples_per_epoch=0"]) == 0
    bar = capsys.readouterr().err
    assert "bits_per_dim=" in bar and "loss=" not in bar

"""LeMeViT: official parameter counts and key names, equivalence with a plain re-statement of the official forward
pass, the block semantics of the paper, and the timm API."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from lemevit_reference import reference_forward

import clipsnail  # noqa: F401  (registers the timm models)
from clipsnail.models.lemevit import DualCrossAttention, LeMeBlock, LeMeViT, checkpoint_filter_fn

TINY = dict(depth=(1, 2, 2, 8, 2), attn_type=("C", "D", "D", "S", "S"))


def _randomise_statistics(model: torch.nn.Module) -> None:
    """BatchNorm statistics and norm gains away from their identity init, so an equivalence test means something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")) or "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name,count", [
    ("lemevit_tiny", 8_635_816), ("lemevit_small", 16_400_456), ("lemevit_base", 53_098_152)])
def test_parameter_counts_equal_the_official_ones(name, count):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_state_dict_uses_the_official_key_names():
    keys = set(timm.create_model("lemevit_tiny").state_dict())
    official = {
        "meta_tokens", "downsample_layers.0.0.weight", "downsample_layers.0.1.running_var",
        "downsample_layers.0.3.weight", "downsample_layers.0.4.bias", "downsample_layers.2.0.weight",
        "downsample_layers.4.1.weight", "meta_token_downsample.0.0.weight", "meta_token_downsample.0.1.weight",
        "meta_token_downsample.4.3.weight", "meta_token_downsample.4.4.bias",
        "stages.0.0.pos_embed.weight", "stages.0.0.attn.q.weight", "stages.0.0.attn.kv.weight",
        "stages.0.0.attn.proj.weight", "stages.1.1.attn.qkv1.weight", "stages.1.1.attn.qkv2.bias",
        "stages.2.0.attn.proj_x.weight", "stages.2.0.attn.proj_c.bias", "stages.3.7.attn.qkv.weight",
        "stages.4.1.attn.proj.bias", "stages.4.1.norm1.weight", "stages.4.1.norm2.bias", "stages.4.1.mlp.0.weight",
        "stages.4.1.mlp.3.bias", "norm.running_mean", "norm_c.weight", "head.weight", "head.bias",
    }
    assert official <= keys
    assert not any(k.startswith("downsample_layers.1.") for k in keys)  # Identity after the C stage


@pytest.mark.parametrize("variant,reference", [
    ({}, {}),
    ({"attn_type": ("C", "D2", "D", "S", "S")}, {}),
    ({"pre_norm": False}, {"pre_norm": False}),
    ({"layer_scale_init_value": 0.5}, {"layer_scale": True}),
    ({"mlp_dwconv": True}, {"dwconv": True}),
    ({"d_scale": "head"}, {"d_scale": "head"}),
    ({"stem_stride": 2}, {"stem_stride": 2}),
])
def test_outputs_equal_the_plain_official_computation(variant, reference):
    torch.manual_seed(0)
    model = timm.create_model("lemevit_tiny", num_classes=7, **variant).eval()
    _randomise_statistics(model)
    x = torch.randn(2, 3, 64, 96)
    expected = reference_forward(model.state_dict(), x, TINY["depth"], variant.get("attn_type", TINY["attn_type"]),
                                 **reference)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-4)
        model = model.to(memory_format=torch.channels_last)  # the fast layout gives the same numbers
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5, rtol=1e-4)


def test_chunked_inference_equals_whole_batch():
    torch.manual_seed(0)
    model = timm.create_model("lemevit_tiny", num_classes=5).eval()
    _randomise_statistics(model)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        model.inference_chunk_size = 0
        whole = model(x)
        model.inference_chunk_size = 3000  # a chunk of one or two images in the dense stages
        chunked = model(x)
    assert torch.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (96, 128), (224, 224)])
def test_output_shape_at_several_resolutions(size):
    model = timm.create_model("lemevit_tiny", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)
        tokens = model.forward_features(torch.randn(1, 3, *size))
    assert tokens.shape == (1, 16 + math.ceil(size[0] / 32) * math.ceil(size[1] / 32), 320)


def test_meta_tokens_and_every_weight_receive_gradients():
    model = timm.create_model("lemevit_tiny", num_classes=3)
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).sum().backward()
    assert model.meta_tokens.grad is not None and model.meta_tokens.grad.abs().sum() > 0
    # The C block's pos_embed only feeds the keys of the meta tokens; it must still learn.
    assert model.stages[0][0].pos_embed.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_cross_attention_block_leaves_image_tokens_unchanged():
    block = LeMeBlock(64, 2, "C")
    x, c = torch.randn(2, 49, 64), torch.randn(2, 16, 64)
    x_out, c_out = block(x, c, (7, 7))
    assert torch.equal(x_out, x)
    assert not torch.allclose(c_out, c)


def test_dual_cross_attention_scale_is_log_m_over_log_n_times_dim():
    dim, heads, N, M = 64, 2, 49, 16
    attn = DualCrossAttention(dim, heads)
    assert attn.scales(N, M) == pytest.approx((math.log(M) / math.log(N) * dim**-0.5, dim**-0.5))
    # ... and the softmax really uses it: recompute the image->meta stream by hand.
    x, c = torch.randn(1, N, dim), torch.randn(1, M, dim)
    out_x, _ = attn(x, c)
    q1 = attn.qkv1(x)[..., :dim].view(1, N, heads, -1).transpose(1, 2)
    _, k2, v2 = attn.qkv2(c).view(1, M, 3, heads, -1).permute(2, 0, 3, 1, 4)
    w = (q1 @ k2.transpose(-1, -2) * math.log(M) / math.log(N) * dim**-0.5).softmax(-1)
    expected = attn.proj_x((w @ v2).transpose(1, 2).reshape(1, N, dim))
    assert torch.allclose(out_x, expected, atol=1e-5)


def test_timm_api_round_trip():
    model = timm.create_model("lemevit_tiny", num_classes=10, drop_path_rate=0.1)
    assert isinstance(model, LeMeViT) and model.num_features == 320 and isinstance(model.num_features, int)
    assert model.stages[-1][-1].drop_path.drop_prob == pytest.approx(0.1)
    assert model.get_classifier().out_features == 10
    assert "meta_tokens" in model.no_weight_decay()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled, atol=1e-6)
        assert model(x).shape == (2, 320)
        model.reset_classifier(4, global_pool="meta")
        assert model(x).shape == (2, 4)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, global_pool="max")


def test_forward_intermediates_give_dense_features_at_strides_4_to_32():
    model = timm.create_model("lemevit_tiny").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=[1, 2, 3, 4])
        assert [f.shape[1:] for f in feats] == [(64, 32, 32), (128, 16, 16), (192, 8, 8), (320, 4, 4)]
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        only = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        assert [f.shape[1] for f in only] == [192, 320]
    backbone = timm.create_model("lemevit_tiny", features_only=True)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[-1] for f in backbone(x)] == [32, 16, 8, 4]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("lemevit_tiny", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.meta_tokens.grad.clone())
    assert torch.allclose(*grads, atol=1e-6)


def test_group_matcher_covers_every_parameter():
    from timm.models import group_parameters

    model = timm.create_model("lemevit_tiny")
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


def test_official_and_timm_checkpoint_files_load_strictly(tmp_path):
    source = timm.create_model("lemevit_tiny", num_classes=10).eval()
    _randomise_statistics(source)
    wrapped = {"epoch": 3, "state_dict": {}, "state_dict_ema": {f"module.{k}": v for k, v in
                                                                 source.state_dict().items()}}
    path = tmp_path / "official.pth"
    torch.save(wrapped, path)
    # timm's own loader (weights_only unpickling) + our filter: the way `pretrained_cfg_overlay=dict(file=...)` works.
    model = timm.create_model("lemevit_tiny", num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    target = LeMeViT(num_classes=10)
    target.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True)), strict=True)


def test_head_of_another_size_is_dropped_when_loading():
    state = timm.create_model("lemevit_tiny").state_dict()  # 1000 classes
    filtered = checkpoint_filter_fn(state, timm.create_model("lemevit_tiny", num_classes=10))
    assert "head.weight" not in filtered and "meta_tokens" in filtered


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="attention type"):
        LeMeBlock(64, 2, "X")
    with pytest.raises(ValueError, match="stem_stride"):
        LeMeViT(stem_stride=3)
    with pytest.raises(ValueError, match="one entry per stage"):
        LeMeViT(depth=(1, 2))


def test_small_image_variant_keeps_a_16x16_grid_for_32px_input():
    model = timm.create_model("lemevit_tiny_cifar").eval()
    assert model.num_classes == 10
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [16, 16, 8, 4, 2]
    assert F.softmax(model(torch.randn(2, 3, 32, 32)), -1).shape == (2, 10)


def test_lemevit_is_a_clip_image_tower(shapes_dir, tmp_path, capsys):
    from helpers import tiny_clip_args

    from clipsnail.apps.hub import load
    from clipsnail.cli import main

    run = tmp_path / "clip_lemevit"
    assert main(tiny_clip_args(shapes_dir, run, "--set", "vision.encoder=lemevit_tiny_cifar", "--set",
                               "train.max_steps=2")) == 0
    model = load(run)
    assert type(model.visual).__name__ == "LeMeViT"
    emb = model.encode_image(torch.rand(2, 3, 16, 16))
    assert emb.shape == (2, model.embed_dim) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)

import pytest
import torch
from helpers import tiny_clip_config

from clipsnail.models import CLIP, TextTransformer, VisionTransformer


def small_cfg(vision=None, head=None):
    return tiny_clip_config(vision=vision, head={"embed_dim": 24, **(head or {})})


def test_vit_shapes_and_pools():
    vit = VisionTransformer(image_size=16, patch_size=4, width=32, depth=2, heads=2)
    x = torch.randn(3, 3, 16, 16)
    assert vit.forward_features(x).shape == (3, 17, 32)
    assert vit(x).shape == (3, 32)
    assert VisionTransformer(16, 4, 32, 1, 2, pool="avg")(x).shape == (3, 32)
    with pytest.raises(ValueError, match="16x16"):
        vit(torch.randn(1, 3, 20, 20))


def test_text_tower_is_causal():
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=30, context_length=8, width=16, depth=2, heads=2).eval()
    tokens = torch.randint(3, 30, (1, 8))
    emb = text.token_embedding(tokens).detach().requires_grad_(True)
    x = emb + text.pos_embed
    for b in text.blocks:
        x = b(x, causal=True)
    for i in range(8):
        (g,) = torch.autograd.grad(x[0, i].sum(), emb, retain_graph=True)
        assert g[0, i + 1:].abs().sum() == 0  # no position sees the future
        assert g[0, : i + 1].abs().sum() > 0


def test_eot_pooling_ignores_padding():
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=30, context_length=8, width=16, depth=2, heads=2, eot_id=2).eval()
    a = torch.tensor([[1, 7, 8, 2, 0, 0, 0, 0]])
    b = torch.tensor([[1, 7, 8, 2, 9, 9, 9, 9]])  # different junk after <eot>
    assert torch.allclose(text(a), text(b), atol=1e-6)
    c = torch.tensor([[1, 7, 5, 2, 0, 0, 0, 0]])
    assert not torch.allclose(text(a), text(c))


def test_clip_outputs_are_normalised_and_trainable():
    torch.manual_seed(0)
    model = CLIP(small_cfg())
    images = torch.randn(4, 3, 16, 16)
    tokens = torch.randint(3, 50, (4, 12))
    tokens[:, 6] = 2
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (4, 24)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(scale, torch.tensor(1 / 0.07), atol=1e-3)
    (img @ txt.T).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "logit_scale")


@pytest.mark.parametrize("projection", ["linear", "head"])
def test_projection_kinds(projection):
    model = CLIP(small_cfg(head={"projection": projection}))
    assert model.encode_image(torch.randn(2, 3, 16, 16)).shape == (2, 24)


def test_timm_image_tower():
    model = CLIP(small_cfg(vision={"encoder": "timm:resnet18", "image_size": 32}))
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 24)
    with pytest.raises(ValueError, match="unknown image encoder"):
        CLIP(small_cfg(vision={"encoder": "timm:not_a_model_xyz"}))


def test_encode_text_needs_tokenizer():
    with pytest.raises(RuntimeError, match="tokenizer"):
        CLIP(small_cfg()).encode_text(["a red circle"])


def test_conv_stem_keeps_the_token_grid():
    x = torch.randn(2, 3, 32, 32)
    patch = VisionTransformer(32, 8, 32, 1, 2, stem="patch")
    conv = VisionTransformer(32, 8, 32, 1, 2, stem="conv")
    assert patch.forward_features(x).shape == conv.forward_features(x).shape == (2, 17, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTransformer(30, 6, 32, 1, 2, stem="conv")


def test_text_init_follows_clip():
    text = TextTransformer(vocab_size=30, context_length=8, width=64, depth=4, heads=2)
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in text.blocks])
    proj = torch.cat([b.attn.proj.weight.flatten() for b in text.blocks])
    assert abs(qkv.std().item() - 64**-0.5) < 0.01
    assert abs(proj.std().item() - 64**-0.5 * 8**-0.5) < 0.005


def test_text_tower_skips_padding_columns_without_changing_results():
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=30, context_length=16, width=16, depth=2, heads=2, eot_id=2).eval()
    tokens = torch.tensor([[1, 7, 8, 2] + [0] * 12, [1, 5, 6, 9, 4, 2] + [0] * 10])
    x = text.forward_features(tokens)  # the full context, no trimming
    expected = torch.stack([x[0, 3], x[1, 5]])
    assert torch.allclose(text(tokens), expected, atol=1e-5)

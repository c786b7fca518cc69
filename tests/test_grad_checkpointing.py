"""Gradient checkpointing changes memory, never the numbers: same loss, same gradients, and only while training."""

import pytest
import torch
from helpers import tiny_clip

from clipsnail.models.clip import CLIP
from clipsnail.train.losses import clip_loss


def loss_and_grads(model: CLIP, images, tokens, checkpointing: bool):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout / drop-path masks in both runs
    loss = clip_loss(*model(images, tokens))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch(image_size: int = 16):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, image_size, image_size, generator=g)
    tokens = torch.randint(3, 50, (4, 12), generator=g)
    tokens[:, 0], tokens[torch.arange(4), torch.tensor([5, 8, 11, 3])] = 1, 2  # <sot> ... <eot> at varied places
    return images, tokens


@pytest.mark.parametrize("kw", [{}, {"vision": {"drop_path_rate": 0.2}, "text": {"dropout": 0.1},
                                       "activation": "quick_gelu"}])
def test_same_loss_and_gradients_with_checkpointing(kw):
    model = tiny_clip(**kw).train()
    images, tokens = batch()
    loss0, grads0 = loss_and_grads(model, images, tokens, False)
    loss1, grads1 = loss_and_grads(model, images, tokens, True)
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert grads0.keys() == grads1.keys() == {n for n, _ in model.named_parameters()}
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-6), name


def test_same_gradients_with_a_lemevit_tower():
    model = tiny_clip(vision={"encoder": "lemevit_tiny", "image_size": 32}).train()
    images, tokens = batch(32)
    loss0, grads0 = loss_and_grads(model, images, tokens, False)
    loss1, grads1 = loss_and_grads(model, images, tokens, True)
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-6), name


def test_checkpointing_only_while_training(monkeypatch):
    import clipsnail.models.text as text_module
    import clipsnail.models.vit as vit_module

    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting)
    monkeypatch.setattr(text_module, "checkpoint", counting)
    model = tiny_clip()
    model.set_grad_checkpointing(True)
    assert model.visual.grad_checkpointing and model.text.grad_checkpointing
    images, tokens = batch()
    model.eval()
    clip_loss(*model(images, tokens)).backward()  # gradients, but eval mode: no recomputation
    assert calls == []
    model.train()
    clip_loss(*model(images, tokens)).backward()
    assert calls == ["TransformerBlock"] * 4  # 2 image + 2 text blocks
    model.set_grad_checkpointing(False)
    calls.clear()
    clip_loss(*model(images, tokens)).backward()
    assert calls == [] and not model.visual.grad_checkpointing and not model.text.grad_checkpointing


def test_same_gradients_with_a_timm_image_tower_and_a_pretrained_text_tower():
    """timm's own `set_grad_checkpointing` and the Hugging Face tower's gradient checkpointing, through CLIP's."""
    pytest.importorskip("transformers")
    model = tiny_clip(vision={"encoder": "timm:resnet10t", "image_size": 32},
                      text={"encoder": "hf:all-minilm-l6-v2"}).train()
    images, tokens = batch(32)
    loss0, grads0 = loss_and_grads(model, images, tokens, False)
    loss1, grads1 = loss_and_grads(model, images, tokens, True)
    assert torch.allclose(loss0, loss1, atol=1e-5)
    assert grads0.keys() == grads1.keys() and any(n.startswith("text.") for n in grads0)
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-5), name

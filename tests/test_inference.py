"""Models from `clipsnail.load` are for inference: what they return holds no autograd graph (a loop keeping the
embeddings of a folder would otherwise keep every graph with them), and `requires_grad_()` makes them trainable."""

from __future__ import annotations

import torch
from helpers import noise_image

import clipsnail


def test_loaded_clip_returns_plain_tensors(clip_run, tmp_path):
    model = clipsnail.load(clip_run)
    assert not any(p.requires_grad for p in model.parameters())
    photo = tmp_path / "p.png"
    noise_image(photo, 0)
    for out in (model.encode_image([photo]), model.encode_text(["a red circle"]),
                model(torch.zeros(1, 3, model.image_size, model.image_size), model.tokenizer(["x"]))[0]):
        assert out.grad_fn is None and not out.requires_grad

    model.requires_grad_()  # trainable again, on request
    assert model.encode_text(["a red circle"]).grad_fn is not None

"""Training losses. CLIP's symmetric InfoNCE (with a multi-positive variant for batches that hold several
captions of one image, or the same caption for several images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over the [B, B] similarity matrix.

    Features must already be L2-normalised and `logit_scale` is exp(t), as in the CLIP paper and open_clip's
    ClipLoss. With `positives=None` the targets are the diagonal. `positives` is a boolean [B, B] matrix
    (True on the diagonal) marking every pair that truly matches: each row's target is then spread uniformly
    over its positives, so a duplicate is not punished as a negative (seed 000's motivation for soft targets,
    done without its fixed temperature and unnormalised similarities).
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    if positives is None:
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
    targets = positives.to(logits_per_image.dtype)
    image_to_text = _soft_cross_entropy(logits_per_image, targets / targets.sum(dim=1, keepdim=True))
    text_to_image = _soft_cross_entropy(logits_per_image.T, targets.T / targets.T.sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def positives_from_ids(*ids: torch.Tensor) -> torch.Tensor:
    """[B, B] matrix: pair (i, j) is positive when any of the id vectors agrees at i and j (e.g. image ids,
    caption-text ids)."""
    mask = None
    for v in ids:
        same = v[:, None] == v[None, :]
        mask = same if mask is None else mask | same
    return mask

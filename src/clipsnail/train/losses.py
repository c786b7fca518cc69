"""Training losses. CLIP's symmetric InfoNCE (with a multi-positive variant for batches that hold several
captions of one image, or the same caption for several images), SigLIP's pairwise sigmoid loss, and cross-entropy
against soft targets (label smoothing, Mixup/CutMix)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over the similarity matrix.

    Features must already be L2-normalised and `logit_scale` is exp(t), as in the CLIP paper and open_clip's
    ClipLoss. With `positives=None` the targets are the diagonal. `positives` is a boolean matrix (True on the
    diagonal) marking every pair that truly matches: each row's target is then spread uniformly over its
    positives, so a duplicate is not punished as a negative (the similarities stay cosines scaled by the
    learned temperature, not raw dot products at a fixed one).

    Rows and columns may differ (open_clip's `local_loss`): the rows are this process's samples, which sit at
    `offset` in the global batch, and the columns are `all_*_features`, the whole batch gathered from every
    process; `positives` is then [rows, columns]. It must be symmetric in the global sense (positives_from_ids
    is), since the same rows serve both directions.
    """
    if all_image_features is None and all_text_features is None:  # one square matrix serves both directions
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_features @ all_text_features.T
        logits_per_text = logit_scale * text_features @ all_image_features.T
    if positives is None:
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + offset
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    targets = positives.to(logits_per_image.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return (soft_target_cross_entropy(logits_per_image, targets)
            + soft_target_cross_entropy(logits_per_text, targets)) / 2


def distributed_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    ids: Sequence[torch.Tensor] = (),
    local_loss: bool = False,
) -> torch.Tensor:
    """CLIP's loss over the batch of every process, as open_clip computes it under DDP.

    Features are all-gathered with gradients, so every sample is contrasted with the whole global batch, and the
    gradients equal those of one process holding that batch (after DDP averages them). `ids` (image ids, caption
    ids...) mark positives via `positives_from_ids` (none: the diagonal). `local_loss`: each process computes
    only its own rows against all columns, [b, B] instead of [B, B]: less memory and compute, same gradients.
    Alone in a single process this is just `clip_loss`.
    """
    from clipsnail.core import distributed as dist

    all_image, all_text = dist.gather_with_grad(image_features), dist.gather_with_grad(text_features)
    all_ids = [dist.gather_no_grad(v) for v in ids]
    if not local_loss or not dist.is_distributed():
        return clip_loss(all_image, all_text, logit_scale, positives_from_ids(*all_ids) if all_ids else None)
    n = image_features.shape[0]
    rows = slice(dist.rank() * n, (dist.rank() + 1) * n)
    return clip_loss(image_features, text_features, logit_scale,
                     positives_from_ids(*all_ids, rows=rows) if all_ids else None,
                     all_image_features=all_image, all_text_features=all_text, offset=rows.start)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP's sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023).

    Every image-text pair is its own binary problem, labelled +1 when the pair matches and -1 otherwise:
    -sum log sigmoid(label * (logit_scale * image @ text.T + logit_bias)), divided by the number of images
    (rows), as open_clip's SigLipLoss normalises it. No softmax couples a row, so no normalisation over the batch
    is needed; the learned bias offsets the heavy imbalance of negatives at the start (the paper initialises it
    at -10, with t = log 10).

    Features must already be L2-normalised; `logit_scale` is exp(t) (the model exponentiates its learned log
    temperature, as for `clip_loss` and in open_clip), `logit_bias` is used as it is. With `positives=None` the
    positives are the diagonal, shifted right by `offset` when the rows are one process's share of the columns
    (they sit at `offset` in the global batch). `positives` is a boolean [rows, columns] matrix: every True pair
    gets the +1 label, so several captions of one image in a batch are all pulled towards it; because the pairs
    are independent, this is the loss itself applied to the true labels, with no re-weighting to choose (unlike
    the softmax targets of `clip_loss`).
    """
    logits = logit_scale * image_features @ text_features.T + logit_bias
    if positives is None:
        rows = torch.arange(logits.shape[0], device=logits.device) + offset
        positives = rows[:, None] == torch.arange(logits.shape[1], device=logits.device)[None, :]
    labels = 2 * positives.to(logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def distributed_siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    ids: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """SigLIP's loss under DDP: this process's images against the texts of every process.

    Only the texts are all-gathered (with gradients), so each process computes a [b, N*b] block of the global
    [B, B] logits (B = N*b, N processes with b samples each, the same b on every rank), and the loss is that
    block's sum divided by b. This is the value open_clip's SigLipLoss returns on each rank: by default it passes
    the text features from rank to rank (the paper's chunked implementation) rather than gathering them (its
    'gather' option), and adds the loss of every block, each divided by the local batch size.

    Why the gradients are those of one process holding the whole batch: with L_r this rank's loss, the
    single-process loss on the whole batch is L = sum of all B*B pair terms / B = (1/N) * sum_r L_r. The gather's
    backward sums, into each rank's own text features, the gradients of every rank's loss, so each rank's
    parameters receive d(sum_r L_r)/d(theta) along its own samples' paths; DDP sums those over ranks and divides by
    N, giving dL/d(theta). The logit scale and bias, replicated on every rank, get dL_r/d(scale) locally and DDP's
    average is again dL/d(scale). The mean over ranks of the returned values (what the engine logs) is L.

    `ids` (image ids, caption ids...) mark positives via `positives_from_ids` over the global batch, across ranks
    too; none: the diagonal, at this rank's offset. (open_clip has no ids: pairs from other ranks are always
    negatives there.) Alone in a single process this is `siglip_loss`.
    """
    from clipsnail.core import distributed as dist

    all_text = dist.gather_with_grad(text_features)
    all_ids = [dist.gather_no_grad(v) for v in ids]
    n = image_features.shape[0]
    rows = slice(dist.rank() * n, (dist.rank() + 1) * n)
    return siglip_loss(image_features, all_text, logit_scale, logit_bias,
                       positives_from_ids(*all_ids, rows=rows) if all_ids else None, offset=rows.start)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets[c] * log softmax(logits)[c]: cross-entropy when each row of `targets`
    is a distribution over the classes rather than one label (timm's SoftTargetCrossEntropy)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def positives_from_ids(*ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """[B, B] matrix: pair (i, j) is positive when any of the id vectors agrees at i and j (e.g. image ids,
    caption-text ids). `rows`: only those rows ([rows, B]), for a process's own samples under local_loss."""
    mask = None
    for v in ids:
        same = (v if rows is None else v[rows])[:, None] == v[None, :]
        mask = same if mask is None else mask | same
    return mask

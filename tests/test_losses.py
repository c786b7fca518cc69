import math

import pytest
import torch
import torch.nn.functional as F

from clipsnail.train.losses import clip_loss, positives_from_ids, soft_target_cross_entropy


def features(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_equals_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = features()
    scale = torch.tensor(1 / 0.07)
    ours = clip_loss(image, text, scale)
    theirs = open_clip_loss.ClipLoss()(image, text, scale)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_equals_paper_pseudocode():
    image, text = features(n=5)
    t = math.log(1 / 0.07)
    logits = image @ text.T * math.exp(t)
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(clip_loss(image, text, torch.tensor(t).exp()), expected, atol=1e-6)


def test_multi_positive_reduces_to_plain_when_all_distinct():
    image, text = features()
    scale = torch.tensor(20.0)
    positives = positives_from_ids(torch.arange(8))
    assert torch.allclose(clip_loss(image, text, scale, positives), clip_loss(image, text, scale), atol=1e-6)


def test_multi_positive_does_not_punish_duplicates():
    # A batch holding image 0 twice, with two different captions that both fit it equally well. The plain
    # loss pulls each copy towards "its" caption and away from the other one (non-zero gradient); with
    # multi-positive targets this model is already a stationary point.
    image = torch.eye(4)[[0, 0, 1, 2]].requires_grad_(True)
    offset = torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, -1], [0] * 4, [0] * 4])
    text = F.normalize(torch.eye(4)[[0, 0, 1, 2]] + 0.3 * offset, dim=-1)
    scale = torch.tensor(100.0)
    (plain_grad,) = torch.autograd.grad(clip_loss(image, text, scale), image)
    positives = positives_from_ids(torch.tensor([0, 0, 1, 2]))
    (multi_grad,) = torch.autograd.grad(clip_loss(image, text, scale, positives), image)
    assert plain_grad.abs().max() > 1.0
    assert multi_grad.abs().max() < 1e-6


def test_positives_union_of_ids():
    m = positives_from_ids(torch.tensor([0, 0, 1]), torch.tensor([5, 6, 6]))
    assert m.tolist() == [[True, True, False], [True, True, True], [False, True, True]]


def test_gradient_reaches_temperature():
    image, text = features()
    t = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    clip_loss(image, text, t.exp()).backward()
    assert t.grad is not None and t.grad != 0


def test_soft_target_cross_entropy_equals_timms():
    from timm.loss import SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 10, generator=g) * 3
    targets = torch.softmax(torch.randn(6, 10, generator=g), dim=-1)  # e.g. Mixup of two smoothed labels
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), SoftTargetCrossEntropy()(logits, targets))
    labels = torch.randint(0, 10, (6,), generator=g)  # one-hot targets: plain cross-entropy
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(labels, 10).float()),
                               F.cross_entropy(logits, labels))

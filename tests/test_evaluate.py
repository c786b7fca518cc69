import pytest
import torch

from clipsnail.inference.evaluate import classification_metrics, retrieval_metrics, semantic_retrieval_metrics


def test_retrieval_metrics_multi_caption_definitions():
    # 3 images (one-hot), 5 captions: image 0 has captions 0,1; image 1 has 2,3; image 2 has 4.
    images = torch.eye(3)
    texts = torch.tensor([
        [1.0, 0.0, 0.0],  # -> image 0, correct (rank 1)
        [0.0, 1.0, 0.0],  # -> image 1 first, correct image 0 ranks... tie at 0 with image 2 -> rank 2
        [0.0, 1.0, 0.0],  # correct
        [0.0, 0.0, 1.0],  # wrong: own image 1 scores 0, image 2 scores 1 -> rank 2
        [0.0, 0.0, 1.0],  # correct
    ])
    m = retrieval_metrics(images, texts, [0, 0, 1, 1, 2], ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@2"] == 1.0
    # image -> text: image 0's best caption (0) is top-1; image 1's best caption (2) ties with 1 -> rank 1;
    # image 2: captions 3 and 4 tie at 1.0, caption 4 is its own -> rank 1.
    assert m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_mean_rank"] == pytest.approx((1 + 2 + 1 + 2 + 1) / 5)
    assert m["image_retrieval_median_rank"] == 1


def test_retrieval_metrics_random_embeddings_near_chance():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(400, 32, generator=g), dim=-1)
    m = retrieval_metrics(images, texts, torch.arange(400) // 2, ks=(10,))
    assert 0.0 < m["image_retrieval_recall@10"] < 0.15


def test_semantic_recall_counts_any_satisfying_image():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0]])
    ok = {(1, "q"): False, (0, "q"): True, (2, "q"): False}
    m = semantic_retrieval_metrics(images, texts, ["q"], lambda i, c: ok[(i, c)], ks=(1, 2, 3))
    assert m["semantic_image_retrieval_recall@1"] == 0.0
    assert m["semantic_image_retrieval_recall@3"] == 1.0


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 2, 1], [1, 0, 2]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels)
    assert m["acc1"] == 0.75 and m["acc5"] == 1.0
    assert abs(m["mean_per_class_recall"] - (1 + 1 + 0.5) / 3) < 1e-6


def test_zero_shot_probabilities_use_the_models_learned_scale(clip_run, shapes_dir, capsys):
    """A briefly trained model has learned exp(logit_scale) of about 14: its probabilities come from that scale,
    not from CLIP's fixed 100, which turned small cosine gaps into p = 1.0 for wrong answers."""
    import json
    import math

    import clipsnail
    from clipsnail.cli import main
    from clipsnail.inference.evaluate import probability_scale

    model = clipsnail.load(clip_run)
    scale = probability_scale(model)
    assert scale == pytest.approx(math.exp(float(model.logit_scale)), rel=1e-6) and scale < 50
    image = sorted((shapes_dir / "images").iterdir())[0]
    classes = ["red circle", "blue square", "green triangle"]
    capsys.readouterr()
    assert main(["zeroshot", "--model", str(clip_run), "--classes", ",".join(classes), str(image)]) == 0
    probs = json.loads(capsys.readouterr().out)[0]["probs"]
    assert max(probs.values()) < 0.999
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)

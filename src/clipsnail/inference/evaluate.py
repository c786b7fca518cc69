"""Evaluation: retrieval recall@k (clip_benchmark definitions), zero-shot classification, encoding helpers.

Retrieval with several captions per image:
- image_retrieval_recall@k (text -> image): per caption, is its image among the top k images; mean over captions.
- text_retrieval_recall@k (image -> text): per image, is ANY of its captions among the top k captions; mean over
  images.
Ranks count only strictly better candidates, so ties are resolved in the model's favour (as topk does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipsnail.core.config import ENCODE_BATCH
from clipsnail.core.errors import DataError
from clipsnail.data.datasets import ImageListDataset, collate_indexed_images
from clipsnail.inference.templates import default_templates, read_templates  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def _model_batches(loader, batch_size: int):
    """The (indices, images, facts) chunks of `loader` (facts: a list, or None where the loader gives none),
    unreadable images left out, regrouped into batches of batch_size (the last one smaller)."""
    indices, images, facts, count = [], [], [], 0
    for idx, chunk, *chunk_facts in loader:
        if chunk is None:
            continue
        indices.append(idx)
        images.append(chunk)
        facts.extend(chunk_facts[0] if chunk_facts else [None] * len(idx))
        count += len(idx)
        while count >= batch_size:
            all_idx, all_images = torch.cat(indices), torch.cat(images)
            yield all_idx[:batch_size], all_images[:batch_size], facts[:batch_size]
            indices, images, facts = [all_idx[batch_size:]], [all_images[batch_size:]], facts[batch_size:]
            count -= batch_size
    if count:
        yield torch.cat(indices), torch.cat(images), facts


@torch.no_grad()
def encode_image_paths(model, paths: Sequence[str | Path], batch_size: int = ENCODE_BATCH, num_workers: int = 0,
                       progress: bool = True, strict: bool = False, encode: Callable | None = None,
                       dtype: torch.dtype = torch.float32, min_side: int | None = None,
                       unit: str = "image", with_facts: bool = False):
    """-> (embeddings [N, D] on CPU, readable [N] bool). Rows of unreadable images are zero.
    with_facts: -> (embeddings, readable, [N] the PhotoFacts of each image, None where unreadable), the facts read
    from the same decode (`ImageListDataset`).
    encode: what to compute from a batch of preprocessed images (default `model.encode_image`), e.g. a frozen
    tower's tokens [B, M, C], which then come back as [N, M, C] in `dtype`.
    num_workers: processes that decode and preprocess images while this one encodes (0: all in this process).
    min_side: decode each image only to about this shorter side (`load_image`; e.g. the model's input size, which
    its preprocess resizes to anyway); None: full size. unit: what the progress bar counts per second."""
    model.eval()
    encode = encode or model.encode_image
    dataset = ImageListDataset(paths, model.preprocess, strict=strict, min_side=min_side, with_facts=with_facts)
    # A DataLoader gives each worker whole batches: with batches of batch_size, a folder of fewer than
    # num_workers x batch_size images would leave workers idle. Workers make small chunks instead, regrouped here.
    chunk = batch_size if num_workers == 0 else min(batch_size, 8)
    loader = DataLoader(dataset, batch_size=chunk, num_workers=num_workers, collate_fn=collate_indexed_images)
    out, readable = None, torch.zeros(len(paths), dtype=torch.bool)
    facts = [None] * len(paths)
    with tqdm(total=len(paths), desc="encode images", disable=not progress, unit=unit) as bar:
        for idx, images, batch_facts in _model_batches(loader, batch_size):
            emb = encode(images).to(torch.device("cpu"), dtype)
            if out is None:
                out = torch.zeros(len(paths), *emb.shape[1:], dtype=dtype)
            out[idx], readable[idx] = emb, True
            for i, f in zip(idx.tolist(), batch_facts):
                facts[i] = f
            bar.update(int(idx[-1]) + 1 - bar.n)  # images come in order: every one up to here is done or unreadable
        bar.update(len(paths) - bar.n)
    if out is None:
        out = torch.zeros(len(paths), model.embed_dim)
    if (~readable).any():
        log.warning("%d of %d images could not be read and were skipped", int((~readable).sum()), len(paths))
    return (out, readable, facts) if with_facts else (out, readable)


def encode_every_image(model, images_dir: str | Path, names: Sequence[str], progress: bool = True,
                       **kwargs) -> torch.Tensor:
    """`encode_image_paths` of images_dir/name for each name, when every one must be readable (a frozen
    encoder's features as training targets or inputs); DataError naming the first unreadable image."""
    features, readable = encode_image_paths(model, [Path(images_dir) / n for n in names], progress=progress,
                                            **kwargs)
    if not readable.all():
        bad = names[int((~readable).nonzero()[0])]
        raise DataError(f"{Path(images_dir) / bad}: unreadable image ({int((~readable).sum())} in all); "
                        "training on a frozen encoder's features needs every image")
    return features


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    model.eval()
    chunks = [model.encode_text(list(texts[i: i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.embed_dim)


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_to_image: torch.Tensor,
                    chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rank of the right image for each caption [T], best rank of any own caption for each image [N]), 1-based."""
    caption_to_image = torch.as_tensor(caption_to_image)
    n_images = image_emb.shape[0]
    text_ranks = []
    best_positive = torch.full((n_images,), -float("inf"))
    for s in range(0, text_emb.shape[0], chunk):
        sim = text_emb[s: s + chunk] @ image_emb.T  # [t, N]
        own = caption_to_image[s: s + chunk]
        correct = sim.gather(1, own[:, None])
        text_ranks.append((sim > correct).sum(dim=1) + 1)
        best_positive.scatter_reduce_(0, own, correct[:, 0], reduce="amax")
    image_ranks = torch.zeros(n_images, dtype=torch.long)
    for s in range(0, text_emb.shape[0], chunk):
        sim = text_emb[s: s + chunk] @ image_emb.T
        image_ranks += (sim > best_positive[None, :]).sum(dim=0)  # texts beating the best own caption: negatives
    return torch.cat(text_ranks), image_ranks + 1


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_to_image,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    text_ranks, image_ranks = retrieval_ranks(image_emb, text_emb, torch.as_tensor(caption_to_image))
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (text_ranks <= k).float().mean().item()
    for k in ks:
        metrics[f"text_retrieval_recall@{k}"] = (image_ranks <= k).float().mean().item()
    metrics["image_retrieval_mean_rank"] = text_ranks.float().mean().item()
    metrics["image_retrieval_median_rank"] = text_ranks.float().median().item()
    metrics["text_retrieval_mean_rank"] = image_ranks.float().mean().item()
    metrics["text_retrieval_median_rank"] = image_ranks.float().median().item()
    return metrics


def semantic_retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                               judge: Callable[[int, str], bool], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """semantic_image_retrieval_recall@k: a hit when any of the top-k images satisfies the caption per `judge`
    (image index, caption) -> bool, e.g. the shapes scene checker. Only the top max(ks) images are judged."""
    top = (text_emb @ image_emb.T).topk(min(max(ks), image_emb.shape[0]), dim=1).indices
    first_hit = []
    for t, caption in enumerate(captions):
        hit = next((r for r, i in enumerate(top[t].tolist()) if judge(i, caption)), None)
        first_hit.append(float("inf") if hit is None else hit + 1)
    first_hit = torch.tensor(first_hit)
    return {f"semantic_image_retrieval_recall@{k}": (first_hit <= k).float().mean().item() for k in ks}


# ----------------------------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def zero_shot_weights(model, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """CLIP's prompt ensemble: per class, mean of the normalised template embeddings, normalised again."""
    weights = []
    for name in classnames:
        emb = encode_texts(model, [t.format(name) for t in templates])
        weights.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


def zero_shot_logits(image_emb: torch.Tensor, class_weights: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Scaled cosines [images, classes]. The default is CLIP's fixed zero-shot scale (for accuracy, where only the
    order counts); probabilities should use the model's own learned scale (`probability_scale`)."""
    return scale * image_emb @ class_weights.T


def probability_scale(model) -> float:
    """exp(logit_scale): the temperature training calibrated the model's softmax with. A model trained for a few
    steps has learned about 14, and a fixed 100 would turn its small cosine gaps into probabilities near 1.0 for
    wrong answers (a converted OpenAI or open_clip model brings its own, 100). A model without one keeps 100."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0


def zero_shot_probabilities(model, image_emb: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """[images, classes] probabilities as the model's training calibrated them: a softmax over the classes at its
    learned temperature (CLIP), or, for a model with a learned bias (SigLIP), each class's own sigmoid, as SigLIP
    scores every pair on its own (they need not sum to 1: an image may show none of the classes, or two)."""
    logits = zero_shot_logits(image_emb, class_weights, probability_scale(model))
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor):
        return (logits + float(bias.detach())).sigmoid()
    return logits.softmax(dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, top: int = 5) -> dict[str, float]:
    """acc1, acc{top} (top capped at the number of classes) and mean per-class recall."""
    labels = torch.as_tensor(labels)
    k = min(top, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct1 = topk[:, 0] == labels
    recalls = [correct1[labels == c].float().mean() for c in labels.unique()]
    return {
        "acc1": correct1.float().mean().item(),
        f"acc{top}": (topk == labels[:, None]).any(dim=1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def zero_shot_accuracy(image_emb: torch.Tensor, readable: torch.Tensor, labels, class_weights: torch.Tensor,
                       class_names: Sequence[str] | None = None) -> dict:
    """Zero-shot classification metrics over the readable images (CLIP's fixed scale: only the order counts), with
    how many images and classes they are over; with class_names, also "per_class": {name: {"acc1", "images",
    "taken_for"}} (its images' top-1 accuracy, their number, and how often the class was the answer wrongly)."""
    logits = zero_shot_logits(image_emb[readable], class_weights)
    truth = torch.as_tensor(labels)[readable]
    metrics = {**classification_metrics(logits, truth), "num_images": int(readable.sum()),
               "num_classes": class_weights.shape[0]}
    if class_names is not None:
        answer = logits.argmax(dim=1)
        metrics["per_class"] = {
            name: {"acc1": (answer[truth == c] == c).float().mean().item() if (truth == c).any() else None,
                   "images": int((truth == c).sum()), "taken_for": int(((answer == c) & (truth != c)).sum())}
            for c, name in enumerate(class_names)}
    return metrics


def classification_report(logits: torch.Tensor, labels: torch.Tensor,
                          class_names: Sequence[str]) -> tuple[dict, dict, str]:
    """The classification metrics (acc1, acc5, macro precision/recall/F1), and from scikit-learn the
    per-class precision/recall/F1/support, as (metrics, per_class, printable report)."""
    from sklearn.metrics import classification_report as sk_report
    from sklearn.metrics import precision_recall_fscore_support

    pred = logits.argmax(1).numpy()
    y = torch.as_tensor(labels).numpy()
    ids = list(range(len(class_names)))
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=ids, average="macro", zero_division=0)
    top = classification_metrics(logits, torch.as_tensor(labels), top=5)
    metrics = {"acc1": top["acc1"], "acc5": top["acc5"], "macro_precision": float(precision),
               "macro_recall": float(recall), "macro_f1": float(f1), "num_images": len(y),
               "num_classes": len(class_names)}
    per_class = sk_report(y, pred, labels=ids, target_names=list(class_names), zero_division=0, output_dict=True)
    per_class = {name: {k: round(float(v), 4) for k, v in per_class[name].items()} for name in class_names}
    text = sk_report(y, pred, labels=ids, target_names=list(class_names), zero_division=0, digits=4)
    return metrics, per_class, text


def evaluate_caption_split(model, captions_file, images_dir, split: str = "test", split_file=None,
                           format: str = "auto", batch_size: int = ENCODE_BATCH, progress: bool = True,
                           strict: bool = False, follow_links: bool = False) -> tuple[dict, list[str]]:
    """Retrieval metrics of `model` on one split of a caption corpus -> (metrics, image names evaluated).

    Unreadable images are dropped together with their captions, and counted. On generated shapes data
    (scenes.json beside the images) the semantic recall is added.
    """
    from clipsnail.core.errors import DataError
    from clipsnail.data.caption_corpora import load_split
    from clipsnail.data.shapes import scene_judge

    # The same checks as training: the folder exists, every image of the split is a file under it.
    names, captions, c2i = load_split(captions_file, images_dir, split, format, split_file,
                                      follow_links=follow_links)
    images_dir = Path(images_dir)
    image_emb, readable = encode_image_paths(model, [images_dir / n for n in names], batch_size=batch_size,
                                             progress=progress, strict=strict)
    keep = readable.nonzero().squeeze(1)
    if len(keep) == 0:
        raise DataError(f"{images_dir}: none of the {len(names)} images of split {split!r} could be read")
    remap = torch.full((len(names),), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    pairs = [(c, remap[i].item()) for c, i in zip(captions, c2i) if readable[i]]
    kept_names = [names[i] for i in keep.tolist()]
    text_emb = encode_texts(model, [c for c, _ in pairs])
    metrics = retrieval_metrics(image_emb[keep], text_emb, [i for _, i in pairs])
    judge = scene_judge(images_dir, kept_names)
    if judge is not None:
        metrics.update(semantic_retrieval_metrics(image_emb[keep], text_emb, [c for c, _ in pairs], judge))
    metrics.update({"num_images": len(keep), "num_captions": len(pairs), "skipped_images": len(names) - len(keep),
                    "split": split})
    return metrics, kept_names

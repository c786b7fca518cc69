"""Image captioning at inference: a trained caption run (`Captioner`: image -> caption by beam search, optionally
reranked by a CLIP model), the caption metrics, and the nearest-neighbour caption baseline.

Metrics are the COCO caption evaluation's own BLEU-4 (Papineni et al. 2002: corpus-level, brevity penalty from
the reference length closest to each candidate) and CIDEr-D (Vedantam et al. 2015: tf-idf n-gram cosine with
document frequencies from the evaluated references, clipped counts, Gaussian length penalty, x10), computed by
pycocoevalcap. Its PTB tokenizer needs Java, so captions are tokenised here in Python the way it does for
ordinary English captions: lower case, punctuation removed, "'s" split off.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from clipsnail.core.errors import DataError
from clipsnail.data.caption_corpora import captions_by_image, load_caption_split
from clipsnail.data.images import as_pil_images
from clipsnail.data.shapes import Scene, names_colour_and_shape, parse_caption, scene_matches, scenes_for
from clipsnail.data.tokenizers import UNK, TextTokenizer
from clipsnail.inference.evaluate import encode_every_image, encode_image_paths
from clipsnail.models.caption_decoder import CaptionDecoder

CAPTION_EXTRA = "pip install 'clipsnail[caption]'"
_PUNCTUATION = re.compile(r"[.,!?;:\"()\[\]{}`]|(?<!\w)-+|-+(?!\w)|''|(?<!\w)'|'(?!\w)")


def metric_tokens(caption: str) -> str:
    """A caption as the COCO evaluation compares it: lower-case words separated by single spaces."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = re.sub(r"(\w)'s\b", r"\1 's", text)
    return " ".join(text.split())


def caption_metrics(references: Sequence[Sequence[str]], candidates: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of one candidate caption per image against that image's reference captions."""
    bleu, cider, _ = _coco_scores(references, candidates)
    return {"bleu4": bleu, "cider": cider}


def _coco_scores(references: Sequence[Sequence[str]], candidates: Sequence[str]) -> tuple[float, float, list[float]]:
    """(corpus BLEU-4, corpus CIDEr-D, CIDEr-D of each candidate), by pycocoevalcap."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} images")
    if not candidates or any(len(r) == 0 for r in references):
        raise ValueError("every image needs at least one reference caption")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError(f"caption metrics need pycocoevalcap: {CAPTION_EXTRA}") from e
    refs = {i: [metric_tokens(r) for r in rs] for i, rs in enumerate(references)}
    hyps = {i: [metric_tokens(c) or "<empty>"] for i, c in enumerate(candidates)}  # an empty string breaks BLEU
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(refs, hyps)
    cider, each = Cider().compute_score(refs, hyps)
    return float(bleu[3]), float(cider), [float(x) for x in each]


def generated_scenes(images_dir: str | Path, names: Sequence[str]) -> list[Scene] | None:
    """The generated scene of every image in `names`, or None unless all are generated shapes data."""
    scenes = scenes_for(images_dir, names)
    return scenes if scenes is not None and None not in scenes else None


def shapes_caption_metrics(scenes: Sequence[Scene], candidates: Sequence[str]) -> dict[str, float]:
    """On generated shapes data: how often a caption names a colour and shape that are in the image together
    (`names_colour_and_shape`), and how often everything it states is true of the scene (`scene_matches`)."""
    named = true = 0
    for scene, caption in zip(scenes, candidates, strict=True):
        named += names_colour_and_shape(scene, caption)
        try:
            true += scene_matches(scene, parse_caption(caption))
        except ValueError:  # words the shapes grammar does not know: not a true caption of the scene
            pass
    n = max(len(candidates), 1)
    return {"colour_shape_accuracy": named / n, "caption_true": true / n}


# ----------------------------------------------------------------------------------------------- decoding


@dataclass
class DecodeConfig:
    beam_size: int = 3  # 1: greedy
    max_length: int = 0  # tokens, <sot> included; 0: the model's context
    length_penalty: float = 0.6  # GNMT's alpha; 0: raw log-probability, which favours short captions


@dataclass
class Caption:
    text: str
    score: float  # the beam score (length-penalised log-probability)
    clip_score: float | None = None  # cosine similarity to the image under the reranking CLIP, when reranked
    # the other beam candidates, best first by the order that chose `text`
    alternatives: list[Caption] = field(default_factory=list)


def decode_captions(decoder: CaptionDecoder, tokenizer: TextTokenizer, image_tokens: torch.Tensor,
                    decode: DecodeConfig, batch_size: int = 64) -> list[list[tuple[str, float]]]:
    """Beam search over images' tokens -> for each image its beam candidates as (text, score), best first."""
    unk = tokenizer.hf.token_to_id(UNK)
    banned = (unk,) if unk is not None else ()
    out = []
    for i in range(0, len(image_tokens), batch_size):
        batch = image_tokens[i:i + batch_size].to(next(decoder.parameters()).device).float()
        beams = decoder.generate(batch, decode.beam_size, decode.max_length or None, decode.length_penalty, banned)
        out += [[(tokenizer.decode(ids).strip(), score) for ids, score in image_beams] for image_beams in beams]
    return out


@torch.no_grad()
def clip_rerank(clip, image, candidates: list[tuple[str, float]]) -> list[Caption]:
    """Beam candidates of one image ordered by CLIP's cosine similarity to the image, highest first."""
    texts = [t for t, _ in candidates]
    similarity = (clip.encode_image([image]).float() @ clip.encode_text(texts).float().T)[0].tolist()
    ranked = sorted(zip(texts, (s for _, s in candidates), similarity), key=lambda c: -c[2])
    return [Caption(text, score, clip_score) for text, score, clip_score in ranked]


class Captioner:
    """A trained caption run: images (PIL images or paths) -> captions.

    `encoder` is the frozen image tower the decoder was trained on (`encode_tokens`, `preprocess`); `rerank_clip`,
    when given to `caption`, reorders the beam candidates by CLIP score (set beam_size > 1)."""

    def __init__(self, decoder: CaptionDecoder, encoder: nn.Module, tokenizer: TextTokenizer, config):
        self.decoder, self.encoder, self.tokenizer = decoder, encoder, tokenizer
        self.config = config  # the run's CaptionConfig

    def eval(self):
        self.decoder.eval()
        self.encoder.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True):
        self.decoder.requires_grad_(requires_grad)
        self.encoder.requires_grad_(requires_grad)
        return self

    def to(self, device):
        self.decoder.to(device)
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def image_tokens(self, images: Sequence) -> torch.Tensor:
        """The frozen encoder's tokens [B, M, C] of PIL images or paths."""
        device = next(self.decoder.parameters()).device
        batch = torch.stack([self.encoder.preprocess(im) for im in as_pil_images(images)])
        return self.encoder.encode_tokens(batch.to(device))

    def caption(self, images: Sequence, beam_size: int | None = None, rerank_clip=None,
                length_penalty: float | None = None) -> list[Caption]:
        """One `Caption` per image (PIL images or paths), its other beam candidates in `alternatives`."""
        decode = DecodeConfig(**{**vars(self.config.decode),
                                 **({"beam_size": beam_size} if beam_size else {}),
                                 **({"length_penalty": length_penalty} if length_penalty is not None else {})})
        pil = as_pil_images(images)
        beams = decode_captions(self.decoder, self.tokenizer, self.image_tokens(pil), decode)
        results = []
        for image, candidates in zip(pil, beams):
            if rerank_clip is not None:
                ranked = clip_rerank(rerank_clip, image, candidates)
            else:
                ranked = [Caption(text, score) for text, score in candidates]
            results.append(Caption(ranked[0].text, ranked[0].score, ranked[0].clip_score, ranked[1:]))
        return results


# ----------------------------------------------------------------------------------------------- baseline


def nearest_neighbour_captions(train_features: torch.Tensor, train_captions: Sequence[Sequence[str]],
                               test_features: torch.Tensor, k: int = 5) -> list[str]:
    """The nearest-neighbour caption baseline of Devlin et al. 2015: for each test image, the captions of its k
    nearest training images (cosine of pooled features) are candidates, and the consensus caption, the one with
    the highest CIDEr-D against the other candidates, is returned."""
    if len(train_features) != len(train_captions) or not len(train_features):
        raise DataError("the baseline needs one caption list per training image")
    a = torch.nn.functional.normalize(test_features.float(), dim=-1)
    b = torch.nn.functional.normalize(train_features.float(), dim=-1)
    neighbours = (a @ b.T).topk(min(k, len(b)), dim=1).indices.tolist()
    out = []
    for row in neighbours:
        pool = [c for j in row for c in train_captions[j]]
        if len(pool) == 1:
            out.append(pool[0])
            continue
        _, _, agreement = _coco_scores([pool[:i] + pool[i + 1:] for i in range(len(pool))], pool)
        out.append(pool[max(range(len(pool)), key=agreement.__getitem__)])
    return out


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_captioner(captioner: Captioner, captions: str | Path, images: str | Path, split: str = "test",
                       format: str = "auto", split_file: str = "", beam_size: int | None = None, rerank_clip=None,
                       baseline: bool = False, max_images: int = 0, progress: bool = True,
                       follow_links: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Caption the images of one split and score them against their captions -> (metrics, one row per image).

    metrics: bleu4, cider, and on generated shapes data colour_shape_accuracy and caption_true; with `baseline`,
    the same for the nearest-neighbour captions of the run's training images (`baseline_bleu4`, ...)."""
    data = type(captioner.config.data)(captions=str(captions), images=str(images), format=format,
                                       split_file=split_file or "", follow_links=follow_links)
    names, texts, caption_to_image = load_caption_split(data, split)
    if max_images:
        names = names[:max_images]
    references = captions_by_image(texts, caption_to_image, len(names))
    paths = [Path(images) / n for n in names]
    results = []
    for i in tqdm(range(0, len(paths), 32), desc="caption", disable=not progress, unit="batch"):
        results += captioner.caption(paths[i:i + 32], beam_size=beam_size, rerank_clip=rerank_clip)
    candidates = [r.text for r in results]
    metrics = {"images": len(names), **caption_metrics(references, candidates)}
    scenes = generated_scenes(images, names)
    if scenes is not None:
        metrics.update(shapes_caption_metrics(scenes, candidates))
    rows = [{"image": n, "caption": r.text, "score": round(r.score, 4),
             **({"clip_score": round(r.clip_score, 4)} if r.clip_score is not None else {}), "references": refs}
            for n, r, refs in zip(names, results, references)]
    if baseline:
        guesses = nearest_neighbour_baseline(captioner, paths, progress)
        metrics.update({f"baseline_{k}": v for k, v in caption_metrics(references, guesses).items()})
        if scenes is not None:
            metrics.update({f"baseline_{k}": v for k, v in shapes_caption_metrics(scenes, guesses).items()})
        for row, guess in zip(rows, guesses):
            row["baseline"] = guess
    return metrics, rows


def nearest_neighbour_baseline(captioner: Captioner, paths: Sequence[Path], progress: bool = True) -> list[str]:
    """`nearest_neighbour_captions` of `paths` among the training images of the caption run, under the run's
    frozen encoder (pooled features)."""
    train = captioner.config.data
    names, texts, caption_to_image = load_caption_split(train, "train")
    per_image = captions_by_image(texts, caption_to_image, len(names))
    train_features = encode_every_image(captioner.encoder, train.images, names, progress)
    test_features, _ = encode_image_paths(captioner.encoder, paths, progress=progress)
    return nearest_neighbour_captions(train_features, per_image, test_features)

"""Seed 004's text-to-image system: a Transformer reads a prompt and predicts the feature vector that a frozen image
encoder computes for the matching image; "generation" looks the prediction up among known images.

The seed builds a character-level causal Transformer, takes the state of the last non-padding token and regresses
a ResNet-18 feature with MSE. Here the text tower is the one CLIP uses (`TextTransformer`: causal, char-level or
BPE tokens, pooled at <eot>, which is the last non-padding token) or mean-pooled over the prompt's tokens, the head
is linear, the loss is MSE or cosine, and the image encoder is a trained CLIP run or any timm model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from clipsnail.models.text import TextTransformer


@dataclasses.dataclass
class Text2FeatConfig:
    tokenizer: str = "char"  # "char" (the seed) or "bpe"
    vocab_size: int = 0  # BPE: the vocabulary to learn (0: 2048); then the tokenizer's actual size
    context_length: int = 64
    pad_id: int = 0
    eot_id: int = 2
    width: int = 256
    depth: int = 4
    heads: int = 4
    dropout: float = 0.1
    pool: str = "last"  # "last": the last non-padding token's state (the seed); "mean": mean over the prompt
    feature_dim: int = 0  # filled in from the image encoder
    loss: str = "mse"  # "mse" (the seed) or "cosine"
    distance: str = "euclidean"  # nearest known image by "euclidean" distance (the seed) or "cosine"


class TextToFeature(nn.Module):
    """tokens (B, L) -> predicted image features (B, feature_dim)."""

    def __init__(self, cfg: Text2FeatConfig):
        super().__init__()
        if cfg.pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {cfg.pool!r}")
        if cfg.loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {cfg.loss!r}")
        if cfg.distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {cfg.distance!r}")
        if cfg.vocab_size <= 0 or cfg.feature_dim <= 0:
            raise ValueError(f"vocab_size and feature_dim must be set, got {cfg.vocab_size} and {cfg.feature_dim}")
        self.cfg = cfg
        self.text = TextTransformer(cfg.vocab_size, cfg.context_length, cfg.width, cfg.depth, cfg.heads,
                                    eot_id=cfg.eot_id, dropout=cfg.dropout)
        self.head = nn.Linear(cfg.width, cfg.feature_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "last":
            return self.head(self.text(tokens))
        states = self.text.forward_features(tokens)
        keep = (tokens != self.cfg.pad_id).unsqueeze(-1).to(states.dtype)
        return self.head((states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1))

    def loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "mse":
            return F.mse_loss(predicted, target)
        return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Predicted features of prompts (needs `.tokenizer`, attached by `clipsnail.load`)."""
        return self(self.tokenizer(texts).to(self.head.weight.device))


def nearest(query: torch.Tensor, bank: torch.Tensor, k: int, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices), each (Q, k), of the k known features in `bank` (N, D) closest to each query (Q, D);
    smaller is closer. "cosine" distance is 1 - cosine similarity."""
    k = min(k, bank.shape[0])
    if distance == "cosine":
        d = 1 - F.normalize(query.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T
    elif distance == "euclidean":
        d = torch.cdist(query.float(), bank.float())
    else:
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    return d.topk(k, dim=1, largest=False)

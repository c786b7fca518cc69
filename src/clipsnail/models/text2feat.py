"""Text to image by retrieval: a Transformer reads a prompt and predicts the feature vector that a frozen image
encoder computes for the matching image; "generation" looks the prediction up among known images.

The defaults are the plain version of this system: character tokens, a causal Transformer whose state at the last
non-padding token is regressed onto the image feature with MSE, and the nearest known image by Euclidean distance.
The text tower is the one CLIP uses (`TextTransformer`: causal, char-level or BPE tokens, pooled at <eot>, which is
the last non-padding token) or mean-pooled over the prompt's tokens, the head is linear, the loss is MSE or cosine,
and the image encoder is a trained CLIP run or any timm model (e.g. ResNet-18).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from clipsnail.core.config import check_at_least, check_choice, check_heads, check_positive, check_probability
from clipsnail.core.errors import ConfigError
from clipsnail.models.text import TextTransformer


@dataclasses.dataclass
class Text2FeatConfig:
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int = 0  # BPE: the vocabulary to learn (0: 2048); then the tokenizer's actual size
    context_length: int = 64
    pad_id: int = 0
    eot_id: int = 2
    width: int = 256
    depth: int = 4
    heads: int = 4
    dropout: float = 0.1
    pool: str = "last"  # "last": the last non-padding token's state; "mean": mean over the prompt
    feature_dim: int = 0  # filled in from the image encoder
    loss: str = "mse"  # "mse" or "cosine"
    distance: str = "euclidean"  # nearest known image by "euclidean" distance or "cosine"


def check_config(cfg: Text2FeatConfig) -> None:
    """ConfigError naming the first invalid key of `cfg` (as `--set` spells it: model.width)."""
    check_choice(cfg, "tokenizer", ("char", "bpe"))
    check_choice(cfg, "pool", ("last", "mean"))
    check_choice(cfg, "loss", ("mse", "cosine"))
    check_choice(cfg, "distance", ("euclidean", "cosine"))
    if cfg.vocab_size <= 0 or cfg.feature_dim <= 0:
        raise ConfigError(f"model.vocab_size and model.feature_dim must be set (from the tokenizer and the image "
                          f"encoder), got {cfg.vocab_size} and {cfg.feature_dim}")
    check_positive(cfg, "context_length")
    check_heads(cfg, "width", "heads")
    check_at_least(cfg, 0, "depth")
    check_probability(cfg, "dropout")
    for name in ("pad_id", "eot_id"):
        if not 0 <= getattr(cfg, name) < cfg.vocab_size:
            raise ConfigError(f"model.{name}={getattr(cfg, name)} is not a token of the vocabulary "
                              f"(model.vocab_size={cfg.vocab_size})")


class TextToFeature(nn.Module):
    """tokens (B, L) -> predicted image features (B, feature_dim)."""

    def __init__(self, cfg: Text2FeatConfig):
        super().__init__()
        check_config(cfg)
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

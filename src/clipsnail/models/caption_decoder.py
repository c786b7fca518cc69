"""An image captioner: a small causal Transformer decoder that writes a caption while attending to the tokens of a
frozen image tower (the feature map of a CNN, or a ViT's patch tokens).

It is the captioning half of CoCa (Yu et al. 2022, in open_clip as `coca_*`): a text decoder whose blocks add
cross-attention to the image tokens, trained by teacher forcing with label-smoothed cross-entropy (CoCa: 0.1).
The image tokens pass through a LayerNorm and a linear map to the decoder's width, plus a learned position
embedding (a CNN's feature map has none of its own, and "above"/"left of" need one).
Decoding is beam search with the length penalty of Wu et al. 2016 (GNMT); beam size 1 is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipsnail.core.config import check_at_least, check_heads, check_positive, check_probability
from clipsnail.core.errors import ConfigError
from clipsnail.layers import DecoderBlock


@dataclass
class CaptionModelConfig:
    width: int = 256
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    label_smoothing: float = 0.1
    # Filled from the tokenizer and the image encoder when training starts:
    vocab_size: int = 0
    context_length: int = 32
    pad_id: int = 0
    sot_id: int = 1
    eot_id: int = 2
    image_feature_dim: int = 0  # channels of the encoder's image tokens
    image_tokens: int = 0  # how many image tokens the encoder gives (one learned position each)


def check_config(cfg: CaptionModelConfig) -> None:
    check_positive(cfg, "vocab_size", "image_feature_dim", "image_tokens", "mlp_ratio")
    check_at_least(cfg, 3, "context_length")
    check_at_least(cfg, 1, "depth")
    check_heads(cfg, "width", "heads")
    check_probability(cfg, "dropout", "label_smoothing")
    for key in ("pad_id", "sot_id", "eot_id"):
        if not 0 <= getattr(cfg, key) < cfg.vocab_size:
            raise ConfigError(f"model.{key}={getattr(cfg, key)} is not a token of the vocabulary "
                              f"(model.vocab_size={cfg.vocab_size})")


class CaptionDecoder(nn.Module):
    """tokens [B, L] + image tokens [B, M, image_feature_dim] -> next-token logits [B, L, vocab_size]."""

    def __init__(self, cfg: CaptionModelConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.image_norm = nn.LayerNorm(cfg.image_feature_dim)
        self.image_proj = nn.Linear(cfg.image_feature_dim, cfg.width)
        self.image_pos = nn.Parameter(torch.zeros(1, cfg.image_tokens, cfg.width))
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, drop=cfg.dropout)
                                    for _ in range(cfg.depth))
        self.ln_final = nn.LayerNorm(cfg.width)
        # The output layer is the token embedding, transposed (Press & Wolf 2017): fewer weights to learn from a
        # small caption set, and a word's input and output vectors agree.
        for p in (self.token_embedding.weight, self.pos_embed, self.image_pos):
            nn.init.normal_(p, std=0.02)

    def encode_memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The image tokens as the decoder attends to them: [B, M, C] -> [B, M, width]."""
        if image_tokens.shape[1:] != (self.cfg.image_tokens, self.cfg.image_feature_dim):
            raise ValueError(f"expected image tokens of shape [B, {self.cfg.image_tokens}, "
                             f"{self.cfg.image_feature_dim}], got {list(image_tokens.shape)} (the model was trained "
                             "with another image encoder or image size)")
        return self.image_proj(self.image_norm(image_tokens)) + self.image_pos

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Logits of the token after each position, from `encode_memory`'s output."""
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"token sequence of length {tokens.shape[1]} exceeds context {self.cfg.context_length}")
        x = self.drop(self.token_embedding(tokens) + self.pos_embed[:, : tokens.shape[1]])
        for block in self.blocks:
            x = block(x, memory)
        return self.ln_final(x) @ self.token_embedding.weight.t()

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens, self.encode_memory(image_tokens))

    def loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: predict tokens[:, 1:] from tokens[:, :-1]; padding is not scored."""
        length = int((tokens != self.cfg.pad_id).sum(1).max())  # columns of padding only cost compute
        tokens = tokens[:, :length]
        logits = self(image_tokens, tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=self.cfg.pad_id,
                               label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, beam_size: int = 3, max_length: int | None = None,
                 length_penalty: float = 0.6, banned: tuple[int, ...] = ()) -> list[list[tuple[list[int], float]]]:
        """Beam search. For each image, its `beam_size` best captions, best first, as (token ids without
        <sot>/<eot>, score); score = sum of log-probabilities / ((5 + length) / 6) ** length_penalty (GNMT).

        beam_size=1 is greedy decoding. A beam ends when it emits <eot>; an image is done when it has
        `beam_size` ended beams, and after `max_length` tokens (default: the context) unfinished beams count as
        ended. `banned`: token ids never emitted (besides <pad> and <sot>). Each step reruns the decoder over the
        whole prefix (no key/value cache): captions are a few dozen tokens, and the image side is computed once.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        cfg = self.cfg
        max_length = min(max_length or cfg.context_length, cfg.context_length)
        B, K = image_tokens.shape[0], beam_size
        memory = self.encode_memory(image_tokens).repeat_interleave(K, dim=0)
        sequences = torch.full((B * K, 1), cfg.sot_id, dtype=torch.long, device=image_tokens.device)
        # Every beam starts identical: only the first may expand, or the first step would pick one word K times.
        scores = torch.full((B, K), float("-inf"), device=image_tokens.device)
        scores[:, 0] = 0.0
        ended: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
        never = torch.tensor([cfg.pad_id, cfg.sot_id, *banned], device=image_tokens.device)

        def penalised(score: float, length: int) -> float:
            return score / ((5 + length) / 6) ** length_penalty

        for _ in range(1, max_length):
            log_probs = self.decode(sequences, memory)[:, -1].float().log_softmax(-1)
            log_probs[:, never] = float("-inf")
            vocab = log_probs.shape[-1]
            candidates = (scores.unsqueeze(-1) + log_probs.view(B, K, vocab)).view(B, K * vocab)
            top_scores, top = candidates.topk(2 * K, dim=1)  # K of them are not <eot>, so K beams go on
            next_rows, next_tokens, next_scores = [], [], []
            for b in range(B):
                alive = []
                for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top[b].tolist())):
                    beam, token = divmod(index, vocab)
                    if score == float("-inf"):
                        break
                    if token == cfg.eot_id:
                        # Only an ending among the K best candidates ends a beam (as Hugging Face's beam search):
                        # with K=1 this is exactly greedy decoding.
                        if rank < K and len(ended[b]) < K:
                            ids = sequences[b * K + beam, 1:].tolist()
                            ended[b].append((ids, penalised(score, len(ids) + 1)))
                    elif len(alive) < K:
                        alive.append((b * K + beam, token, score))
                done = len(ended[b]) >= K
                alive += [(b * K, cfg.pad_id, float("-inf"))] * (K - len(alive))  # filler beams
                for row, token, score in alive:
                    next_rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(float("-inf") if done else score)
            rows = torch.tensor(next_rows, device=sequences.device)
            sequences = torch.cat([sequences[rows], torch.tensor(next_tokens, device=sequences.device)[:, None]], 1)
            scores = torch.tensor(next_scores, device=scores.device).view(B, K)
            if all(len(e) >= K for e in ended):
                break
        for b in range(B):  # beams that reached max_length without <eot>
            for k in range(K):
                if len(ended[b]) < K and scores[b, k] > float("-inf"):
                    ids = sequences[b * K + k, 1:].tolist()
                    ended[b].append((ids, penalised(float(scores[b, k]), len(ids))))
        return [sorted(e, key=lambda c: -c[1]) for e in ended]

"""The CLIP text tower: a causal Transformer whose sentence embedding is the state at the <eot> token.

With a causal mask the <eot> state has read the whole caption, and padding after <eot> cannot reach it, so no
padding mask is needed (as in CLIP). The input is a [B, L] LongTensor from `clipsnail.data.tokenizers`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipsnail.layers import TransformerBlock


class TextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_length: int = 32,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        eot_id: int = 2,
        dropout: float = 0.0,
        activation: str = "gelu",
    ):
        super().__init__()
        self.context_length, self.eot_id = context_length, eot_id
        self.num_features = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, drop=dropout, activation=activation) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.grad_checkpointing = False
        # CLIP's initialisation (OpenAI and open_clip): the residual branches scaled down with depth so the
        # residual stream starts near unit variance. It trains markedly faster early on than a flat 0.02.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass instead of storing them (training mode only)."""
        self.grad_checkpointing = enable

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"token sequence of length {tokens.shape[1]} exceeds context {self.context_length}")
        x = self.drop(self.token_embedding(tokens) + self.pos_embed[:, : tokens.shape[1]])
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, True, use_reentrant=False) if checkpointing else block(x, causal=True)
        return self.ln_final(x)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where each row is pooled: its first <eot>, or its last position when it has none (a caller's own
        tokens). Written without data-dependent shapes, so that it also exports to ONNX."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device).expand_as(tokens)
        return torch.where(tokens == self.eot_id, positions, length - 1).amin(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        eot = self.eot_positions(tokens)
        # Under the causal mask nothing after the last <eot> can reach any pooled state: drop those padding
        # columns. Same result, and captions are usually far shorter than the context.
        x = self.forward_features(tokens[:, : int(eot.max()) + 1])
        return x[torch.arange(x.shape[0], device=x.device), eot]


class PretrainedTextTower(nn.Module):
    """A pretrained Hugging Face encoder from a local folder (DistilBERT, all-MiniLM-L6-v2...) as the text tower.

    Pooling: "mean" over non-padding tokens (what sentence-transformers models such as all-MiniLM-L6-v2 were
    trained with) or "cls" (the first token, as BERT-style encoders are pooled). With `load_weights=False` only the
    architecture is built from the folder's config.json (the weights then come from a run's model.safetensors).
    """

    def __init__(self, model_dir: str, pool: str = "mean", pad_id: int = 0, load_weights: bool = True):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as e:
            raise ImportError("a pretrained text tower needs the 'transformers' package: "
                              "pip install 'clipsnail[hf]'") from e
        if pool not in ("mean", "cls"):
            raise ValueError(f"text_pool must be 'mean' or 'cls', got {pool!r}")
        if load_weights:
            from transformers.utils import logging as hf_logging

            shown = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a local read: its "Loading weights" bar is noise in every command
            try:
                self.model = AutoModel.from_pretrained(model_dir, local_files_only=True)
            finally:
                if shown:
                    hf_logging.enable_progress_bar()
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        self.pool, self.pad_id = pool, pad_id
        self.num_features = self.model.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
        renamed = hasattr(self.model, "activation_checkpointing_enable")
        if not enable:
            (self.model.activation_checkpointing_disable if renamed else self.model.gradient_checkpointing_disable)()
        elif not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ValueError(f"the text model {type(self.model).__name__} does not support gradient checkpointing")
        elif renamed:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # The columns after the longest caption of the batch are padding in every row: masked out of attention and
        # of the mean, they change nothing, and they are most of the work (COCO captions fill ~13 of 48 tokens).
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.forward_context(tokens[:, : int(torch.where(tokens != self.pad_id, positions, 0).amax()) + 1])

    def forward_context(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled features of `tokens` with every column run: a fixed shape, what ONNX export traces."""
        mask = (tokens != self.pad_id).long()
        hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

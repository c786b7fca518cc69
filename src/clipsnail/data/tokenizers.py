"""Text tokenizers: byte-level BPE trained on the captions (CLIP), or characters (seed 004).

Both are Hugging Face `tokenizers` objects configured completely (normaliser, pre-tokeniser, start/end tokens,
truncation and padding to a fixed context), so the saved `tokenizer.json` alone reproduces the encoding.
As in CLIP, every sequence is `<sot> tokens <eot>` padded to `context_length`; the text tower pools at `<eot>`,
which truncation always keeps as the last token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from clipsnail.errors import DataError

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIAL_TOKENS = [PAD, SOT, EOT, UNK]  # ids 0..3 in this order


class TextTokenizer:
    """Turns a list of strings into a `[batch, context_length]` LongTensor of token ids.

    Our own tokenizers wrap every caption as `<sot> ... <eot>`. A pretrained Hugging Face tokenizer (e.g. BERT's
    WordPiece, for a pretrained text tower) keeps its own template ([CLS] ... [SEP]) and pad token; it has no
    `eot_id` because such towers pool with an attention mask instead.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (<sot>, one token, <eot>), got {context_length}")
        self.hf = tokenizer
        self.context_length = context_length
        self.sot_id = tokenizer.token_to_id(SOT)
        self.eot_id = tokenizer.token_to_id(EOT)
        if self.sot_id is not None and self.eot_id is not None:
            pad_token = PAD
            self.hf.post_processor = processors.TemplateProcessing(
                single=f"{SOT} $A {EOT}", special_tokens=[(SOT, self.sot_id), (EOT, self.eot_id)]
            )
        else:
            pad_token = (tokenizer.padding or {}).get("pad_token") or "[PAD]"
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise DataError(f"tokenizer has no padding token {pad_token!r}")
        self.hf.enable_truncation(max_length=context_length)
        self.hf.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=pad_token)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def kind(self) -> str:
        if isinstance(self.hf.model, models.WordLevel):
            return "char"
        return "bpe" if isinstance(self.hf.model, models.BPE) else "pretrained"

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.hf.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, context_length: int) -> TextTokenizer:
        """The tokenizer.json of a local Hugging Face model folder, padded/truncated to `context_length`."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{model_dir}: no tokenizer.json (a Hugging Face model folder is expected)")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(hf, context_length)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            hf = Tokenizer.from_file(str(path))
            length = json.loads(path.read_text())["truncation"]["max_length"]
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(hf, length)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, context_length: int = 32) -> TextTokenizer:
    """Byte-level BPE (GPT-2/CLIP style) learned from `texts`; lower-cased and whitespace-normalised like CLIP."""
    hf = Tokenizer(models.BPE(unk_token=UNK))
    hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> at test time
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(hf, context_length)


def train_chars(texts: Iterable[str], context_length: int = 64, lowercase: bool = True) -> TextTokenizer:
    """One token per character (seed 004); characters never seen in `texts` map to <unk>."""
    texts = list(texts)
    if lowercase:
        texts = [t.lower() for t in texts]
    alphabet = sorted(set("".join(texts)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    hf = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    hf.add_special_tokens(SPECIAL_TOKENS)  # so decode(skip_special_tokens=True) drops them
    norms = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    hf.normalizer = normalizers.Sequence(norms)
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return TextTokenizer(hf, context_length)


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, context_length: int) -> TextTokenizer:
    if kind == "bpe":
        return train_bpe(texts, vocab_size=vocab_size, context_length=context_length)
    if kind == "char":
        return train_chars(texts, context_length=context_length)
    raise ValueError(f"unknown tokenizer {kind!r}; choose 'bpe' or 'char'")

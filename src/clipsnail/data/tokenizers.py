"""Text tokenizers: byte-level BPE trained on the captions (CLIP), characters (text2feat), or OpenAI CLIP's own BPE
(for converted pretrained CLIP models, see `clipsnail.apps.convert`).

All are Hugging Face `tokenizers` objects configured completely (normaliser, pre-tokeniser, start/end tokens,
truncation and padding to a fixed context), so the saved `tokenizer.json` alone reproduces the encoding.
As in CLIP, every sequence is `<sot> tokens <eot>` padded to `context_length`; the text tower pools at `<eot>`,
which truncation always keeps as the last token.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from clipsnail.core.errors import DataError

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIAL_TOKENS = [PAD, SOT, EOT, UNK]  # ids 0..3 in this order
# OpenAI CLIP's start/end tokens, ids 49406 and 49407; open_clip renamed OpenAI's <|startoftext|>/<|endoftext|>
# to these, and as in open_clip the literal text "<end_of_text>" in a caption encodes as the token.
OPENAI_SOT, OPENAI_EOT = "<start_of_text>", "<end_of_text>"
# The (start, end) token pairs a sequence is wrapped in: ours, then OpenAI CLIP's. A tokenizer with neither (a
# pretrained Hugging Face one) keeps its own template.
TEMPLATES = [(SOT, EOT), (OPENAI_SOT, OPENAI_EOT)]


class TextTokenizer:
    """Turns a list of strings into a `[batch, context_length]` LongTensor of token ids.

    Our own tokenizers wrap every caption as `<sot> ... <eot>` and pad with `<pad>`; OpenAI's CLIP BPE as
    `<start_of_text> ... <end_of_text>` padded with id 0 (the padding a tokenizer was built with is kept, and saved
    in tokenizer.json). A pretrained Hugging Face tokenizer (e.g. BERT's
    WordPiece, for a pretrained text tower) keeps its own template ([CLS] ... [SEP]) and pad token; it has no
    `eot_id` because such towers pool with an attention mask instead.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (<sot>, one token, <eot>), got {context_length}")
        self.hf = tokenizer
        self.context_length = context_length
        self.sot_id = self.eot_id = None
        for sot, eot in TEMPLATES:
            sot_id, eot_id = tokenizer.token_to_id(sot), tokenizer.token_to_id(eot)
            if sot_id is not None and eot_id is not None:
                self.sot_id, self.eot_id = sot_id, eot_id
                self.hf.post_processor = processors.TemplateProcessing(
                    single=f"{sot} $A {eot}", special_tokens=[(sot, sot_id), (eot, eot_id)]
                )
                break
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token") or (PAD if self.sot_id is not None else "[PAD]")
        self.pad_id = padding.get("pad_id") if padding.get("pad_token") else tokenizer.token_to_id(pad_token)
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
        if self.eot_id is not None and self.eot_id in ids:  # the padding after it may be an ordinary token (OpenAI's)
            ids = ids[: ids.index(self.eot_id)]
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
    """One token per character; characters never seen in `texts` map to <unk>."""
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
    if kind == "openai":  # OpenAI CLIP's fixed vocabulary; nothing is learned from `texts`
        return openai_bpe(context_length=context_length)
    raise ValueError(f"unknown tokenizer {kind!r}; choose 'bpe', 'char' or 'openai'")


def openai_bpe(context_length: int = 77) -> TextTokenizer:
    """OpenAI CLIP's byte-level BPE (49,408 tokens), as `open_clip.tokenize` encodes: the vocabulary and merges come
    from the file in the open_clip_torch package (nothing is downloaded).

    Same ids as open_clip's SimpleTokenizer: NFC, whitespace runs collapsed and stripped, lower case, its regex
    pre-split, bytes mapped to GPT-2's printable alphabet, "</w>" ending each word, `<start_of_text>` (49406)
    and `<end_of_text>` (49407) around the caption, truncated keeping `<end_of_text>` last, padded with id 0.
    One difference a `tokenizers` normaliser cannot express: open_clip first runs ftfy.fix_text (mojibake
    repair, curly quotes to straight ones, full-width characters to ASCII) and html.unescape twice, so such
    text can tokenise differently; ordinary captions do not.
    """
    spec = importlib.util.find_spec("open_clip")  # located, not imported: importing open_clip is slow
    if spec is None or not spec.submodule_search_locations:
        raise DataError("OpenAI's CLIP vocabulary ships with open_clip: pip install open_clip_torch")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise DataError(f"{path}: OpenAI's CLIP vocabulary file not found (reinstall open_clip_torch)")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as CLIP: the first 48,894
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [OPENAI_SOT, OPENAI_EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    hf.add_special_tokens([OPENAI_SOT, OPENAI_EOT])
    hf.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase(),
    ])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)])
    hf.enable_padding(pad_id=0, pad_token=tokens[0])  # open_clip pads with 0, which is the token "!"
    return TextTokenizer(hf, context_length)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (CLIP's byte-level alphabet, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

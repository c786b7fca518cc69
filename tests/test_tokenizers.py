import pytest
import torch

from clipsnail.core.errors import DataError
from clipsnail.data.tokenizers import EOT, PAD, SOT, TextTokenizer, build_tokenizer, train_bpe, train_chars

CAPTIONS = ["a large red circle to the left of a small blue square", "two green triangles", "a yellow star"] * 5


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_fixed_length_with_start_and_end(kind):
    tok = build_tokenizer(kind, CAPTIONS, vocab_size=300, context_length=16)
    ids = tok(["a red circle", "two green triangles and a very long tail that must be cut off somewhere"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_id).all()
    # the short one is padded after <eot>; the long one is truncated but keeps <eot> last
    n = (ids[0] != tok.pad_id).sum().item()
    assert ids[0, n - 1] == tok.eot_id and (ids[0, n:] == tok.pad_id).all()
    assert ids[1, -1] == tok.eot_id
    assert tok.hf.token_to_id(PAD) == 0 and tok.hf.token_to_id(SOT) == 1 and tok.hf.token_to_id(EOT) == 2


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_round_trip(tmp_path, kind):
    tok = build_tokenizer(kind, CAPTIONS, vocab_size=300, context_length=20)
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    texts = ["A Red Circle", "two green triangles", "zebra!"]
    assert torch.equal(tok(texts), again(texts))
    assert again.context_length == 20 and again.kind == kind
    assert again.decode(again(["a red circle"])[0]).strip() == "a red circle"


def test_bpe_lowercases_and_never_needs_unk():
    tok = train_bpe(CAPTIONS, vocab_size=280, context_length=24)
    assert torch.equal(tok(["A RED Circle"]), tok(["a red circle"]))
    ids = tok(["ünïcødé 🙂 words never seen"])[0]
    assert tok.hf.token_to_id("<unk>") not in ids.tolist()  # byte-level: every byte has a token


def test_char_tokenizer_is_one_token_per_character():
    tok = train_chars(["abc d"], context_length=10)
    ids = tok(["abd"])[0]
    assert ids[:5].tolist() == [tok.sot_id, tok.hf.token_to_id("a"), tok.hf.token_to_id("b"),
                                tok.hf.token_to_id("d"), tok.eot_id]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        TextTokenizer.load(bad)

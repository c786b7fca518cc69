"""Query algebra for search (as in rclip): weighted text and image terms, added or subtracted.

Grammar:

    query  := [sign] term (sign term)*
    sign   := "+" | "-"      a standalone + or -: whitespace (or the start / end of the query) on both sides
    term   := [weight ":"] (text | image)
    weight := a number above 0 and at most MAX_WEIGHT ("2", "0.5", "1e-1")

Examples: `2:golden retriever + ./pool.jpg - fruit`, `- fruit + 2:cat` (a negative first term is allowed, as
long as some term is positive). A + or - inside a word is text ("t-shirt", "-b", "c++"); so is a colon after a
prefix that is not a number ("photo: a dog"). A number before a colon always is a weight, and a weight that
parses as a number but is not one above 0 and at most MAX_WEIGHT (`nan:`, `inf:`, `0:`, `-1:`, `1e40:`) is an
error, as are empty terms ("cat +", "+ + dog", "") and queries of more than MAX_TERMS terms.

Which terms are images depends on where the query runs, so `parse_query` asks a callback. On the command line
(`local_image`) a term is an image when it names an existing regular file with an image extension, or when it
starts like a path (`./`, `../`, `/`, `~/`, `~user/`), in which case the file must exist. The web app names images
of its index instead and never reads a path from a request.

The query vector is rclip's: the L2-normalised sum of weight * unit(term vector) (`combine`). `term_vectors`
encodes a query's distinct text terms in one batch (and its distinct images in another), so repeating a term costs
nothing and a query costs at most two model calls.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsnail.core.errors import ClipsnailError
from clipsnail.data.images import IMAGE_EXTENSIONS

# Bounds that keep one query's cost and arithmetic in check: a query is encoded in one batch of at most MAX_TERMS
# texts, and weights differ by at most MAX_WEIGHT / (the smallest weight), far past what changes a ranking.
MAX_TERMS = 16
MAX_WEIGHT = 1000.0


class QueryError(ClipsnailError):
    """A malformed query. The message is one line and says which term, or where, is wrong."""


@dataclass(frozen=True)
class Term:
    weight: float  # signed: negative for a term after "-"
    kind: str  # "text" or "image"
    value: str  # the text, or the image (a file path on the command line, an index path in the web app)


# A + or - with no other character touching it on either side; the group keeps the operator in re.split's output.
_OPERATOR = re.compile(r"(?<!\S)([+-])(?!\S)")
# A weight prefix: the term's first characters up to its first colon, no whitespace in them.
_WEIGHT = re.compile(r"([^\s:]+):(.*)", re.S)
# What starts like a path on its letters alone; "~" only as the start of a home folder (~/x, ~user/x), so that
# text such as "~5 dogs" stays text.
_PATH_START = re.compile(r"(\./|\.\./|/|~[^/\s]*/)")


def looks_like_path(text: str) -> bool:
    return _PATH_START.match(text) is not None


def local_image(text: str) -> str | None:
    """The command line's image terms: the file path, or None when `text` is text."""
    if looks_like_path(text):
        path = Path(text).expanduser()
        try:
            mode = path.stat().st_mode
        except (OSError, ValueError):  # missing, or a name the OS refuses (a part over 255 bytes, a NUL byte)
            raise QueryError(f"{text}: no such image file (a term starting with ./, ../, / or ~ names a file)") \
                from None
        if not stat.S_ISREG(mode):
            raise QueryError(f"{text}: not an image file")
        return str(path)
    if text.lower().endswith(IMAGE_EXTENSIONS):
        try:
            # A regular file only: a FIFO named x.jpg would block the read; text that happens to be a file name
            # of something else stays text.
            if stat.S_ISREG(os.stat(text).st_mode):
                return text
        except (OSError, ValueError):  # no such file, or a name the OS refuses (too long, NUL byte)
            pass
    return None


def _weight(term: str) -> tuple[float, str]:
    """(weight, the rest) of one term's text; weight 1 when it has no numeric prefix."""
    match = _WEIGHT.match(term)
    if match is None:
        return 1.0, term
    try:
        weight = float(match[1])
    except ValueError:  # "photo: a dog": the prefix is text
        return 1.0, term
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise QueryError(f"term {term!r}: the weight {match[1]!r} must be a finite number above 0 and at most "
                         f"{MAX_WEIGHT:g}")
    rest = match[2].strip()
    if not rest:
        raise QueryError(f"term {term!r}: nothing after the weight")
    return weight, rest


def parse_query(query: str, image: Callable[[str], str | None] | None = None) -> list[Term]:
    """The terms of `query`, in order. `image(text)` says whether a term (its weight removed) is an image: the
    image's name, or None for text; it may raise QueryError for a term that is neither. Without it every term is
    text."""
    if not query.strip():
        raise QueryError("the text query is empty")
    # [text, op, text, op, text...]; a leading operator leaves an empty first text.
    parts = _OPERATOR.split(query)
    signs, texts, where = ["+"], [parts[0]], [0]
    position = len(parts[0])
    for op, text in zip(parts[1::2], parts[2::2]):
        signs.append(op)
        texts.append(text)
        where.append(position)  # the operator's offset in the query
        position += len(op) + len(text)
    if not texts[0].strip() and len(texts) > 1:  # "- fruit + cat": the first term has the first operator's sign
        signs, texts, where = signs[1:], texts[1:], where[1:]
    if len(texts) > MAX_TERMS:  # before any term is looked at: the cost of a query is bounded by its size
        raise QueryError(f"the query has {len(texts)} terms; at most {MAX_TERMS} are allowed")
    terms = []
    for n, (sign, text, at) in enumerate(zip(signs, texts, where)):
        text = text.strip()
        if not text:
            last = "at the end" if n == len(texts) - 1 else f"at character {at + 1}"
            raise QueryError(f"query {query!r}: no term after the {sign!r} {last}")
        weight, value = _weight(text)
        name = image(value) if image is not None else None
        terms.append(Term(weight if sign == "+" else -weight, "text" if name is None else "image",
                          value if name is None else name))
    if all(t.weight < 0 for t in terms):
        raise QueryError(f"query {query!r}: every term is negative; give at least one positive term")
    return terms


def term_vectors(terms: Sequence[Term], encode_texts: Callable[[list[str]], object],
                 encode_images: Callable[[list[str]], object]) -> list:
    """One vector [1, D] per term, in order (torch tensors or numpy arrays, as the encoders give them). Each distinct
    text is encoded once, all of them in one call of `encode_texts` (and likewise the images), so that "a + a + a"
    costs what "a" does."""
    vectors: dict[tuple[str, str], object] = {}
    for kind, encode in (("text", encode_texts), ("image", encode_images)):
        values = list(dict.fromkeys(t.value for t in terms if t.kind == kind))
        if values:
            encoded = encode(values)
            vectors.update(((kind, v), encoded[i:i + 1]) for i, v in enumerate(values))
    return [vectors[t.kind, t.value] for t in terms]


def as_numpy(vector) -> np.ndarray:
    """A torch tensor (on any device) or an array-like as a numpy array, without importing torch."""
    if hasattr(vector, "detach"):
        vector = vector.detach().float().cpu().numpy()
    return np.asarray(vector)


def combine(vectors: Sequence, weights: Sequence[float]) -> np.ndarray:
    """The query embedding [1, D] float32 of term embeddings (each [D] or [1, D], torch or numpy) and their signed
    weights: the L2-normalised sum of weight * unit(vector), summed in float64 with the weights divided by the
    largest, so that no weight can overflow the sum.

    A lone positive term gives its own vector back, so a plain query searches with exactly the encoder's output."""
    if len(vectors) != len(weights) or not vectors:
        raise ValueError(f"need as many vectors as weights (at least one), got {len(vectors)} and {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        raise QueryError(f"every weight must be a finite number, got {list(weights)}")
    given = [as_numpy(v).reshape(1, -1) for v in vectors]
    units = [g.astype(np.float64) for g in given]
    if not all(np.isfinite(u).all() for u in units):
        raise QueryError("a term's embedding is not finite (the model gave NaN or infinity)")
    units = [u / max(float(np.linalg.norm(u)), 1e-12) for u in units]
    if len(units) == 1 and weights[0] > 0:
        own = given[0].astype(np.float32)
        return own if abs(float(np.linalg.norm(own)) - 1) < 1e-5 else units[0].astype(np.float32)
    largest = max(abs(w) for w in weights)
    scaled = [w / largest for w in weights]
    total = sum(w * u for w, u in zip(scaled, units))
    norm = float(np.linalg.norm(total))
    # Relative to the weights: "a - a" (or "2:a - a + -..." that balance) leaves only rounding noise.
    if not norm > 1e-4 * sum(abs(w) for w in scaled):
        raise QueryError("the terms cancel out: their weighted sum is (nearly) zero; change a weight or a term")
    return (total / norm).astype(np.float32)

"""Outputs of a locked tower, computed once and kept beside the run.

LiT (Zhai et al., CVPR 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): a locked pretrained image
tower with a trained text side transfers well, and a locked tower under a deterministic transform gives every image
the same output at every step. So it runs once over the training images, and a step costs only the other tower and
the heads. The same holds for a locked text tower and its captions.

A cache file holds one tower's outputs for items named by their content (an image file's bytes, a caption's token
ids): `FOLDER/NAME-KEY.safetensors`, where KEY is a digest of the tower's weights and of what else decides its
outputs (the image transform). Training again with the same tower reads it back (a resume costs a few items,
encoded again to check the file against the tower); an image whose bytes changed is encoded again on its own; other
weights give another KEY, and the file of the old one is removed once the new one is written. Files are replaced
atomically, so a kill leaves the old file or the new one. A file that is not what this module wrote for that name
and key, or whose rows disagree with the tower, is discarded with a warning and every item encoded again.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from clipsnail.core.safeio import atomic_path

log = logging.getLogger(__name__)

# Bumped when what a cache file holds changes meaning, so that an older file is never read as a newer one.
FORMAT = "1"
DIGEST_BYTES = 20  # SHA-1
# At each read this many kept items (chosen by a generator seeded from the key) are encoded again and compared with
# their rows: a permuted or altered file shows at once, at the cost of a handful of items.
SPOT_CHECKS = 4
# A kept row agrees with a fresh one within this share of its norm: the same tower on another device, or under
# bfloat16 autocast, differs by rounding well below it; another item's row differs by far more.
MATCH_TOLERANCE = 0.05
# A finite kept row beyond this many times the largest value of the freshly encoded rows (or of 1) is no tower's
# output: a tampered or damaged file that the spot check did not sample.
MAGNITUDE_FACTOR = 100.0


def content_digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def weights_digest(module: nn.Module, *settings: str) -> str:
    """A digest of `module`'s parameters and buffers (names, dtypes, shapes, bytes) and of `settings` (e.g. the
    transform in front of it): two towers with the same digest compute the same outputs."""
    digest = hashlib.sha1(FORMAT.encode())
    for setting in settings:
        digest.update(setting.encode() + b"\0")
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheCounts:
    """What one `FeatureCache.outputs` call did with the items it was given: `kept` were read back from the file,
    `encoded` computed by the tower (kept + encoded: every item), and `checked` of the kept ones encoded again to
    check the file against the tower."""

    kept: int
    encoded: int
    checked: int


class FeatureCache:
    """One tower's outputs by item digest, in `folder/NAME-KEY.safetensors` (rows `features` [N, D] float32, and
    `digests` as [N, 20] uint8 bytes). `folder` None keeps nothing: every call computes.

    Only finite rows are kept: an item whose tower output is not finite (an image that cannot be decoded) is
    encoded again at every call, so that a row gone bad on disk never drops a good item for good. The file is
    trusted no further than it can be checked: its layout and its metadata (name, key) must be those this class
    writes, and at each read a few kept items are encoded again and compared with their rows; a file that fails
    is discarded and every item encoded again. `counts`: what the last `outputs` call did (None before one)."""

    def __init__(self, folder: Path | None, name: str, key: str):
        self.folder, self.name, self.key = folder, name, key[:16]
        self.counts: CacheCounts | None = None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.name}-{self.key}.safetensors"

    def read(self) -> dict[str, torch.Tensor]:
        """digest -> row, from the file of this key; {} when there is none or it is not a file this cache wrote
        (it is ours, made again from the items)."""
        names, features = self._load()
        return dict(zip(names, features))

    def _load(self) -> tuple[list[str], torch.Tensor]:
        """(the digests, the [N, D] rows) of the file of this key; none when there is none or it is not a file
        this cache wrote (said in one warning)."""
        if self.path is None or not self.path.is_file():
            return [], torch.empty(0, 0)
        try:
            with safe_open(str(self.path), "pt") as f:
                metadata = f.metadata() or {}
                stored = {name: f.get_tensor(name) for name in ("digests", "features") if name in f.keys()}
        except (SafetensorError, OSError) as e:
            problem = str(e)
        else:
            problem = self._layout_problem(metadata, stored)
        if problem:
            log.warning("%s: unreadable feature cache (%s); encoding again", self.path, problem)
            return [], torch.empty(0, 0)
        return [bytes(d.tolist()).hex() for d in stored["digests"]], stored["features"]

    def _layout_problem(self, metadata: dict[str, str], stored: dict[str, torch.Tensor]) -> str | None:
        """What makes a file other than one `write` made for this name and key, or None."""
        ours = {"format": FORMAT, "name": self.name, "key": self.key}
        for field, value in ours.items():
            if metadata.get(field) != value:  # another cache's file under this name (e.g. copied or renamed)
                return f"its {field} is {metadata.get(field)!r}, not {value!r}: not this cache"
        if set(stored) != {"digests", "features"}:
            return f"no {' or '.join(sorted({'digests', 'features'} - set(stored)))} tensor"
        digests, features = stored["digests"], stored["features"]
        if digests.dtype != torch.uint8 or digests.dim() != 2 or digests.shape[1] != DIGEST_BYTES:
            return f"digests of {digests.dtype} {list(digests.shape)}, not uint8 [N, {DIGEST_BYTES}]"
        if features.dtype != torch.float32 or features.dim() != 2 or len(features) != len(digests):
            return f"features of {features.dtype} {list(features.shape)}, not float32 [{len(digests)}, D]"
        return None

    def write(self, rows: dict[str, torch.Tensor]) -> None:
        """Replace the file of this key with `rows`, then remove this NAME's files of other keys (older weights)."""
        if self.path is None or not rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        digests = torch.tensor([list(bytes.fromhex(d)) for d in rows], dtype=torch.uint8)
        with atomic_path(self.path) as tmp:
            save_file({"digests": digests, "features": torch.stack(list(rows.values())).float().contiguous()},
                      str(tmp), metadata={"format": FORMAT, "name": self.name, "key": self.key})
        ours = re.compile(rf"{re.escape(self.name)}-[0-9a-f]{{16}}\.safetensors")  # the names this class writes
        for old in self.folder.iterdir():
            if old != self.path and ours.fullmatch(old.name):
                old.unlink(missing_ok=True)

    def outputs(self, digests: Sequence[str], encode: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Rows for the items named by `digests`, in their order: those kept in the file are read back (once a few
        of them, encoded again, agree with it), the others computed by `encode(indices)` (their rows, in that
        order); the file then holds exactly the finite rows of these items."""
        names, features = self._load()
        finite = features.isfinite().all(dim=1)
        kept = {d: row for d, row, ok in zip(names, features, finite.tolist()) if ok}  # a bad row: encoded again
        largest = features[finite].abs().max().item() if finite.any() else 0.0
        checked = self._spot_check(digests, kept, largest, encode)
        if checked is None:
            kept = {}
        missing = [i for i, d in enumerate(digests) if d not in kept]
        fresh = encode(missing).float().cpu() if missing else torch.empty(0, 0)
        for i, row in zip(missing, fresh):
            kept[digests[i]] = row
        self.counts = CacheCounts(kept=len(digests) - len(missing), encoded=len(missing), checked=checked or 0)
        log.info("%s: %d of %d kept%s, %d encoded", self.name, self.counts.kept, len(digests),
                 f" ({checked} checked against the tower)" if checked else "", self.counts.encoded)
        rows = {d: kept[d] for d in dict.fromkeys(digests)}
        kept_rows = {d: row for d, row in rows.items() if row.isfinite().all()}
        if kept_rows.keys() != set(names) or fresh.isfinite().all(dim=1).any():
            self.write(kept_rows)
        return torch.stack([rows[d] for d in digests])

    def _spot_check(self, digests: Sequence[str], kept: dict[str, torch.Tensor], largest: float,
                    encode: Callable[[list[int]], torch.Tensor]) -> int | None:
        """How many of the kept rows these items would use were encoded again and agree with the tower (0: none
        to check), or None, said in one warning, when the file is not to be trusted. `largest`: the largest
        magnitude in the file's finite rows."""
        first = {d: i for i, d in reversed(list(enumerate(digests))) if d in kept}  # an index per kept item
        if not first:
            return 0
        indices = sorted(first.values())
        chosen = sorted(random.Random(self.key).sample(indices, min(SPOT_CHECKS, len(indices))))
        fresh = encode(chosen).float().cpu()
        problem = rows_disagree(torch.stack([kept[digests[i]] for i in chosen]), fresh, largest)
        if problem is None:
            return len(chosen)
        what = "unreadable feature cache" if problem.startswith("rows of width") else "feature cache disagrees"
        log.warning("%s: %s (%s); discarded, encoding every item again", self.path, what, problem)
        return None


def rows_disagree(cached: torch.Tensor, fresh: torch.Tensor, largest: float) -> str | None:
    """Why kept rows are not what the tower gives: `cached` and `fresh` are the same items' rows (kept, and
    encoded again now), `largest` the largest magnitude of any kept row. None when they agree."""
    if cached.shape[1:] != fresh.shape[1:]:
        return f"rows of width {cached.shape[1]}, the tower gives {fresh.shape[1]}"
    if not fresh.isfinite().all():  # its bytes are those of an item once encoded: it should encode again
        return "an item that was encoded no longer encodes"
    error = (cached - fresh).norm(dim=1) / fresh.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    if (error > MATCH_TOLERANCE).any():
        return f"a kept row differs from the tower's output by {error.max().item():.3g} of its norm"
    scale = fresh.abs().max().item()
    if largest > MAGNITUDE_FACTOR * max(scale, 1.0):  # no image gives such a row: one the spot check missed
        return f"a kept row reaches {largest:.3g}, the tower's rows {scale:.3g}"
    return None

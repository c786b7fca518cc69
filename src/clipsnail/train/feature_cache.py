"""Outputs of a locked tower, computed once and kept beside the run.

LiT (Zhai et al., CVPR 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): a locked pretrained image
tower with a trained text side transfers well, and a locked tower under a deterministic transform gives every image
the same output at every step. So it runs once over the training images, and a step costs only the other tower and
the heads. The same holds for a locked text tower and its captions.

A cache file holds one tower's outputs for items named by their content (an image file's bytes, a caption's token
ids): `FOLDER/NAME-KEY.safetensors`, where KEY is a digest of the tower's weights and of what else decides its
outputs (the image transform). Training again with the same tower reads it back (a resume costs nothing); an image
whose bytes changed is encoded again on its own; other weights give another KEY, and the file of the old one is
removed once the new one is written. Files are replaced atomically, so a kill leaves the old file or the new one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from clipsnail.core.safeio import atomic_path

log = logging.getLogger(__name__)

# Bumped when what a cache file holds changes meaning, so that an older file is never read as a newer one.
FORMAT = "1"


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


class FeatureCache:
    """One tower's outputs by item digest, in `folder/NAME-KEY.safetensors` (rows `features`, and `digests` as
    [N, 20] bytes). `folder` None keeps nothing: every call computes."""

    def __init__(self, folder: Path | None, name: str, key: str):
        self.folder, self.name, self.key = folder, name, key[:16]

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.name}-{self.key}.safetensors"

    def read(self) -> dict[str, torch.Tensor]:
        """digest -> row, from the file of this key; {} when there is none or it cannot be read (it is ours, made
        again from the items)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            stored = load_file(str(self.path))
            digests, features = stored["digests"], stored["features"]
        except (SafetensorError, OSError, KeyError) as e:
            log.warning("%s: unreadable feature cache (%s); encoding again", self.path, e)
            return {}
        return {bytes(d.tolist()).hex(): row for d, row in zip(digests, features)}

    def write(self, rows: dict[str, torch.Tensor]) -> None:
        """Replace the file of this key with `rows`, then remove this NAME's files of other keys (older weights)."""
        if self.path is None or not rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        digests = torch.tensor([list(bytes.fromhex(d)) for d in rows], dtype=torch.uint8)
        with atomic_path(self.path) as tmp:
            save_file({"digests": digests, "features": torch.stack(list(rows.values())).contiguous()}, str(tmp),
                      metadata={"format": FORMAT, "name": self.name, "key": self.key})
        ours = re.compile(rf"{re.escape(self.name)}-[0-9a-f]{{16}}\.safetensors")  # the names this class writes
        for old in self.folder.iterdir():
            if old != self.path and ours.fullmatch(old.name):
                old.unlink(missing_ok=True)

    def outputs(self, digests: Sequence[str], encode: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Rows for the items named by `digests`, in their order: those kept in the file are read back, the others
        computed by `encode(indices)` (their rows, in that order); the file then holds exactly these items."""
        kept = self.read()
        missing = [i for i, d in enumerate(digests) if d not in kept]
        if missing:
            for i, row in zip(missing, encode(missing).float().cpu()):
                kept[digests[i]] = row
        log.info("%s: %d of %d kept, %d encoded", self.name, len(digests) - len(missing), len(digests), len(missing))
        rows = {d: kept[d] for d in dict.fromkeys(digests)}
        if missing or len(rows) != len(kept):
            self.write(rows)
        return torch.stack([rows[d] for d in digests])

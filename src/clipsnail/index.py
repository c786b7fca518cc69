"""Embeddings of an image folder, cached next to the model run so a second search is instant.

The cache is keyed by (path, size, mtime): only new or changed files are encoded again, deleted ones dropped.
It is a safetensors file (vectors) with the file list in its metadata, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipsnail.data.images import list_images
from clipsnail.evaluate import encode_image_paths

log = logging.getLogger(__name__)


def _stamp(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


class FolderEmbeddings:
    """L2-normalised image embeddings of every readable image under a folder."""

    def __init__(self, paths: list[Path], vectors: torch.Tensor):
        self.paths, self.vectors = paths, vectors

    @classmethod
    def build(cls, model, folder: str | Path, cache_dir: str | Path | None = None, batch_size: int = 256,
              progress: bool = True) -> FolderEmbeddings:
        folder = Path(folder).resolve()
        paths = list_images(folder)
        stamps = [_stamp(p) for p in paths]
        cache = None
        if cache_dir is not None:
            key = hashlib.sha1(str(folder).encode()).hexdigest()[:16]
            cache = Path(cache_dir) / f"{key}.safetensors"
        known: dict[tuple, torch.Tensor] = {}
        if cache is not None and cache.exists():
            try:
                with safe_open(str(cache), framework="pt") as f:
                    old_stamps = json.loads(f.metadata()["stamps"])
                    old = f.get_tensor("vectors")
                known = {tuple(s): old[i] for i, s in enumerate(old_stamps)}
            except Exception as e:  # a damaged cache is only a cache: rebuild it
                log.warning("ignoring unreadable embedding cache %s (%s)", cache, e)
        todo = [i for i, s in enumerate(stamps) if tuple(s) not in known]
        new_vectors, readable = (encode_image_paths(model, [paths[i] for i in todo], batch_size=batch_size,
                                                    progress=progress) if todo else (None, None))
        rows, kept_paths, kept_stamps = [], [], []
        fresh = {i: j for j, i in enumerate(todo)}
        for i, s in enumerate(stamps):
            if i in fresh:
                if not readable[fresh[i]]:
                    continue
                rows.append(new_vectors[fresh[i]])
            else:
                rows.append(known[tuple(s)])
            kept_paths.append(paths[i])
            kept_stamps.append(s)
        dim = model.cfg.embed_dim
        vectors = torch.stack(rows) if rows else torch.zeros(0, dim)
        if cache is not None and (todo or len(known) != len(kept_stamps)):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            save_file({"vectors": vectors.contiguous()}, str(tmp), metadata={"stamps": json.dumps(kept_stamps)})
            os.replace(tmp, cache)
        log.info("%d images (%d encoded now, %d from cache)", len(kept_paths), len(todo), len(kept_paths) - len(todo))
        return cls(kept_paths, vectors)

    def search(self, query: torch.Tensor, k: int = 9) -> list[tuple[Path, float]]:
        """query: one L2-normalised embedding [D] -> the k most similar images with cosine scores."""
        scores = self.vectors @ query.float().cpu()
        top = scores.topk(min(k, len(self.paths)))
        return [(self.paths[i], s) for s, i in zip(top.values.tolist(), top.indices.tolist())]

"""A persistent, searchable index of the CLIP image embeddings of a folder (recursively), backed by faiss.

An index is a directory:

    index.json           metadata: image root, the CLIP run that encoded the vectors, dim, count, the faiss index
                         type and its parameters, how it is loaded, the unreadable files that were skipped
    files.json           one entry per indexed image, in index order (columns: path relative to the root, size,
                         mtime_ns, sha1)
    vectors.safetensors  the L2-normalised embeddings [N, D] float32: `update` reuses them instead of re-encoding
    faiss.index          the search structure over the same vectors
    catalogue.sqlite     one row per photo (`clipsnail.inference.catalogue`): the file and what its EXIF says (date
                         taken, camera, position, size), for the filters of a search; indexes written before it
                         existed are searched without filters until `index update` adds it

Below `approx_threshold` vectors the faiss index is exact (`IndexFlatIP`: inner product = cosine on unit vectors).
At and above it, it is approximate: an inverted file (`IndexIVFFlat`, nlist ~ 2 sqrt(N) lists) whose `nprobe` is
calibrated at build time on a sample of the indexed vectors to reach `target_recall` recall@10 against exact search
(HNSW is available as `approx_kind="hnsw"`; bench/index.py measures both and is why IVF is the default: on a
2-core CPU it builds several times faster and its calibrated recall matched the measured one, while HNSW, faster
to query, fell well short of its calibration on unclustered data; the figures are in BENCHMARKS.md). Type,
parameters and the calibrated recall are recorded in index.json.

faiss.index is loaded memory-mapped with `faiss.IO_FLAG_MMAP_IFC` (faiss >= 1.10): for IndexFlat, IndexIVFFlat and
IndexHNSWFlat the vectors stay in the page cache instead of the process heap (measured with faiss 1.15: RssAnon
does not grow on load). Where a faiss build cannot map an index it falls back to an ordinary read; which one
happened is `ImageIndex.mmap`.

Nothing is half-written: build and update write a complete index into a temp directory next to INDEX and swap it in
with two renames, so a crash (or an exception while encoding) leaves the previous index as it was.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.core.runs import same_weights, weights_fingerprint
from clipsnail.core.safeio import (
    check_free_space,
    check_replaceable,
    clean_stale,
    open_regular,
    read_json_object,
    recover_dir,
    staged_dir,
    writer_lock,
)
from clipsnail.data.images import default_workers, list_images
from clipsnail.data.photo_facts import PhotoFacts
from clipsnail.inference.catalogue import Catalogue, Filters, facts_by_path, read_all_facts, write_catalogue
from clipsnail.inference.evaluate import encode_image_paths

log = logging.getLogger(__name__)

FORMAT, VERSION = "clipsnail-image-index", 1
META, FILES, VECTORS, FAISS = "index.json", "files.json", "vectors.safetensors", "faiss.index"
CATALOGUE = "catalogue.sqlite"
DEFAULT_APPROX_THRESHOLD = 20_000  # bench/index.py: an exact scan takes 0.7 ms per query at 10k x 512, 14 ms at 100k
DEFAULT_TARGET_RECALL = 0.95
# Fewer new images than this are decoded in the encoding process itself (`_encode`): starting worker processes
# (about a second with torch imported) costs more than decoding a few photos.
MIN_IMAGES_FOR_WORKERS = 16


@dataclass
class Hit:
    path: Path  # absolute path of the indexed file
    score: float  # cosine similarity
    id: int  # position in the index (ImageIndex.paths[id] == path)


# ----------------------------------------------------------------------------------------------- faiss


def _faiss():
    import faiss

    return faiss


def make_faiss_index(vectors: np.ndarray, approx: bool, kind: str = "ivf",
                     target_recall: float = DEFAULT_TARGET_RECALL, seed: int = 0):
    """-> (faiss index holding `vectors` [N, D] (unit rows), spec dict for index.json)."""
    faiss = _faiss()
    n, d = vectors.shape
    if not approx or n == 0:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, {"type": "IndexFlatIP", "exact": True}
    if kind == "ivf":
        # ~2 sqrt(N) lists (a power of two), at least 39 training points per list as faiss' k-means wants.
        nlist = max(1, min(2 ** round(math.log2(max(2 * math.sqrt(n), 1))), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        train = vectors
        if n > 50 * nlist:  # k-means on a sample: the cost that matters at 1M on a small CPU
            train = vectors[np.random.default_rng(seed).choice(n, 50 * nlist, replace=False)]
        index.train(train)
        index.add(vectors)
        nprobe, recall = _calibrate(vectors, index, "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                                                               if v < nlist] + [nlist], target_recall, seed)
        index.nprobe = nprobe
        return index, {"type": "IndexIVFFlat", "exact": False, "nlist": nlist, "nprobe": nprobe,
                       "train_points": len(train), "calibrated_recall@10": recall, "target_recall@10": target_recall}
    if kind == "hnsw":
        m, ef_construction = 32, 80
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
        ef, recall = _calibrate(vectors, index, "efSearch", [16, 32, 64, 128, 256, 512, 1024], target_recall, seed)
        index.hnsw.efSearch = ef
        return index, {"type": "IndexHNSWFlat", "exact": False, "M": m, "efConstruction": ef_construction,
                       "efSearch": ef, "calibrated_recall@10": recall, "target_recall@10": target_recall}
    raise ClipsnailError(f"unknown approximate index kind {kind!r} (valid: ivf, hnsw)")


def _set_knob(index, knob: str, value: int) -> None:
    if knob == "nprobe":
        index.nprobe = value
    else:
        index.hnsw.efSearch = value


def _calibrate(vectors: np.ndarray, index, knob: str, values: list[int], target: float, seed: int,
               n_queries: int = 500, k: int = 10) -> tuple[int, float]:
    """The smallest knob value whose recall@k against exact search reaches `target`.

    Queries stand in for unseen ones: indexed vectors moved by random noise about as far as a typical vector is
    from its nearest neighbour. (The indexed vectors themselves would flatter HNSW, whose graph links each of them
    to its neighbours: at 5k x 64 it showed recall 0.99 on those and 0.88 on fresh draws.)"""
    faiss = _faiss()
    n, d = vectors.shape
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    base = vectors[rows]
    nn_sim, _ = faiss.knn(base, vectors, min(2, n), metric=faiss.METRIC_INNER_PRODUCT)
    cos = float(np.clip(np.median(nn_sim[:, -1]), 0.05, 0.999)) if n > 1 else 0.9
    noise = rng.standard_normal(base.shape).astype(np.float32) * np.float32(math.sqrt(1 / cos**2 - 1) / math.sqrt(d))
    queries = base + noise  # |noise| ~ tan(angle to the nearest neighbour): cos(query, its vector) ~ cos
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact = faiss.knn(queries, vectors, min(k, n), metric=faiss.METRIC_INNER_PRODUCT)
    truth = [set(r.tolist()) for r in exact]
    best = (values[-1], 0.0)
    for value in values:
        _set_knob(index, knob, value)
        _, found = index.search(queries, min(k, n))
        recall = float(np.mean([len(t & set(f.tolist())) / len(t) for t, f in zip(truth, found)]))
        best = (value, round(recall, 4))
        if recall >= target:
            break
    log.info("calibrated %s=%d: recall@%d %.3f on %d perturbed indexed vectors", knob, best[0], k, best[1], len(rows))
    return best


def _read_faiss(path: Path):
    """-> (index, memory-mapped?). Mapped where this faiss can, else read into memory."""
    faiss = _faiss()
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    if flag is not None:
        try:
            return faiss.read_index(str(path), flag), True
        except RuntimeError as e:
            log.debug("%s: cannot memory-map (%s); reading it into memory", path, e)
    return faiss.read_index(str(path)), False


# ----------------------------------------------------------------------------------------------- files


def _sha1(path: Path, root: Path, follow_links: bool) -> str:
    h = hashlib.sha1()
    # A FIFO or a link out of the root swapped in after the scan is refused here, not waited on or read.
    with os.fdopen(open_regular(path, root, follow_links), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scan(root: Path, allow_empty: bool, follow_links: bool) -> dict[str, tuple[int, int]]:
    """{relative posix path: (size, mtime_ns)} of the image files under root, sorted by path."""
    try:
        paths = list_images(root, follow_links=follow_links)
    except DataError:
        if allow_empty and root.is_dir():
            return {}
        raise
    found = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError as e:  # a dangling link: nothing to index
            log.warning("%s: skipped (%s)", p, e)
            continue
        found[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------------------------- the index


class ImageIndex:
    """A loaded index: `search` with L2-normalised query embeddings, get `Hit(path, cosine score)` lists."""

    def __init__(self, index_dir: Path, meta: dict, rel_paths: list[str], faiss_index, mmap: bool):
        self.index_dir = Path(index_dir)
        self.meta = meta
        self.root = Path(meta["root"])
        self.model_dir = Path(meta["model_dir"]) if meta.get("model_dir") else None
        # The fingerprint of the weights that made the vectors (runs.weights_fingerprint); None in older indexes
        self.model_weights = meta.get("model_weights") if isinstance(meta.get("model_weights"), dict) else None
        self.dim = int(meta["dim"])
        # Symbolic links under the root were indexed (`--follow-links`; only links that stay under the root).
        self.follow_links = bool(meta.get("follow_links", False))
        self.rel_paths = rel_paths
        self.paths = [self.root / r for r in rel_paths]
        self.faiss_index = faiss_index
        self.mmap = mmap
        # None for an index written before catalogues existed, or whose catalogue cannot be read: searchable, not
        # filterable, until `index update` writes it
        self.catalogue, self.catalogue_problem = None, "it was made before photos were catalogued"
        if (self.index_dir / CATALOGUE).is_file():
            try:
                self.catalogue = Catalogue.open(self.index_dir / CATALOGUE)
            except ClipsnailError as e:
                log.warning("%s", e)
                self.catalogue_problem = f"its catalogue cannot be read ({e})"
        self._abs = None
        self._resolved = None

    @classmethod
    def load(cls, index_dir: str | Path) -> ImageIndex:
        index_dir = Path(index_dir)
        recover_dir(index_dir)  # an update killed mid-swap left the previous index beside it
        clean_stale(index_dir)  # and the temp folders of writers that were killed
        if not index_dir.is_dir():
            raise DataError(f"{index_dir}: no such index directory (make one with `clipsnail index build`)")
        meta_path, files_path, faiss_path = index_dir / META, index_dir / FILES, index_dir / FAISS
        for p in (meta_path, files_path, faiss_path):
            if not p.is_file():
                raise DataError(f"{index_dir}: not a clipsnail index (no {p.name})")
        meta = _read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: not a clipsnail index description (no format {FORMAT!r})")
        if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
            raise DataError(f"{meta_path}: index format version {meta.get('version')!r} is not one this clipsnail "
                            f"reads (up to {VERSION}); upgrade clipsnail or rebuild the index")
        for key, kind in (("dim", int), ("count", int), ("root", str), ("faiss", dict)):
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                raise DataError(f"{meta_path}: damaged: {key!r} is missing or not {kind.__name__}")
        files = _read_json(files_path)
        rel_paths = files.get("path") if isinstance(files, dict) else None
        if not isinstance(rel_paths, list) or len(rel_paths) != meta["count"]:
            raise DataError(f"{files_path}: damaged file list (expected {meta['count']} paths)")
        for rel in rel_paths:
            if not _is_inside_name(rel):
                raise DataError(f"{files_path}: damaged: {rel!r} is not a path inside the image folder")
        try:
            faiss_index, mmap = _read_faiss(faiss_path)
        except Exception as e:  # faiss raises RuntimeError with a C++ message for truncated/garbage files
            raise DataError(f"{faiss_path}: cannot read the faiss index ({str(e).strip().splitlines()[0]})") from e
        if faiss_index.ntotal != len(rel_paths) or faiss_index.d != meta["dim"]:
            raise DataError(f"{faiss_path}: holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, but "
                            f"{meta_path.name} says {len(rel_paths)} of dim {meta['dim']}")
        _apply_search_params(faiss_index, meta.get("faiss", {}))
        return cls(index_dir, meta, rel_paths, faiss_index, mmap)

    def other_model(self, model_dir: str | Path | None) -> bool:
        """Whether the run at model_dir is not the one that made these vectors (unknown either side: False)."""
        if model_dir is None or self.model_dir is None:
            return False
        return Path(model_dir).resolve() != self.model_dir.resolve()

    def weights_changed(self) -> bool:
        """Whether the run that made these vectors has other weights now (it trained further, or was replaced)."""
        return self.model_dir is not None and not same_weights(self.model_dir, self.model_weights)

    def check_model(self, model_dir: str | Path | None) -> None:
        """ClipsnailError unless the run at model_dir, as its weights are now, made these vectors: a query vector
        of another model (or of the same run trained further) is not comparable with them."""
        if self.other_model(model_dir):
            raise ClipsnailError(f"{self.index_dir}: its vectors were made by {self.model_dir}, not {model_dir}; "
                                 f"search with that run, or re-encode every image with yours: clipsnail index build "
                                 f"--model {model_dir} --images {self.root} --out {self.index_dir}")
        if self.weights_changed():
            raise ClipsnailError(f"{self.index_dir}: the weights of {self.model_dir} changed since its vectors were "
                                 f"made (trained further?); encode them again: clipsnail index update --index "
                                 f"{self.index_dir}")

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __repr__(self) -> str:
        return f"ImageIndex({self.index_dir}, {len(self)} images, dim {self.dim}, {self.meta['faiss']['type']})"

    def contains(self, path: str | Path) -> bool:
        """True only for files in the index (by resolved path: symlinks and '..' do not matter)."""
        if self._abs is None:
            self._abs = {os.path.abspath(p) for p in self.paths}
        if os.path.abspath(path) in self._abs:
            return True
        if self._resolved is None:
            self._resolved = {os.path.realpath(p) for p in self.paths}
        return os.path.realpath(path) in self._resolved

    def search(self, queries, k: int = 10, filters: Filters | None = None) -> list[list[Hit]]:
        """queries: [Q, D] (or one [D]) L2-normalised float embeddings, torch or numpy -> Q lists of <= k hits,
        best first, score = cosine similarity. filters: only the photos that pass them (`catalogue.parse_filters`),
        k of them whenever k pass: the catalogue selects them, and their vectors are scored exactly."""
        if k < 1:
            raise ClipsnailError(f"k must be at least 1, got {k}")
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ClipsnailError(f"query embeddings have shape {tuple(q.shape)}, but index {self.index_dir} holds "
                                 f"dim-{self.dim} vectors (was it built with another model?)")
        if filters:
            return self._filtered_search(q, k, filters)
        if len(self) == 0:
            return [[] for _ in range(len(q))]
        scores, ids = self.faiss_index.search(q, min(k, len(self)))
        return [[Hit(self.paths[i], float(s), int(i)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def _filtered_search(self, q: np.ndarray, k: int, filters: Filters) -> list[list[Hit]]:
        if self.catalogue is None:
            raise ClipsnailError(f"{self.index_dir}: cannot filter by date, camera, folder or place: "
                                 f"{self.catalogue_problem}; write it (nothing is encoded again): clipsnail index "
                                 f"update --index {self.index_dir}")
        ids = np.asarray(self.catalogue.select_ids(filters), dtype=np.int64)
        ids = ids[ids < len(self)]
        if len(ids) == 0:
            return [[] for _ in range(len(q))]
        scores = q @ np.asarray(self._vector_map[ids], dtype=np.float32).T  # [Q, len(ids)]
        top = min(k, len(ids))
        best = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        out = []
        for row, cols in zip(scores, best):
            cols = cols[np.argsort(-row[cols], kind="stable")]
            out.append([Hit(self.paths[ids[c]], float(row[c]), int(ids[c])) for c in cols])
        return out

    @functools.cached_property  # mapped on the first filtered search, then kept: a search reads only its rows
    def _vector_map(self) -> np.ndarray:
        return _vector_map(self.index_dir / VECTORS, self.dim, len(self))

    def vectors(self) -> torch.Tensor:
        """All stored embeddings [N, D] (read from vectors.safetensors)."""
        return _read_vectors(self.index_dir, self.dim, len(self))


def _apply_search_params(index, spec: dict) -> None:
    if "nprobe" in spec and hasattr(index, "nprobe"):
        index.nprobe = int(spec["nprobe"])
    if "efSearch" in spec and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(spec["efSearch"])


def _is_inside_name(rel) -> bool:
    """A relative path that stays inside its root by its letters alone: no absolute path, no `..`, no empty part.
    (Links are checked when a file is opened.)"""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged index file ({e})") from e


def _vector_map(path: Path, dim: int, count: int) -> np.ndarray:
    """The [count, dim] float32 tensor "vectors" of a safetensors file as a read-only memory map (indexing it reads
    only those rows' pages): the file is an 8-byte header length, a JSON header with the tensor's byte offsets,
    then the raw data."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    spec = header.get("vectors", {})
    start, end = spec.get("data_offsets", (0, 0))
    if spec.get("dtype") != "F32" or spec.get("shape") != [count, dim] or end - start != count * dim * 4:
        raise DataError(f"{path}: holds {spec.get('dtype')} vectors of shape {spec.get('shape')}, expected F32 "
                        f"({count}, {dim})")
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + header_len + start, shape=(count, dim))


def _read_vectors(index_dir: Path, dim: int, count: int) -> torch.Tensor:
    path = index_dir / VECTORS
    try:
        with safe_open(str(path), framework="pt") as f:
            vectors = f.get_tensor("vectors")
    except Exception as e:  # safetensors has its own error types for truncated/corrupt files
        raise DataError(f"{path}: cannot read the stored vectors ({e})") from e
    if tuple(vectors.shape) != (count, dim):
        raise DataError(f"{path}: holds vectors of shape {tuple(vectors.shape)}, expected ({count}, {dim})")
    return vectors.float()


# ----------------------------------------------------------------------------------------------- writing


def is_index_dir(path: Path) -> bool:
    """True when `path` holds an index.json this program wrote (its format marker), whatever else is damaged."""
    meta = read_json_object(path / META)
    return meta is not None and meta.get("format") == FORMAT


def _write_index(out_dir: Path, meta: dict, files: dict, vectors: torch.Tensor, facts: dict[str, PhotoFacts],
                 faiss_index=None, reuse_from: Path | None = None) -> None:
    """Write a complete index into a temp directory next to out_dir, then swap it in (`safeio.staged_dir`: a kill
    at any instant leaves the old index or the new one). faiss_index=None reuses faiss.index and
    vectors.safetensors of `reuse_from` (hard links where possible). A non-empty out_dir that is not an index is
    refused."""
    faiss = _faiss()
    with staged_dir(out_dir, is_ours=is_index_dir, what="clipsnail index") as tmp:
        if faiss_index is None:
            for name in (VECTORS, FAISS):
                try:
                    os.link(reuse_from / name, tmp / name)
                except OSError:
                    shutil.copyfile(reuse_from / name, tmp / name)
        else:
            save_file({"vectors": vectors.float().contiguous()}, str(tmp / VECTORS))
            faiss.write_index(faiss_index, str(tmp / FAISS))
        meta["faiss"]["mmap"] = _read_faiss(tmp / FAISS)[1]  # recorded as measured, not assumed
        write_catalogue(tmp / CATALOGUE, files, facts)
        (tmp / FILES).write_text(json.dumps(files, separators=(",", ":")))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- build / update


def index_bytes(images: int, dim: int) -> int:
    """About what an index of `images` vectors takes on disk: the vectors twice (safetensors and faiss; an IVF or
    HNSW index holds them plus its structure, within that margin), a file-list row each, and 1 MiB."""
    return images * (2 * 4 * dim + 400) + 2**20


def _model_dir(model, model_dir) -> str | None:
    model_dir = model_dir or model.run_dir  # a CLIP model knows its run (None while it trains)
    return str(Path(model_dir).resolve()) if model_dir else None


def _encode(model, root: Path, rels: list[str], batch_size: int, progress: bool, workers: int | None):
    """-> (vectors of the readable ones [M, D], readable mask [len(rels)] bool list).
    Photos are decoded only to about the model's input size (its preprocess resizes the shorter side to
    model.image_size; `load_image`), by `workers` processes (None: `default_workers`) while this one encodes."""
    if not rels:
        return torch.zeros(0, model.embed_dim), []
    workers = default_workers() if workers is None else workers
    if len(rels) < MIN_IMAGES_FOR_WORKERS:
        workers = 0  # starting processes would cost more than decoding these few here
    vectors, readable = encode_image_paths(model, [root / r for r in rels], batch_size=batch_size, progress=progress,
                                           num_workers=workers, min_side=model.image_size, unit="photo")
    return vectors[readable], readable.tolist()


def _hash_all(root: Path, rels: list[str], progress: bool, follow_links: bool) -> dict[str, str]:
    out = {}
    for r in tqdm(rels, desc="hash files", unit="file", disable=not progress or len(rels) < 1000):
        try:
            out[r] = _sha1(root / r, root, follow_links)
        except (OSError, DataError) as e:
            log.warning("%s: cannot read (%s)", root / r, e)
    return out


def _finish(model, out_dir: Path, root: Path, model_dir: str | None, entries: dict[str, tuple],
            unreadable: dict[str, tuple], stats: dict, approx_threshold: int, approx_kind: str,
            target_recall: float, vectors: dict[str, torch.Tensor], rebuild: bool, reuse_from: Path | None,
            follow_links: bool, facts: dict[str, PhotoFacts], created: str | None = None) -> ImageIndex:
    rels = sorted(entries)
    dim = model.embed_dim
    stacked = torch.stack([vectors[r] for r in rels]) if rels else torch.zeros(0, dim)
    faiss_index, spec = None, None
    if rebuild:
        t = time.perf_counter()
        faiss_index, spec = make_faiss_index(stacked.numpy().astype(np.float32, copy=False),
                                             approx=len(rels) >= approx_threshold, kind=approx_kind,
                                             target_recall=target_recall)
        spec["build_seconds"] = round(time.perf_counter() - t, 2)
    else:
        spec = ImageIndex.load(reuse_from).meta["faiss"]
    files = {"path": rels, "size": [entries[r][0] for r in rels], "mtime_ns": [entries[r][1] for r in rels],
             "sha1": [entries[r][2] for r in rels]}
    meta = {"format": FORMAT, "version": VERSION, "root": str(root), "follow_links": follow_links,
            "model_dir": model_dir, "model_weights": weights_fingerprint(model_dir) if model_dir else None, "dim": dim,
            "count": len(rels), "faiss": {**spec, "approx_threshold": approx_threshold, "approx_kind": approx_kind},
            "num_unreadable": len(unreadable),
            "unreadable": [{"path": r, "size": s, "mtime_ns": m} for r, (s, m) in sorted(unreadable.items())],
            "created": created or _now(), "updated": _now(), "last_stats": stats}
    _write_index(out_dir, meta, files, stacked, facts, faiss_index, reuse_from)
    return ImageIndex.load(out_dir)


def _one_writer(folder_arg: str):
    """Runs the decorated function under the writer lock (safeio.writer_lock) of the index its argument
    `folder_arg` names: two builds or updates of one index at once would each encode, and the last rename wins."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments[folder_arg]
            with writer_lock(Path(folder).absolute(), "index"):
                return function(*args, **kwargs)
        return locked
    return decorate


@_one_writer("out_dir")
def build_index(model, images_dir: str | Path, out_dir: str | Path, batch_size: int = 64, progress: bool = True,
                approx_threshold: int = DEFAULT_APPROX_THRESHOLD, approx_kind: str = "ivf",
                target_recall: float = DEFAULT_TARGET_RECALL, model_dir: str | Path | None = None,
                follow_links: bool = False, workers: int | None = None) -> tuple[ImageIndex, dict]:
    """Encode every image under images_dir (recursively) into a new index at out_dir (replacing one there).
    model_dir: the run the model came from (default: `model.run_dir`, set by `clipsnail.load`).
    workers: processes decoding photos while the model encodes (None: `default_workers()`; 0: none).
    -> (the index, stats {added, changed, removed, moved, unchanged, unreadable, total, encoded, seconds})."""
    t = time.perf_counter()
    root = Path(images_dir).absolute()
    check_replaceable(out_dir, is_index_dir, "clipsnail index")  # before the (slow) encoding
    found = _scan(root, allow_empty=False, follow_links=follow_links)
    check_free_space(out_dir, index_bytes(len(found), model.embed_dim), f"an index of {len(found)} images")
    rels = list(found)
    sha1 = _hash_all(root, rels, progress, follow_links)
    rels = [r for r in rels if r in sha1]
    vecs, readable = _encode(model, root, rels, batch_size, progress, workers)
    good = [r for r, ok in zip(rels, readable) if ok]
    good_set = set(good)
    unreadable = {r: found[r] for r in found if r not in good_set}
    entries = {r: (*found[r], sha1[r]) for r in good}
    stats = {"added": len(good), "changed": 0, "removed": 0, "moved": 0, "unchanged": 0,
             "unreadable": len(unreadable), "total": len(good), "encoded": len(good)}
    facts = read_all_facts(root, good, follow_links, progress=progress)
    index = _finish(model, Path(out_dir), root, _model_dir(model, model_dir), entries, unreadable, stats,
                    approx_threshold, approx_kind, target_recall, dict(zip(good, vecs)), rebuild=True,
                    reuse_from=None, follow_links=follow_links, facts=facts)
    stats["seconds"] = round(time.perf_counter() - t, 2)
    log.info("indexed %d images under %s (%d unreadable skipped): %s", len(good), root, len(unreadable), index)
    return index, stats


@_one_writer("index_dir")
def update_index(model, index_dir: str | Path, batch_size: int = 64, progress: bool = True,
                 approx_threshold: int | None = None, workers: int | None = None) -> tuple[ImageIndex, dict]:
    """Bring an index up to date with its folder: encode new and changed files (changed: size or mtime differ and
    the sha1 confirms), drop deleted ones, keep every other vector as stored. Writes nothing when nothing changed.
    A new path holding the bytes (sha1) of an indexed photo, moved, renamed or copied, takes that photo's vector
    and is not encoded. The model must be the run that made the index (ClipsnailError otherwise); when that run's
    weights changed since, every image is encoded again. workers: as for `build_index`.
    -> (the index, stats {added, changed, removed, moved (new paths of photos whose old path is gone: neither added
    nor removed), unchanged, unreadable, total, reencoded (unchanged files encoded again for new weights), encoded
    (images encoded by this update), written (whether a new index was written), seconds})."""
    t = time.perf_counter()
    index_dir = Path(index_dir)
    old = ImageIndex.load(index_dir)
    if model.embed_dim != old.dim or old.other_model(model.run_dir):
        made_by = f"dim-{old.dim} vectors of {old.model_dir}" if old.model_dir else f"dim-{old.dim} vectors"
        raise ClipsnailError(f"{index_dir} holds {made_by}; `index update` adds to them with that run only (its "
                             f"default). To encode every image with {model.run_dir or 'this model'} instead: "
                             f"clipsnail index build --model RUN --images {old.root} --out {index_dir}")
    # The same run with other weights (it trained further): every vector is encoded again, none is mixed in.
    encode_all = old.weights_changed()
    if encode_all:
        log.warning("%s: the weights of %s changed since the index was made: encoding every image again",
                    index_dir, old.model_dir)
    old_vectors = old.vectors()
    files = _read_json(index_dir / FILES)
    old_entries = {r: (s, m, h) for r, s, m, h in zip(files["path"], files["size"], files["mtime_ns"], files["sha1"])}
    old_unreadable = {u["path"]: (u["size"], u["mtime_ns"]) for u in old.meta.get("unreadable", [])}
    root = old.root
    found = _scan(root, allow_empty=True, follow_links=old.follow_links)
    # An update writes a whole new index beside the old one, then swaps them.
    check_free_space(index_dir, index_bytes(len(found), old.dim), f"an index of {len(found)} images")

    candidates = [r for r in found if r in old_entries and found[r] != old_entries[r][:2]]
    sha1 = _hash_all(root, [r for r in found if r not in old_entries and r not in old_unreadable] + candidates
                     + [r for r in found if r in old_unreadable and found[r] != old_unreadable[r]], progress,
                     old.follow_links)
    plan = _plan_update(found, old_entries, old_unreadable, sha1, old_vectors, old.rel_paths, encode_all)
    entries, vectors, unreadable, todo = plan.entries, plan.vectors, plan.unreadable, plan.todo
    changed, touched, reencoded, moved = plan.changed, plan.touched, plan.reencoded, plan.moved
    new_vecs, readable = _encode(model, root, todo, batch_size, progress, workers)
    for r, v in zip([r for r, ok in zip(todo, readable) if ok], new_vecs):
        entries[r], vectors[r] = (*found[r], sha1[r]), v
    for r, ok in zip(todo, readable):
        if not ok:
            unreadable[r] = found[r]
    moved_from = set(moved.values())
    removed = [r for r in old_entries if r not in entries and r not in moved_from]
    added = [r for r in entries if r not in old_entries and r not in moved]
    n_changed = sum(1 for r in changed if r in entries)
    stats = {"added": len(added), "changed": n_changed, "removed": len(removed), "moved": len(moved),
             "unchanged": len(entries) - len(added) - n_changed - len(moved), "unreadable": len(unreadable),
             "total": len(entries), "reencoded": sum(1 for r in reencoded if r in entries),
             "encoded": int(len(new_vecs))}
    threshold = approx_threshold if approx_threshold is not None else old.meta["faiss"].get(
        "approx_threshold", DEFAULT_APPROX_THRESHOLD)
    vectors_changed = bool(added or n_changed or removed or reencoded or moved)
    # An index written before catalogues existed gets one: its photos' facts are read, none is encoded again.
    if vectors_changed or touched or old.catalogue is None or unreadable != old_unreadable or \
            threshold != old.meta["faiss"].get("approx_threshold"):
        spec = old.meta["faiss"]
        rebuild = vectors_changed or (len(entries) >= threshold) != (not spec.get("exact", True))
        unchanged = old_facts(old, entries, old_entries)
        facts = read_all_facts(root, sorted(entries), old.follow_links, known=unchanged, progress=progress)
        index = _finish(model, index_dir, root, old.meta.get("model_dir"), entries, unreadable, stats, threshold,
                        spec.get("approx_kind", "ivf"), spec.get("target_recall@10", DEFAULT_TARGET_RECALL),
                        vectors, rebuild=rebuild, reuse_from=None if rebuild else index_dir,
                        follow_links=old.follow_links, facts=facts, created=old.meta.get("created"))
    else:
        index = old
    stats["written"] = index is not old  # False: the index was up to date, and nothing was written
    stats["seconds"] = round(time.perf_counter() - t, 2)
    log.info("updated %s: %s", index_dir, stats)
    return index, stats


@dataclass
class _UpdatePlan:
    """What an update does with each file found: keep (entries, vectors), encode (todo), or skip (unreadable)."""

    entries: dict = field(default_factory=dict)  # rel -> (size, mtime_ns, sha1)
    vectors: dict = field(default_factory=dict)  # rel -> the kept vector
    unreadable: dict = field(default_factory=dict)  # rel -> (size, mtime_ns)
    todo: list = field(default_factory=list)  # rels to encode
    changed: set = field(default_factory=set)  # of todo: indexed files whose bytes changed
    reencoded: set = field(default_factory=set)  # of todo: unchanged files, encoded again for new weights
    moved: dict = field(default_factory=dict)  # new rel -> the rel its bytes had, now gone
    touched: bool = False  # a file's mtime changed but not its bytes


def _plan_update(found, old_entries, old_unreadable, sha1, old_vectors, old_rels, encode_all) -> _UpdatePlan:
    plan, row = _UpdatePlan(), {r: i for i, r in enumerate(old_rels)}
    # A new path with the bytes of an indexed photo (moved, renamed or copied) takes that photo's vector.
    by_hash = {} if encode_all else {h: r for r, (_, _, h) in old_entries.items()}
    for r, stamp in found.items():
        if r in old_entries:
            if stamp == old_entries[r][:2] and encode_all:
                plan.todo.append(r)
                plan.reencoded.add(r)
                sha1[r] = old_entries[r][2]
            elif stamp == old_entries[r][:2]:
                plan.entries[r], plan.vectors[r] = old_entries[r], old_vectors[row[r]]
            elif r in sha1 and sha1[r] == old_entries[r][2]:  # touched, same bytes: keep the vector
                plan.entries[r], plan.vectors[r], plan.touched = (*stamp, sha1[r]), old_vectors[row[r]], True
            elif r in sha1:
                plan.todo.append(r)
                plan.changed.add(r)
            else:
                plan.unreadable[r] = stamp
        elif r in old_unreadable and stamp == old_unreadable[r]:
            plan.unreadable[r] = stamp  # still the same unreadable file: not tried again
        elif r in sha1 and sha1[r] in by_hash:
            source = by_hash[sha1[r]]
            plan.entries[r], plan.vectors[r] = (*stamp, sha1[r]), old_vectors[row[source]]
            if source not in found:
                plan.moved[r] = source
        elif r in sha1:
            plan.todo.append(r)
        else:
            plan.unreadable[r] = stamp
    return plan


def old_facts(old: ImageIndex, entries: dict[str, tuple], old_entries: dict[str, tuple]) -> dict[str, PhotoFacts]:
    """The facts an update keeps from the old catalogue: those of files whose size, mtime and hash are as
    catalogued."""
    if old.catalogue is None:
        return {}
    kept = facts_by_path(old.catalogue)
    return {r: f for r, f in kept.items() if r in entries and entries[r] == old_entries.get(r)}


def folder_index(model, folder: str | Path, cache_dir: str | Path, batch_size: int = 64,
                 progress: bool = True, follow_links: bool = False) -> ImageIndex:
    """The index of `folder` kept in cache_dir/<hash of the folder path>/: built the first time, then updated
    (only new and changed files are encoded). This is what `clipsnail search --images DIR` uses."""
    folder = Path(folder).resolve()
    out = Path(cache_dir) / hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    if (out / META).is_file():
        try:
            index = ImageIndex.load(out)
            if (index.dim == model.embed_dim and index.root == folder and index.follow_links == follow_links
                    and not index.other_model(model.run_dir)):
                return update_index(model, out, batch_size=batch_size, progress=progress)[0]
        except DataError as e:  # a damaged cache is only a cache: rebuild it
            log.warning("rebuilding the embedding cache %s (%s)", out, e)
    return build_index(model, folder, out, batch_size=batch_size, progress=progress, follow_links=follow_links)[0]

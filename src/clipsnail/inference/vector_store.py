"""The vectors of an image index on disk, and the search over them: exact, or an inverted file (IVF).

Files, in the index folder (how many rows are committed is recorded in the catalogue, whose transaction is the
commit point of every change):

    vectors.f32    [rows, D] little-endian float32 unit vectors, row-major; only ever appended to
    lists.i32      [rows] little-endian int32: the inverted list of each row (IVF only); only ever appended to
    centroids.f32  [nlist, D] float32: the k-means centres of the lists (IVF only)

A writer cuts the files back to the committed rows (a writer killed before its commit leaves rows past them),
appends, flushes to disk, and only then commits the catalogue. Readers map the committed rows and never see the
rest. A deleted or changed photo leaves its row behind, dead (no catalogue row names it); `write_store` writes a
new folder without them (compaction), and retrains the lists.

IVF as in faiss' IndexIVFFlat, kept in plain files so that adding a photo appends a row instead of rewriting
the structure: nlist ~ 2 sqrt(N) spherical k-means centres (faiss.Kmeans, trained on a sample of at most 50 points
a list); a vector belongs to the list of its nearest centre (inner product); a query scores the centres, takes the
`nprobe` best lists and scores their vectors exactly. The rows of a new store are grouped by list, so a probe reads
contiguous runs of the file. `nprobe` is calibrated on the stored vectors to reach a target recall@10 against
exact search.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path

import numpy as np

from clipsnail.core.errors import DataError

log = logging.getLogger(__name__)

VECTORS, LISTS, CENTROIDS = "vectors.f32", "lists.i32", "centroids.f32"
CHUNK_ROWS = 1 << 15  # rows scored or copied at once: bounds the memory of a scan of any size
KMEANS_ITERATIONS = 20
MIN_POINTS_PER_LIST = 39  # faiss' k-means warns below this many training points per centre
TRAIN_POINTS_PER_LIST = 50


def nlist_for(n: int) -> int:
    """~2 sqrt(n) lists, a power of two, with at least MIN_POINTS_PER_LIST training points each."""
    return max(1, min(2 ** round(math.log2(max(2 * math.sqrt(n), 1))), n // MIN_POINTS_PER_LIST))


def _map(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of the first prod(shape) items of `path` (it may hold more: uncommitted rows)."""
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if needed == 0:
        return np.zeros(shape, dtype=dtype)
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read the index's stored vectors ({e.strerror or e})") from None
    if size < needed:
        raise DataError(f"{path}: damaged: {size} bytes, but the catalogue commits {needed}")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class VectorStore:
    """The committed rows of one state of an index, memory-mapped, and the search over the live ones.

    layout: {"type": "exact"} or {"type": "ivf", "nlist": ..., "nprobe": ...}; dead: rows no photo holds."""

    def __init__(self, folder: Path, dim: int, rows: int, dead: np.ndarray, layout: dict):
        self.folder, self.dim, self.rows, self.layout = Path(folder), dim, rows, layout
        self.vectors = _map(self.folder / VECTORS, "<f4", (rows, dim))
        self.live = np.ones(rows, dtype=bool)
        dead = np.asarray(dead, dtype=np.int64)
        if len(dead) and (dead.min() < 0 or dead.max() >= rows):
            raise DataError(f"{self.folder}: damaged: a deleted row outside the {rows} stored")
        self.live[dead] = False
        self.ivf = layout.get("type") == "ivf"
        if self.ivf:
            self.nlist, self.nprobe = int(layout["nlist"]), int(layout["nprobe"])
            self.centroids = np.array(_map(self.folder / CENTROIDS, "<f4", (self.nlist, dim)))
            self.lists = _map(self.folder / LISTS, "<i4", (rows,))
            if rows and (int(self.lists.min()) < 0 or int(self.lists.max()) >= self.nlist):
                raise DataError(f"{self.folder / LISTS}: damaged: a list number outside 0..{self.nlist - 1}")

    @functools.cached_property  # on the first search: about as long as reading lists.i32
    def inverted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each list lies: (its run in the grouped rows that `write_store` wrote [nlist + 1], the appended rows
        ordered by list, where each list starts among those [nlist + 1])."""
        grouped = min(int(self.layout.get("trained_rows", 0)), self.rows)
        head = np.asarray(self.lists[:grouped])
        if grouped and not (head[1:] >= head[:-1]).all():  # not grouped after all: every row is searched as appended
            grouped, head = 0, head[:0]
        tail = np.asarray(self.lists[grouped:])
        order = np.argsort(tail, kind="stable")
        lists = np.arange(self.nlist + 1)
        return np.searchsorted(head, lists), grouped + order, np.searchsorted(tail[order], lists)

    def probe(self, query: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best live rows of the `nprobe` lists whose centres are nearest `query` [D] -> (scores [1, k],
        rows [1, k]). A list's grouped rows are scored where they lie in the map (no copy); appended rows are
        gathered."""
        runs, appended, starts = self.inverted
        if nprobe < self.nlist:
            lists = np.argpartition(-(self.centroids @ query), nprobe - 1)[:nprobe]
        else:
            lists = np.arange(self.nlist)
        scores, rows = [], []
        for i in lists:
            if runs[i + 1] > runs[i]:
                scores.append(np.asarray(self.vectors[runs[i]:runs[i + 1]], dtype=np.float32) @ query)
                rows.append(np.arange(runs[i], runs[i + 1]))
            if starts[i + 1] > starts[i]:
                extra = np.sort(appended[starts[i]:starts[i + 1]])
                scores.append(np.asarray(self.vectors[extra], dtype=np.float32) @ query)
                rows.append(extra)
        score = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        score[~self.live[row]] = -np.inf
        return best_of(score, row, k)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k], rows [Q, k]), best first; -inf and -1 where fewer than k qualify."""
        if not self.ivf:
            return top_k(queries, self.vectors, k, live=self.live)
        nprobe = self.nprobe if nprobe is None else nprobe
        found = [self.probe(q, k, nprobe) for q in queries]
        return np.concatenate([s for s, _ in found]), np.concatenate([r for _, r in found])


def best_of(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of one query's `scores` [n] of `rows` [n] -> (scores [1, k], rows [1, k]), best first, padded
    with -inf/-1 (as `top_k`)."""
    keep = min(k, len(scores))
    top = np.argpartition(-scores, keep - 1)[:keep] if keep else np.zeros(0, np.int64)
    top = top[np.argsort(-scores[top], kind="stable")]
    best_scores = np.full(k, -np.inf, dtype=np.float32)
    best_rows = np.full(k, -1, dtype=np.int64)
    best_scores[:keep] = scores[top]
    best_rows[:keep] = np.where(np.isfinite(scores[top]), rows[top], -1)
    return best_scores[None], best_rows[None]


def top_k(queries: np.ndarray, vectors: np.ndarray, k: int, rows: np.ndarray | None = None,
          live: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `vectors` (of `rows` only, or the `live` ones) with the largest inner product with each query,
    scored exactly CHUNK_ROWS rows at a time. -> (scores [Q, k], rows [Q, k]), best first, padded with -inf/-1."""
    n = len(vectors) if rows is None else len(rows)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, n, CHUNK_ROWS):
        if rows is None:
            ids = np.arange(start, min(n, start + CHUNK_ROWS))
            scores = queries @ np.asarray(vectors[start:start + CHUNK_ROWS], dtype=np.float32).T
            if live is not None:
                scores[:, ~live[start:start + CHUNK_ROWS]] = -np.inf
        else:
            ids = rows[start:start + CHUNK_ROWS]
            scores = queries @ np.asarray(vectors[ids], dtype=np.float32).T
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_rows, np.broadcast_to(ids, scores[:, best_rows.shape[1]:].shape)], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores, best_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    best_scores, best_rows = np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)
    best_rows = np.where(np.isfinite(best_scores), best_rows, -1)
    pad = k - best_scores.shape[1]
    if pad > 0:
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-1)
    return best_scores, best_rows


# ----------------------------------------------------------------------------------------------- writing


def _open_for_append(path: Path) -> int:
    # Never through a link planted at the name: the index folder holds only files this program wrote.
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)


def _append(path: Path, data) -> None:
    """Append an array, or each array of an iterable (written as they come), then flush the file to disk once."""
    fd = _open_for_append(path)
    try:
        for block in [data] if isinstance(data, np.ndarray) else data:
            view = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)  # on disk before the catalogue commits the rows
    finally:
        os.close(fd)


def cut_to_committed(folder: Path, rows: int, dim: int, ivf: bool) -> None:
    """Cut vectors.f32 (and lists.i32) back to the committed rows: what a writer killed before its commit left
    past them. Fewer bytes than committed is damage, not a leftover."""
    for name, width in ((VECTORS, 4 * dim), (LISTS, 4)) if ivf else ((VECTORS, 4 * dim),):
        path = folder / name
        size = os.stat(path).st_size if os.path.lexists(path) else 0
        if size < rows * width:
            raise DataError(f"{path}: damaged: {size} bytes, but the catalogue commits {rows * width}")
        if size > rows * width:
            fd = _open_for_append(path)
            try:
                os.ftruncate(fd, rows * width)
            finally:
                os.close(fd)


def assign(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The list (nearest centre by inner product) of each vector [N, D] -> int32 [N]."""
    out = np.empty(len(vectors), dtype=np.int32)
    for start in range(0, len(vectors), CHUNK_ROWS):
        block = np.asarray(vectors[start:start + CHUNK_ROWS], dtype=np.float32)
        out[start:start + len(block)] = np.argmax(block @ centroids.T, axis=1)
    return out


def append_rows(store: VectorStore, vectors: np.ndarray) -> None:
    """Append `vectors` [M, D] after the committed rows of `store` (cut back first), each with its list."""
    cut_to_committed(store.folder, store.rows, store.dim, store.ivf)
    if len(vectors) == 0:
        return
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if store.ivf:
        _append(store.folder / LISTS, assign(store.centroids, vectors).astype("<i4"))
    _append(store.folder / VECTORS, vectors)


def write_store(folder: Path, source: np.ndarray, rows: np.ndarray, approx: bool, target_recall: float,
                seed: int = 0) -> tuple[dict, np.ndarray]:
    """A new store in the empty `folder` holding source[rows] (a memory map is read CHUNK_ROWS rows at a time):
    exact, or an IVF trained on them (`approx`) with nprobe calibrated to `target_recall`.
    -> (layout, order): new row i holds source row rows[order[i]]."""
    dim, n = source.shape[1], len(rows)
    if not approx or n == 0:
        order = np.arange(n)
        layout: dict = {"type": "exact"}
        centroids = None
    else:
        import faiss

        nlist = nlist_for(n)
        sample = np.sort(np.random.default_rng(seed).choice(n, min(n, TRAIN_POINTS_PER_LIST * nlist),
                                                            replace=False))
        kmeans = faiss.Kmeans(dim, nlist, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False)
        kmeans.train(np.ascontiguousarray(source[rows[sample]], dtype=np.float32))
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        lists = np.concatenate([assign(centroids, source[rows[s:s + CHUNK_ROWS]]) for s in range(0, n, CHUNK_ROWS)])
        order = np.argsort(lists, kind="stable")  # rows grouped by list: a probe reads runs of the file
        _append(folder / CENTROIDS, centroids)
        _append(folder / LISTS, lists[order].astype("<i4"))
        layout = {"type": "ivf", "nlist": nlist, "nprobe": nlist, "trained_rows": n, "train_points": len(sample)}
    _append(folder / VECTORS, (np.asarray(source[rows[order[start:start + CHUNK_ROWS]]], dtype="<f4")
                               for start in range(0, n, CHUNK_ROWS)))  # creates the file when n == 0 too
    if centroids is not None:
        layout.update(calibrate(VectorStore(folder, dim, n, np.zeros(0, np.int64), layout), target_recall, seed))
    return layout, order


def calibrate(store: VectorStore, target: float, seed: int = 0, n_queries: int = 500, k: int = 10) -> dict:
    """The smallest nprobe whose recall@k against exact search reaches `target`, on the live rows of `store`.
    -> {"nprobe", "calibrated_recall@10", "target_recall@10", "calibrated_rows"}.

    Queries stand in for unseen ones: stored vectors moved by random noise about as far as a typical vector is from
    its nearest neighbour (the stored vectors themselves would flatter the search)."""
    live = np.flatnonzero(store.live)
    rng = np.random.default_rng(seed + 1)
    base = np.asarray(store.vectors[np.sort(rng.choice(live, min(n_queries, len(live)), replace=False))],
                      dtype=np.float32)
    nearest, _ = top_k(base, store.vectors, min(2, len(live)), live=store.live)
    cos = float(np.clip(np.median(nearest[:, -1]), 0.05, 0.999)) if len(live) > 1 else 0.9
    noise = rng.standard_normal(base.shape).astype(np.float32) * np.float32(math.sqrt(1 / cos**2 - 1)
                                                                            / math.sqrt(store.dim))
    queries = base + noise  # |noise| ~ tan(angle to the nearest neighbour): cos(query, its vector) ~ cos
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    kk = min(k, len(live))
    truth = [set(r.tolist()) for r in top_k(queries, store.vectors, kk, live=store.live)[1]]
    values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256) if v < store.nlist] + [store.nlist]
    nprobe, recall = values[-1], 0.0
    for nprobe in values:
        found = store.search(queries, kk, nprobe=nprobe)[1]
        recall = round(float(np.mean([len(t & set(f.tolist())) / len(t) for t, f in zip(truth, found)])), 4)
        if recall >= target:
            break
    log.info("calibrated nprobe=%d: recall@%d %.3f on %d perturbed stored vectors", nprobe, k, recall, len(base))
    return {"nprobe": nprobe, "calibrated_recall@10": recall, "target_recall@10": target,
            "calibrated_rows": len(live)}

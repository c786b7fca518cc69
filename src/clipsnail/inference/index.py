"""A persistent, searchable index of the CLIP image embeddings of a folder (recursively): a library that lives
with the photos, updated at the cost of what changed.

An index is a directory (format 2):

    index.json        the format marker: {"format": "clipsnail-image-index", "version": 2}
    catalogue.sqlite  the commit point (`clipsnail.inference.catalogue`, SQLite in WAL mode): one row per photo
                      (path relative to the root, size, mtime, sha1, what its EXIF says, its vector row), the
                      files that could not be read, the dead vector rows, and the index state (the image root,
                      the run that made the vectors and its weights' fingerprint, the committed vector rows, the
                      search structure)
    vectors.f32 ...   the vectors and the inverted file (`clipsnail.inference.vector_store`), append-only

An update compares the folder with the catalogue (a walk and one stat a file; sha1 only for files whose size or
mtime changed), encodes the new and changed photos, appends their vectors, and commits the catalogue in one
transaction. A photo moved, renamed or copied keeps or copies its vector (same sha1) and is not encoded again.
A deleted or changed photo leaves a dead row; when a quarter of the rows are dead, when the photos have doubled
since the lists were trained, or when the index crosses `approx_threshold`, the update writes the index anew
beside the old one and swaps it in (`safeio.staged_dir`), ids kept. A kill -9 at any instant leaves the old state
or the new one: rows appended past the committed count are cut off by the next writer.

Below `approx_threshold` photos the search is exact; at and above it, an inverted file whose `nprobe` is
calibrated to `target_recall` recall@10 against exact search, and recalibrated when the photos grew by a tenth.
A filtered search asks the catalogue which rows pass and scores exactly those.

A loaded `ImageIndex` is a snapshot of one committed state (a read transaction on the catalogue): an update
committed meanwhile is seen by the next `load`. Nothing is held per photo: vectors are memory-mapped, the paths
of the hits are read from the catalogue.

Indexes of format 1 (files.json, vectors.safetensors, faiss.index) are upgraded in place by the first load: the
same vectors and facts, written as format 2 beside it and swapped in; nothing is encoded again.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from clipsnail.core.config import ENCODE_BATCH
from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.core.fingerprint import same_weights, weights_fingerprint
from clipsnail.core.safeio import (
    DiskError,
    check_free_space,
    check_replaceable,
    clean_stale,
    disk_error,
    open_regular,
    read_json_object,
    recover_dir,
    staged_dir,
    writer_lock,
)
from clipsnail.data.images import IMAGE_EXTENSIONS, default_workers, walk_images
from clipsnail.data.photo_facts import PhotoFacts
from clipsnail.inference.catalogue import Catalogue, Filters, facts_by_path, read_all_facts
from clipsnail.inference.vector_store import VectorStore, append_rows, calibrate, top_k, write_store

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT, VERSION = "clipsnail-image-index", 2
META, CATALOGUE = "index.json", "catalogue.sqlite"
# An ONNX export of the run that made the vectors (clipsnail.apps.export writes it, after a build or an update):
# text and image queries encoded with onnxruntime, without PyTorch.
QUERY_ENCODER = "query_encoder"
DEFAULT_APPROX_THRESHOLD = 20_000  # below it an exact scan is about as fast as a probe (bench/index.py), and exact
DEFAULT_TARGET_RECALL = 0.95
# Fewer new images than this are decoded in the encoding process itself (`_encode`): starting worker processes
# (each imports torch) costs more than decoding a few photos.
MIN_IMAGES_FOR_WORKERS = 16
DEAD_FRACTION_FOR_COMPACTION = 0.25  # rows of deleted or changed photos, of all rows
GROWTH_FOR_RETRAINING = 2.0  # photos, over those the lists were trained on
GROWTH_FOR_RECALIBRATION = 1.1  # photos, over those nprobe was calibrated on
NPROBE_GROWTH_FOR_RETRAINING = 4  # a recalibrated nprobe this many times the trained one: the lists no longer fit


@dataclass
class Hit:
    path: Path  # absolute path of the indexed file
    score: float  # cosine similarity
    id: int  # the photo's id in the catalogue: kept across updates while the file (or its moved bytes) stays


# ----------------------------------------------------------------------------------------------- the index


class ImageIndex:
    """A loaded index (one committed state): `search` with L2-normalised query embeddings, get `Hit(path, cosine
    score, id)` lists."""

    def __init__(self, index_dir: Path, catalogue: Catalogue, state: dict, store: VectorStore):
        self.index_dir, self.catalogue, self.meta, self.store = Path(index_dir), catalogue, state, store
        self.root = Path(state["root"])
        self.model_dir = Path(state["model_dir"]) if state.get("model_dir") else None
        # The fingerprint of the weights that made the vectors (runs.weights_fingerprint)
        self.model_weights = state.get("model_weights") if isinstance(state.get("model_weights"), dict) else None
        self.dim = int(state["dim"])
        # Symbolic links under the root were indexed (`--follow-links`; only links that stay under the root).
        self.follow_links = bool(state.get("follow_links", False))
        self.structure = state["structure"]
        self._lock = threading.Lock()  # one catalogue connection serves the web app's threads

    @classmethod
    def load(cls, index_dir: str | Path, upgrade: bool = True) -> ImageIndex:
        """The index at index_dir as committed now. An index of format 1 is upgraded first (`upgrade`, under
        its writer lock; a writer that holds it passes False after upgrading)."""
        index_dir = Path(index_dir)
        recover_dir(index_dir)  # a rewrite killed mid-swap left the previous index beside it
        clean_stale(index_dir)  # and the temp folders of writers that were killed
        if not index_dir.is_dir():
            raise DataError(f"{index_dir}: no such index directory (make one with `clipsnail index build`)")
        if _format_version(index_dir) == 1:
            if not upgrade:
                raise DataError(f"{index_dir}: an index of format 1; load it to upgrade it")
            with writer_lock(index_dir.absolute(), "index", wait=True):
                upgrade_v1(index_dir)
        try:
            catalogue = Catalogue.open(index_dir / CATALOGUE)
            catalogue.snapshot()
            state = _check_state(catalogue.state(), index_dir / CATALOGUE)
            dead = catalogue.dead_rows()
            if len(dead) != state["rows"] - state["photos"]:
                raise DataError(f"{index_dir / CATALOGUE}: damaged: {len(dead)} dead rows, but {state['rows']} rows "
                                f"for {state['photos']} photos")
            store = VectorStore(index_dir, state["dim"], state["rows"], dead, state["structure"])
        except ClipsnailError as e:
            raise e if isinstance(e, DataError) else DataError(str(e)) from None
        except sqlite3.DatabaseError as e:  # pages damaged past the header
            raise DataError(f"{index_dir / CATALOGUE}: cannot read the catalogue ({e})") from None
        return cls(index_dir, catalogue, state, store)

    def close(self) -> None:
        """End the snapshot (a loaded index holds a read transaction: the catalogue keeps this state for it)."""
        self.catalogue.close()

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

    def query_encoder(self) -> Path | None:
        """The folder of the index's query encoder (QUERY_ENCODER), when it was exported from the weights that made
        the vectors; None when there is none, or one of other weights."""
        folder = self.index_dir / QUERY_ENCODER
        recorded = self.meta.get("query_encoder")
        if not recorded or recorded != self.model_weights or folder.is_symlink() or \
                not (folder / "preprocess.json").is_file():
            return None
        return folder

    def __len__(self) -> int:
        return int(self.meta["photos"])

    def __repr__(self) -> str:
        return f"ImageIndex({self.index_dir}, {len(self)} images, dim {self.dim}, {self.structure['type']})"

    # ------------------------------------------------------------------------------------------- photos

    def _query(self, function, *args):
        with self._lock:
            return function(*args)

    def _path(self, rel: str) -> Path:
        if not _is_inside_name(rel):
            raise DataError(f"{self.index_dir / CATALOGUE}: damaged: {rel!r} is not a path inside the image folder")
        return self.root / rel

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """The ids of the photos, ascending (read on first use: a search needs none of them)."""
        rows = self._query(lambda: self.catalogue.db.execute("SELECT id FROM photos ORDER BY id").fetchall())
        return np.array([i for (i,) in rows], dtype=np.int64)

    @functools.cached_property
    def _in_id_order(self) -> tuple[np.ndarray, list[str]]:
        """(the vector rows, the relative paths) of every photo, in id order."""
        found = self._query(self.catalogue.photos, self.ids.tolist())
        rows = [found[i] for i in self.ids.tolist()]
        return np.array([r for r, _ in rows], dtype=np.int64), [rel for _, rel in rows]

    @property
    def rel_paths(self) -> list[str]:
        """Every photo's path relative to the root, in id order (a list as long as the library)."""
        return self._in_id_order[1]

    @functools.cached_property
    def paths(self) -> list[Path]:
        """Every photo's absolute path, in id order (`rel_paths`)."""
        return [self._path(r) for r in self.rel_paths]

    def rel_path(self, photo_id: int) -> str | None:
        found = self._query(self.catalogue.photos, [photo_id])
        return found[photo_id][1] if photo_id in found else None

    def path_of(self, photo_id: int) -> Path | None:
        """The absolute path of photo `photo_id`, None when there is no such photo."""
        rel = self.rel_path(photo_id)
        return None if rel is None else self._path(rel)

    def id_of(self, rel: str) -> int | None:
        """The id of the photo at `rel` (relative to the root), None when it is not indexed."""
        return self._query(self.catalogue.id_of, rel)

    def id_shown_as(self, shown: str, display: Callable[[str], str]) -> int | None:
        """The id of the photo whose relative path `display` shows as `shown` (a name that is not UTF-8, shown with
        U+FFFD): a scan of the catalogue, for the rare query that names one."""
        def scan():
            for i, path in self.catalogue.db.execute("SELECT id, path FROM photos"):
                if display(os.fsdecode(path)) == shown:
                    return i
            return None
        return self._query(scan)

    def vector(self, photo_id: int) -> np.ndarray | None:
        """The stored embedding [D] of photo `photo_id`."""
        found = self._query(self.catalogue.photos, [photo_id])
        return np.array(self.store.vectors[found[photo_id][0]], dtype=np.float32) if photo_id in found else None

    def vectors(self) -> torch.Tensor:
        """Every stored embedding [N, D], in id order (as `paths`)."""
        import torch

        rows = self._in_id_order[0]
        return torch.from_numpy(np.array(self.store.vectors[rows], dtype=np.float32)).reshape(-1, self.dim)

    def contains(self, path: str | Path) -> bool:
        """True only for files in the index (by resolved path: symlinks and '..' do not matter)."""
        for candidate, root in ((os.path.abspath(path), os.path.abspath(self.root)),
                                (os.path.realpath(path), os.path.realpath(self.root))):
            rel = os.path.relpath(candidate, root)
            if _is_inside_name(rel.replace(os.sep, "/")) and self.id_of(rel.replace(os.sep, "/")) is not None:
                return True
        return False

    # ------------------------------------------------------------------------------------------- search

    def search(self, queries, k: int = 10, filters: Filters | None = None) -> list[list[Hit]]:
        """queries: [Q, D] (or one [D]) L2-normalised float embeddings, torch or numpy -> Q lists of <= k hits,
        best first, score = cosine similarity. filters: only the photos that pass them (`catalogue.parse_filters`),
        k of them whenever k pass: the catalogue selects them, and their vectors are scored exactly."""
        if k < 1:
            raise ClipsnailError(f"k must be at least 1, got {k}")
        if hasattr(queries, "detach"):  # a torch tensor (torch is not imported by a search that needs none)
            queries = queries.detach().float().cpu().numpy()
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ClipsnailError(f"query embeddings have shape {tuple(q.shape)}, but index {self.index_dir} holds "
                                 f"dim-{self.dim} vectors (was it built with another model?)")
        if filters:
            rows = self._query(self.catalogue.select_rows, filters)
            scores, found = top_k(q, self.store.vectors, min(k, len(rows)), rows=rows) if len(rows) else (None, None)
        else:
            scores, found = self.store.search(q, min(k, len(self))) if len(self) else (None, None)
        if scores is None:
            return [[] for _ in range(len(q))]
        photos = self._query(self.catalogue.photos_at, sorted({int(r) for r in found.ravel() if r >= 0}))
        return [[Hit(self._path(photos[r][1]), float(s), photos[r][0]) for s, r in zip(srow, rrow.tolist())
                 if r in photos] for srow, rrow in zip(scores, found)]


def _format_version(index_dir: Path) -> int:
    meta_path = index_dir / META
    if not meta_path.is_file():
        raise DataError(f"{index_dir}: not a clipsnail index (no {META})")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: not a clipsnail index description (no format {FORMAT!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise DataError(f"{meta_path}: index format version {version!r} is not one this clipsnail reads (up to "
                        f"{VERSION}); upgrade clipsnail or rebuild the index")
    return version


def _check_state(state, path: Path) -> dict:
    if not isinstance(state, dict):
        raise DataError(f"{path}: damaged: no index state")
    for key, kind in (("dim", int), ("rows", int), ("photos", int), ("root", str), ("structure", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool) or \
                (kind is int and state[key] < 0):
            raise DataError(f"{path}: damaged: {key!r} of the index state is missing or not {kind.__name__}")
    if state["photos"] > state["rows"] or state["dim"] < 1:
        raise DataError(f"{path}: damaged: {state['photos']} photos over {state['rows']} rows of dim {state['dim']}")
    structure = state["structure"]
    numbers = ("approx_threshold", "nlist", "nprobe", "trained_rows", "calibrated_rows", "trained_nprobe")
    if structure.get("type") not in ("exact", "ivf") or not all(
            isinstance(structure.get(key), int) and structure[key] >= (key != "approx_threshold")
            for key in numbers[:1 if structure.get("type") == "exact" else None]):
        raise DataError(f"{path}: damaged: the search structure of the index state is not one this clipsnail knows")
    return state


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


def is_index_dir(path: Path) -> bool:
    """True when `path` holds an index.json this program wrote (its format marker), whatever else is damaged."""
    meta = read_json_object(path / META)
    return meta is not None and meta.get("format") == FORMAT


# ----------------------------------------------------------------------------------------------- writing


def index_bytes(images: int, dim: int) -> int:
    """About what an index of `images` vectors takes on disk: the vectors, a catalogue row each, and 1 MiB."""
    return images * (4 * dim + 600) + 2**20


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _write_new(out_dir: Path, state: dict, rels: list[str], entries: dict[str, tuple], vectors: np.ndarray,
               facts: dict[str, PhotoFacts], unreadable: dict[str, tuple], target_recall: float) -> None:
    """A complete index of `rels` (their (size, mtime_ns, sha1) in entries, vectors [len(rels), D] in that order)
    written beside out_dir and swapped in (`safeio.staged_dir`): ids 0..N-1 in the order of rels."""
    t = time.perf_counter()
    threshold = state["structure"]["approx_threshold"]
    with staged_dir(out_dir, is_ours=is_index_dir, what="clipsnail index") as tmp:
        layout, order = write_store(tmp, vectors, np.arange(len(rels)), len(rels) >= threshold, target_recall)
        row_of = np.empty(len(rels), dtype=np.int64)
        row_of[order] = np.arange(len(rels))
        structure = _structure(layout, threshold, target_recall, t)
        catalogue = Catalogue.create(tmp / CATALOGUE)
        try:
            with catalogue.transaction():
                catalogue.insert((i, int(row_of[i]), rel, *entries[rel], facts.get(rel, PhotoFacts()))
                                 for i, rel in enumerate(rels))
                catalogue.set_unreadable(unreadable)
                catalogue.set_state({**state, "rows": len(rels), "photos": len(rels), "structure": structure,
                                     "num_unreadable": len(unreadable), "updated": _now()})
        finally:
            catalogue.close()  # checkpoints the WAL into the file
        _write_marker(tmp)


def _structure(layout: dict, approx_threshold: int, target_recall: float, started: float) -> dict:
    """The search structure recorded in the index state: `write_store`'s layout, and how it was asked for."""
    return {**layout, "approx_threshold": approx_threshold, "target_recall@10": target_recall,
            "trained_nprobe": layout.get("nprobe"), "build_seconds": round(time.perf_counter() - started, 2)}


def _write_marker(folder: Path) -> None:
    (folder / META).write_text(json.dumps({"format": FORMAT, "version": VERSION}, indent=2) + "\n")


def _commit_state(index: ImageIndex, **changes) -> None:
    """Commit `changes` to the index state of `index` (a snapshot taken under the writer lock), in one transaction."""
    writer = Catalogue.open(index.catalogue.path, readonly=False)
    try:
        with writer.transaction():
            writer.set_state({**index.meta, **changes})
    finally:
        writer.close()


def _base_state(root: Path, follow_links: bool, model_dir: str | None, dim: int, approx_threshold: int,
                created: str | None, stats: dict, backend: str = "torch") -> dict:
    return {"root": str(root), "follow_links": follow_links, "model_dir": model_dir, "backend": backend,
            "model_weights": weights_fingerprint(model_dir) if model_dir else None, "dim": dim,
            "structure": {"approx_threshold": approx_threshold}, "created": created or _now(), "last_stats": stats}


def upgrade_v1(index_dir: Path) -> None:
    """Rewrite an index of format 1 (files.json, vectors.safetensors, faiss.index; its catalogue if it had one)
    as format 2, atomically, encoding nothing: the photos whose facts it did not catalogue are read for them."""
    from safetensors import safe_open

    meta = _read_json(index_dir / META)
    if meta.get("version") != 1:
        return  # upgraded by another process meanwhile
    files = _read_json(index_dir / "files.json")
    columns = ("path", "size", "mtime_ns", "sha1")
    if not isinstance(files, dict) or not all(isinstance(files.get(c), list) and len(files[c]) == meta.get("count")
                                              for c in columns):
        raise DataError(f"{index_dir / 'files.json'}: damaged file list (expected {meta.get('count')} rows)")
    rels = files["path"]
    if not all(_is_inside_name(r) for r in rels) or not isinstance(meta.get("root"), str):
        raise DataError(f"{index_dir / 'files.json'}: damaged: a path that is not inside the image folder")
    try:
        with safe_open(str(index_dir / "vectors.safetensors"), framework="numpy") as f:
            vectors = np.asarray(f.get_tensor("vectors"), dtype=np.float32)
    except Exception as e:  # safetensors has its own error types for truncated/corrupt files
        raise DataError(f"{index_dir / 'vectors.safetensors'}: cannot read the stored vectors ({e})") from e
    if vectors.shape != (len(rels), meta.get("dim")):
        raise DataError(f"{index_dir / 'vectors.safetensors'}: holds vectors of shape {vectors.shape}, expected "
                        f"({len(rels)}, {meta.get('dim')})")
    known = {}
    if (index_dir / CATALOGUE).is_file():
        old = Catalogue.open(index_dir / CATALOGUE)
        known = facts_by_path(old)
        old.close()
    root, follow_links = Path(meta["root"]), bool(meta.get("follow_links", False))
    facts = read_all_facts(root, rels, follow_links, known=known)
    spec = meta.get("faiss", {}) if isinstance(meta.get("faiss"), dict) else {}
    state = _base_state(root, follow_links, meta.get("model_dir"), vectors.shape[1],
                        int(spec.get("approx_threshold", DEFAULT_APPROX_THRESHOLD)), meta.get("created"),
                        meta.get("last_stats", {}))
    state["model_weights"] = meta.get("model_weights")
    entries = {r: (s, m, h) for r, s, m, h in zip(*(files[c] for c in columns))}
    unreadable = {u["path"]: (u["size"], u["mtime_ns"]) for u in meta.get("unreadable", []) if isinstance(u, dict)}
    try:
        _write_new(index_dir, state, rels, entries, vectors, facts, unreadable,
                   float(spec.get("target_recall@10", DEFAULT_TARGET_RECALL)))
    except (OSError, DiskError) as e:
        raise DataError(f"{index_dir}: an index of format 1, which this clipsnail upgrades in place, but it cannot "
                        f"write there ({e}); give it write access, or build a new index") from None
    log.info("%s: upgraded the index to format %d (%d photos, nothing encoded)", index_dir, VERSION, len(rels))


# ----------------------------------------------------------------------------------------------- files


def _sha1(path: Path, root: Path, follow_links: bool) -> str:
    h = hashlib.sha1()
    # A FIFO or a link out of the root swapped in after the scan is refused here, not waited on or read.
    with os.fdopen(open_regular(path, root, follow_links), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scan(root: Path, allow_empty: bool, follow_links: bool) -> dict[str, tuple[int, int]]:
    """{relative posix path: (size, mtime_ns)} of the image files under root."""
    prefix = len(str(root).rstrip(os.sep)) + 1
    try:
        found = {path[prefix:].replace(os.sep, "/"): (st.st_size, st.st_mtime_ns)
                 for path, st in walk_images(root, follow_links=follow_links)}
    except DataError:
        if allow_empty and root.is_dir():
            return {}
        raise
    if not found and not allow_empty:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found


def _hash_all(root: Path, rels: list[str], progress: bool, follow_links: bool) -> dict[str, str]:
    out = {}
    for r in tqdm(rels, desc="hash files", unit="file", disable=not progress or len(rels) < 1000):
        try:
            out[r] = _sha1(root / r, root, follow_links)
        except (OSError, DataError) as e:
            log.warning("%s: cannot read (%s)", root / r, e)
    return out


def _model_dir(model, model_dir) -> str | None:
    model_dir = model_dir or model.run_dir  # a CLIP model knows its run (None while it trains)
    return str(Path(model_dir).resolve()) if model_dir else None


def _encode(model, root: Path, rels: list[str], batch_size: int, progress: bool, workers: int | None):
    """-> (vectors of the readable ones [M, D], readable mask [len(rels)] bool list, {rel: PhotoFacts} of the
    readable ones, read from the same decode).
    Photos are decoded only to about the model's input size (its preprocess resizes the shorter side to
    model.image_size; `load_image`), by `workers` processes (None: `default_workers`) while this one encodes."""
    import torch

    from clipsnail.inference.evaluate import encode_image_paths

    if not rels:
        return torch.zeros(0, model.embed_dim), [], {}
    workers = default_workers() if workers is None else workers
    if len(rels) < MIN_IMAGES_FOR_WORKERS:
        workers = 0  # starting processes would cost more than decoding these few here
    vectors, readable, facts = encode_image_paths(model, [root / r for r in rels], batch_size=batch_size,
                                                  progress=progress, num_workers=workers, min_side=model.image_size,
                                                  unit="photo", with_facts=True)
    return vectors[readable], readable.tolist(), {r: f for r, f in zip(rels, facts) if f is not None}


# ----------------------------------------------------------------------------------------------- build / update


def _one_writer(folder_arg: str):
    """Runs the decorated function under the writer lock (safeio.writer_lock) of the index its argument
    `folder_arg` names: two builds or updates of one index at once would each encode, and the last commit wins."""
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
def build_index(model, images_dir: str | Path, out_dir: str | Path, batch_size: int = ENCODE_BATCH,
                progress: bool = True, approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
                target_recall: float = DEFAULT_TARGET_RECALL,
                model_dir: str | Path | None = None, follow_links: bool = False,
                workers: int | None = None) -> tuple[ImageIndex, dict]:
    """Encode every image under images_dir (recursively) into a new index at out_dir (replacing one there).
    model_dir: the run the model came from (default: `model.run_dir`, set by `clipsnail.load`).
    workers: processes decoding photos while the model encodes (None: `default_workers()`; 0: none).
    -> (the index, stats {added, changed, removed, moved, unchanged, unreadable, total, encoded, seconds})."""
    t = time.perf_counter()
    root = Path(images_dir).absolute()
    check_replaceable(out_dir, is_index_dir, "clipsnail index")  # before the (slow) encoding
    found = _scan(root, allow_empty=False, follow_links=follow_links)
    check_free_space(out_dir, index_bytes(len(found), model.embed_dim), f"an index of {len(found)} images")
    rels = sorted(found)
    sha1 = _hash_all(root, rels, progress, follow_links)
    rels = [r for r in rels if r in sha1]
    vecs, readable, facts = _encode(model, root, rels, batch_size, progress, workers)
    good = [r for r, ok in zip(rels, readable) if ok]
    good_set = set(good)
    unreadable = {r: found[r] for r in found if r not in good_set}
    stats = {"added": len(good), "changed": 0, "removed": 0, "moved": 0, "unchanged": 0,
             "unreadable": len(unreadable), "total": len(good), "encoded": len(good)}
    state = _base_state(root, follow_links, _model_dir(model, model_dir), model.embed_dim, approx_threshold, None,
                        stats, backend_of(model))
    _write_new(Path(out_dir), state, good, {r: (*found[r], sha1[r]) for r in good},
               vecs.numpy().astype(np.float32, copy=False).reshape(-1, model.embed_dim), facts, unreadable,
               target_recall)
    index = ImageIndex.load(out_dir)
    stats["seconds"] = round(time.perf_counter() - t, 2)
    log.info("indexed %d images under %s (%d unreadable skipped): %s", len(good), root, len(unreadable), index)
    return index, stats


@dataclass
class _UpdatePlan:
    """What an update does: photos kept as they are (counted), rewritten in the catalogue with their row (touched:
    new mtime, same bytes; moved: new path, same bytes), encoded (new, changed, or every one for new weights),
    copied (a new path with the bytes of an indexed photo whose file is still there), removed."""

    unchanged: int = 0
    keep_row: list = field(default_factory=list)  # (id, row, rel, sha1): same vector, new path or mtime
    todo: list = field(default_factory=list)  # rels to encode
    targets: dict = field(default_factory=dict)  # of todo: rel -> (id, old row) of an indexed photo it replaces
    sha1: dict = field(default_factory=dict)  # rel -> sha1 of the files read
    copies: list = field(default_factory=list)  # (rel, sha1, the row whose vector it takes)
    removed: list = field(default_factory=list)  # (id, row)
    moved: dict = field(default_factory=dict)  # new rel -> the rel its bytes had, now gone
    changed: set = field(default_factory=set)  # of todo: indexed files whose bytes changed
    reencoded: set = field(default_factory=set)  # of todo: unchanged files, encoded again for new weights
    unreadable: dict = field(default_factory=dict)  # rel -> (size, mtime_ns)
    old_unreadable: dict = field(default_factory=dict)  # what the catalogue lists now
    stamps: dict = field(default_factory=dict)  # rel -> (size, mtime_ns) as scanned, of every file written


def _plan_update(old: ImageIndex, found: dict, encode_all: bool, progress: bool) -> _UpdatePlan:
    """Compare the folder (`found`, emptied on the way: what is left is new) with the catalogue, streamed."""
    plan, gone, candidates = _UpdatePlan(), {}, []
    for rel, size, mtime_ns, i, row, sha1 in old.catalogue.files():
        stamp = found.pop(rel, None)
        if stamp is None:
            gone.setdefault(sha1, []).append((i, row, rel))
        elif stamp == (size, mtime_ns) and encode_all:
            plan.todo.append(rel)
            plan.targets[rel], plan.sha1[rel], plan.stamps[rel] = (i, row), sha1, stamp
            plan.reencoded.add(rel)
        elif stamp != (size, mtime_ns):
            candidates.append((rel, i, row, sha1))
            plan.stamps[rel] = stamp
        else:
            plan.unchanged += 1
    plan.old_unreadable = old.catalogue.unreadable()
    plan.unreadable = {r: found.pop(r) for r in list(found)  # the same unreadable file: not tried again
                       if plan.old_unreadable.get(r) == found[r]}
    plan.stamps.update(found)
    plan.sha1.update(_hash_all(old.root, [c[0] for c in candidates] + sorted(found), progress, old.follow_links))
    for rel, i, row, sha1 in candidates:
        if rel not in plan.sha1:
            plan.removed.append((i, row))
            plan.unreadable[rel] = plan.stamps[rel]
        elif plan.sha1[rel] == sha1 and not encode_all:
            plan.keep_row.append((i, row, rel, sha1))  # touched: same bytes, same vector
        else:
            plan.todo.append(rel)
            plan.targets[rel] = (i, row)
            (plan.changed if plan.sha1[rel] != sha1 else plan.reencoded).add(rel)
    for rel in sorted(found):
        sha1 = plan.sha1.get(rel)
        if sha1 is None:
            plan.unreadable[rel] = found[rel]
            continue
        if gone.get(sha1) and not encode_all:  # moved or renamed: the photo keeps its id and vector
            i, row, source = gone[sha1].pop()
            plan.keep_row.append((i, row, rel, sha1))
            plan.moved[rel] = source
        elif (same := old.catalogue.rows_with_sha1(sha1)) and not encode_all:
            plan.copies.append((rel, sha1, same[0][1]))  # copied: a new photo, its vector copied
        else:
            plan.todo.append(rel)
    plan.removed += [(i, row) for photos in gone.values() for i, row, _ in photos]
    return plan


@_one_writer("index_dir")
def update_index(model, index_dir: str | Path, batch_size: int = ENCODE_BATCH, progress: bool = True,
                 approx_threshold: int | None = None, workers: int | None = None) -> tuple[ImageIndex, dict]:
    """Bring an index up to date with its folder, at the cost of what changed: encode new and changed files
    (changed: size or mtime differ and the sha1 confirms), drop deleted ones, keep every other vector as stored.
    Writes nothing when nothing changed. A new path holding the bytes (sha1) of an indexed photo, moved, renamed or
    copied, takes that photo's vector and is not encoded. The model must be the run that made the index
    (ClipsnailError otherwise); when that run's weights changed since, every image is encoded again.
    workers: as for `build_index`.
    -> (the index, stats {added, changed, removed, moved (new paths of photos whose old path is gone: neither added
    nor removed), unchanged, unreadable, total, reencoded (unchanged files encoded again for new weights), encoded
    (images encoded by this update), written (whether anything was committed), rewritten (why the index was
    written anew: compaction, retraining; None), seconds})."""
    t = time.perf_counter()
    index_dir = Path(index_dir)
    if _format_version(index_dir) == 1:
        upgrade_v1(index_dir)
    old = ImageIndex.load(index_dir, upgrade=False)
    try:
        _check_update_model(model, old, index_dir)
        # The same run with other weights: every vector is encoded again. A model pinned to weights (an ONNX export)
        # makes vectors of those, whatever the run holds now.
        pinned = getattr(model, "weights", None)
        encode_all = (pinned or {}).get("sha1") != (old.model_weights or {}).get("sha1") if pinned else \
            old.weights_changed()
        if encode_all:
            log.warning("%s: the weights of %s changed since the index was made: encoding every image again",
                        index_dir, old.model_dir)
        found = _scan(old.root, allow_empty=True, follow_links=old.follow_links)
        plan = _plan_update(old, found, encode_all, progress)
        new_vecs, readable, facts = _encode(model, old.root, plan.todo, batch_size, progress, workers)
        encoded = [r for r, ok in zip(plan.todo, readable) if ok]
        for r, ok in zip(plan.todo, readable):
            if not ok:
                plan.unreadable[r] = plan.stamps[r]
                if r in plan.targets:
                    plan.removed.append(plan.targets.pop(r))
        stats = _update_stats(old, plan, encoded, len(new_vecs))
        threshold = approx_threshold if approx_threshold is not None else old.structure["approx_threshold"]
        state = {**old.meta, "photos": stats["total"], "last_stats": stats, "num_unreadable": len(plan.unreadable),
                 "structure": {**old.structure, "approx_threshold": threshold}}
        if encode_all:
            state["model_weights"] = pinned or weights_fingerprint(old.model_dir)
        stats["written"] = bool(plan.keep_row or encoded or plan.copies or plan.removed or encode_all or
                                plan.unreadable != plan.old_unreadable or
                                threshold != old.structure["approx_threshold"])
        if stats["written"]:
            _commit(old, plan, encoded, new_vecs, facts, state)
    finally:
        old.close()
    stats["rewritten"] = _upkeep(index_dir)  # also finishes the upkeep of an update killed after its commit
    stats["seconds"] = round(time.perf_counter() - t, 2)
    log.info("updated %s: %s", index_dir, stats)
    return ImageIndex.load(index_dir), stats


def backend_of(model) -> str:
    """What runs the image encoder: "torch", or "onnx" (`clipsnail.apps.export.OnnxImageModel`)."""
    return getattr(model, "backend", "torch")


def _check_update_model(model, old: ImageIndex, index_dir: Path) -> None:
    recorded = old.meta.get("backend", "torch")
    if backend_of(model) != recorded:
        raise ClipsnailError(f"{index_dir} holds vectors encoded through {recorded}; an update encodes through the "
                             f"same (not {backend_of(model)}): --backend {recorded}, or build the index again")
    if model.embed_dim != old.dim or old.other_model(model.run_dir):
        made_by = f"dim-{old.dim} vectors of {old.model_dir}" if old.model_dir else f"dim-{old.dim} vectors"
        raise ClipsnailError(f"{index_dir} holds {made_by}; `index update` adds to them with that run only (its "
                             f"default). To encode every image with {model.run_dir or 'this model'} instead: "
                             f"clipsnail index build --model RUN --images {old.root} --out {index_dir}")


def _update_stats(old: ImageIndex, plan: _UpdatePlan, encoded: list[str], n_encoded: int) -> dict:
    added = sum(1 for r in encoded if r not in plan.targets) + len(plan.copies)
    total = len(old) + added - len(plan.removed)
    changed, reencoded = len(plan.changed.intersection(encoded)), len(plan.reencoded.intersection(encoded))
    return {"added": added, "changed": changed, "removed": len(plan.removed), "moved": len(plan.moved),
            "unchanged": total - added - changed - len(plan.moved), "unreadable": len(plan.unreadable),
            "total": total, "reencoded": reencoded, "encoded": n_encoded}


def _commit(old: ImageIndex, plan: _UpdatePlan, encoded: list[str], new_vecs: torch.Tensor, encoded_facts: dict,
            state: dict) -> None:
    """Append the new rows (encoded photos, then copies), then commit every change in one catalogue transaction:
    the moment the new state exists. encoded_facts: {rel: PhotoFacts} of the encoded photos (read while decoding);
    those of copied and moved photos are read here."""
    copied = np.asarray(old.store.vectors[[row for _, _, row in plan.copies]], dtype=np.float32)
    appended = np.concatenate([new_vecs.numpy().astype(np.float32).reshape(-1, old.dim),
                               copied.reshape(-1, old.dim)])
    check_free_space(old.index_dir, index_bytes(len(appended), old.dim), f"{len(appended)} new vectors")
    try:
        append_rows(old.store, appended)
    except OSError as e:  # the rows past the committed ones are cut off by the next writer
        raise disk_error(e, old.index_dir) or e from None
    first = old.store.rows
    new_rows = {rel: first + j for j, rel in enumerate([*encoded, *(c[0] for c in plan.copies)])}
    sha1 = {**plan.sha1, **{c[0]: c[1] for c in plan.copies}}
    facts = read_all_facts(old.root, [*new_rows, *(k[2] for k in plan.keep_row)], old.follow_links,
                           known=encoded_facts)

    def photo(i, row, rel):
        return i, row, rel, *plan.stamps[rel], sha1[rel], facts[rel]

    writer = Catalogue.open(old.catalogue.path, readonly=False)
    try:
        with writer.transaction():
            writer.delete(i for i, _ in plan.removed)
            writer.add_dead([row for _, row in plan.removed] + [plan.targets[r][1] for r in encoded
                                                                  if r in plan.targets])
            writer.replace([photo(i, row, rel) for i, row, rel, _ in plan.keep_row] +
                           [photo(plan.targets[r][0], new_rows[r], r) for r in encoded if r in plan.targets])
            writer.insert(photo(None, row, rel) for rel, row in new_rows.items() if rel not in plan.targets)
            writer.set_unreadable(plan.unreadable)
            writer.set_state({**state, "rows": first + len(appended), "updated": _now()})
    finally:
        writer.close()


def _rewrite_reason(state: dict) -> str | None:
    """Why the committed state should be written anew (None: it is fine as it is)."""
    structure, photos, rows = state["structure"], state["photos"], state["rows"]
    threshold = structure["approx_threshold"]
    if (structure["type"] == "ivf") != (photos >= threshold):
        return f"{photos} photos against an approximate-search threshold of {threshold}"
    if structure["type"] == "ivf" and photos > GROWTH_FOR_RETRAINING * structure["trained_rows"]:
        return f"{photos} photos, over {GROWTH_FOR_RETRAINING:g}x the {structure['trained_rows']} its lists learnt"
    if rows - photos > DEAD_FRACTION_FOR_COMPACTION * rows:
        return f"{rows - photos} of its {rows} vector rows belong to deleted or changed photos"
    return None


def _upkeep(index_dir: Path) -> str | None:
    """After a commit: write the index anew when `_rewrite_reason` says so (returned), or recalibrate nprobe when
    the photos grew by GROWTH_FOR_RECALIBRATION since it was calibrated."""
    index = ImageIndex.load(index_dir, upgrade=False)
    try:
        reason = _rewrite_reason(index.meta)
        structure = index.structure
        if reason is None and structure["type"] == "ivf" and \
                len(index) > GROWTH_FOR_RECALIBRATION * structure["calibrated_rows"]:
            found = calibrate(index.store, structure["target_recall@10"])
            if found["nprobe"] > NPROBE_GROWTH_FOR_RETRAINING * structure["trained_nprobe"]:
                reason = f"nprobe {found['nprobe']} now reaches the recall {structure['trained_nprobe']} did"
            else:
                _commit_state(index, structure={**structure, **found})
        if reason is not None:
            _rewrite(index, reason)
        return reason
    finally:
        index.close()


def _rewrite(index: ImageIndex, reason: str) -> None:
    """Write `index` anew beside itself and swap it in: its live rows only (compaction), grouped by lists trained
    on them (or exact, below the threshold); ids, paths and facts copied as they are."""
    t = time.perf_counter()
    log.info("%s: writing the index anew: %s", index.index_dir, reason)
    structure = index.structure
    live = np.flatnonzero(index.store.live)
    with staged_dir(index.index_dir, is_ours=is_index_dir, what="clipsnail index") as tmp:
        layout, order = write_store(tmp, index.store.vectors, live, len(live) >= structure["approx_threshold"],
                                    structure["target_recall@10"])
        state = {**index.meta, "rows": len(live), "photos": len(live), "updated": _now(),
                 "structure": _structure(layout, structure["approx_threshold"], structure["target_recall@10"], t)}
        catalogue = Catalogue.create(tmp / CATALOGUE)
        try:
            catalogue.copy_from(index.catalogue.path, zip(live[order].tolist(), range(len(live))), state)
        finally:
            catalogue.close()
        encoder = index.index_dir / QUERY_ENCODER
        if encoder.is_dir() and not encoder.is_symlink():
            shutil.copytree(encoder, tmp / QUERY_ENCODER, copy_function=_link_or_copy, symlinks=True)
        _write_marker(tmp)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@_one_writer("index_dir")
def set_query_encoder(index_dir: str | Path, fingerprint: dict | None) -> None:
    """Record, in one transaction, that index_dir/QUERY_ENCODER was exported from the weights `fingerprint` (None:
    it is no longer to be used)."""
    index = ImageIndex.load(index_dir, upgrade=False)
    try:
        _commit_state(index, query_encoder=fingerprint)
    finally:
        index.close()


def folder_index(model, folder: str | Path, cache_dir: str | Path, batch_size: int = ENCODE_BATCH,
                 progress: bool = True, follow_links: bool = False) -> ImageIndex:
    """The index of `folder` kept in cache_dir/<hash of the folder path>/: built the first time, then updated
    (only new and changed files are encoded). This is what `clipsnail search --images DIR` uses."""
    folder = Path(folder).resolve()
    out = Path(cache_dir) / hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    if (out / META).is_file():
        try:
            index = ImageIndex.load(out)
            usable = (index.dim == model.embed_dim and index.root == folder and index.follow_links == follow_links
                      and not index.other_model(model.run_dir))
            index.close()
            if usable:
                return update_index(model, out, batch_size=batch_size, progress=progress)[0]
        except DataError as e:  # a damaged cache is only a cache: rebuild it
            log.warning("rebuilding the embedding cache %s (%s)", out, e)
    return build_index(model, folder, out, batch_size=batch_size, progress=progress, follow_links=follow_links)[0]

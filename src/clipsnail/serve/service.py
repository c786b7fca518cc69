"""What the web app does with its index and model, apart from HTTP: embed queries, search, look up indexed images
and their stored vectors, zero-shot class weights, decode uploads and thumbnails on threads of its own.

Model calls are serialised by one lock (sync routes run in FastAPI's threadpool), so concurrent requests are safe.
Decoding memory is bounded: images are decoded on a pool of `max_decoding` threads (waiting requests hold no thread
and no pixels), at about twice the model's input size rather than full size (images.py). Only files in the index
are ever opened, through `safeio.read_regular` (regular files under the index's root; a FIFO named x.jpg is a 404 at
once, never a blocked worker).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import HTTPException, UploadFile

from clipsnail.core.display import display_name
from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.data.images import IMAGE_EXTENSIONS
from clipsnail.inference.catalogue import Filters
from clipsnail.inference.query import QueryError, combine, looks_like_path, parse_query, term_vectors
from clipsnail.inference.templates import default_templates
from clipsnail.serve.encoders import query_encoder_of
from clipsnail.serve.images import BadImage, decode_upload, load_file, thumbnail
from clipsnail.serve.schemas import Hit, Limits


def bad_request(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


class LRU:
    """A bounded map, safe to share between threads (the thumbnail cache)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class Served:
    """One state of the served index (a loaded index is a snapshot of one committed state: its vectors, paths and
    ids stay consistent however the index is updated meanwhile). A request takes the service's state once and uses
    it throughout, so an index swapped in meanwhile never mixes with it."""

    def __init__(self, index, generation: int = 0):
        self.index, self.generation = index, generation


class SearchService:
    """The index and CLIP model one app serves, with the lock, caches and decoding threads around them. `swap`
    serves a new state of the index (`index watch`) without a restart. model: the index's ONNX query encoder
    (an OnnxClip: no PyTorch) or the run's PyTorch model (`clipsnail.serve.encoders`)."""

    def __init__(self, index, model, limits: Limits):
        self.served, self.encoder, self.limits = Served(index), query_encoder_of(model), limits
        self.lock = threading.Lock()
        # The shortest side an image query is decoded at: twice the model's input size (its preprocess resizes the
        # shorter side to that size and crops; the margin keeps the resize's antialiasing as good as from full size).
        self.query_side = 2 * self.encoder.image_size
        # Decodes wait for one of these threads without holding a threadpool thread or any pixels; at most
        # max_decoding full-size images exist at once, however many uploads arrive together.
        self.decoder = ThreadPoolExecutor(max_workers=limits.max_decoding, thread_name_prefix="clipsnail-decode")
        self.thumbs = LRU(limits.thumb_cache)  # keyed by (generation, id): a changed photo keeps its id
        self.zero_shot_cache: dict[str, np.ndarray] = {}

    @property
    def index(self):
        return self.served.index

    def swap(self, index) -> None:
        """Serve `index` from now on (a new state of the same index): requests already running finish with the
        state they took."""
        self.served = Served(index, self.served.generation + 1)

    def close(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------- embedding, search

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[len(texts), D]: one batch, under one hold of the model lock."""
        with self.lock:
            return self.encoder.encode_texts(texts)

    def embed_image(self, image) -> np.ndarray:
        with self.lock:
            return self.encoder.encode_images([image])

    def search(self, queries: np.ndarray, k: int, filters: Filters | None = None) -> list[Hit]:
        index = self.served.index
        k = min(k, len(index))
        if k == 0:
            return []
        with self.lock:
            try:
                hits = index.search(np.ascontiguousarray(queries, dtype=np.float32), k=k, filters=filters)[0]
            except ClipsnailError as e:  # filters asked of an index without a catalogue: the request cannot be met
                raise bad_request(422, str(e)) from None
        # A name that is not UTF-8 is shown lossily (U+FFFD); JSON cannot carry its bytes, the id still names it.
        return [Hit(id=h.id, name=display_name(Path(h.path).name),
                    path=display_name(Path(h.path).relative_to(index.root).as_posix()),
                    score=round(float(h.score), 4), thumb_url=f"/api/thumb/{h.id}") for h in hits]

    def catalogue_summary(self, max_cameras: int = 100) -> dict | None:
        """What the page offers to filter by: the catalogue's summary (`index info`), its most common cameras."""
        index = self.index
        with self.lock:
            summary = index.catalogue.summary()
        return {**summary, "cameras": summary["cameras"][:max_cameras]}

    @staticmethod
    def indexed_id(served: Served, text: str) -> int | None:
        """The position in `served` of the indexed image whose path relative to the root is `text` (or ./`text`)."""
        text = text.removeprefix("./")
        found = served.index.id_of(text)
        if found is None and "\ufffd" in text:  # a name that is not UTF-8, as the answers show it: look it up
            found = served.index.id_shown_as(text, display_name)
        return found

    def index_image(self, served: Served, text: str) -> str | None:
        """parse_query's image terms on a server: an image of the index, never a file of the server. Only names
        with an image extension can be indexed images, so text terms cost no lookup."""
        if not (looks_like_path(text) or text.lower().endswith(IMAGE_EXTENSIONS)):
            return None
        if self.indexed_id(served, text) is not None:
            return text
        if looks_like_path(text):
            raise QueryError(f"{text}: not an image of this index (name one by its path relative to the index "
                             "root, as search results show it)")
        return None  # "cat.png" that is not in the index: text, as on the command line

    def stored_vector(self, served: Served, i: int) -> np.ndarray:
        """The indexed embedding i [1, D] of `served`."""
        try:
            vector = served.index.vector(i)
        except (DataError, OSError) as e:  # the server's data is damaged, not the request
            raise bad_request(404, f"the index's stored vectors cannot be read ({e})") from None
        if vector is None:
            raise bad_request(404, "no image with that id in the index")
        return vector[None]

    def query_vector(self, q: str) -> np.ndarray:
        """The embedding of a query in clipsnail.inference.query's grammar; a malformed query is a 422 saying
        why. Image terms are read from the state the query started with."""
        served = self.served
        try:
            terms = parse_query(q, image=lambda text: self.index_image(served, text))
            vectors = term_vectors(
                terms, self.embed_texts,
                lambda names: np.concatenate([self.stored_vector(served, self.indexed_id(served, n)) for n in names]))
            return combine(vectors, [t.weight for t in terms])
        except QueryError as e:
            raise bad_request(422, str(e)) from None

    def class_weights(self, classes: list[str]) -> np.ndarray:
        cache = self.zero_shot_cache
        found = {c: cache.get(c) for c in classes}
        missing = [c for c, w in found.items() if w is None]
        if missing:
            with self.lock:
                found.update(zip(missing, self.encoder.class_weights(missing, default_templates())))
            if len(cache) > 4096:  # bounded: users type arbitrary class names
                cache.clear()
            cache.update((c, found[c]) for c in missing)
        return np.stack([found[c] for c in classes])

    def zero_shot(self, image, classes: list[str]) -> np.ndarray:
        """[len(classes)] probabilities of the classes for one image."""
        weights = self.class_weights(classes)
        return self.encoder.probabilities(self.embed_image(image), weights)[0]

    # ------------------------------------------------------------------------------------------- images

    async def decode(self, function: Callable, *args):
        """function(*args) on the decoding threads; BadImage becomes its HTTP status."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decoder, functools.partial(function, *args))
        except BadImage as e:
            raise bad_request(e.status, str(e)) from None

    def read_and_decode(self, file: UploadFile):
        # Read here, on a decoding thread, so that waiting uploads hold no copy of their bytes in memory
        # (Starlette spools each one to a temporary file past 1 MB).
        limit = self.limits.max_upload_bytes
        data = file.file.read(limit + 1)
        if len(data) > limit:
            raise BadImage(f"the upload is over {limit // 2**20} MB", 413)
        return decode_upload(data, self.limits.max_image_pixels, self.query_side)

    async def read_upload(self, file: UploadFile):
        return await self.decode(self.read_and_decode, file)

    def from_index(self, function: Callable, i: int, *args):
        """function(path, root, follow_links, *args) on the indexed file i. Whatever is wrong with the file (gone,
        replaced by a FIFO, undecodable) is a fault of the server's data, not of the request: a 404 saying what."""
        index = self.index
        path = index.path_of(i)
        if path is None:
            raise BadImage("no image with that id in the index (it was deleted)", 404)
        try:
            return function(path, index.root, index.follow_links, *args)
        except BadImage as e:
            raise BadImage(str(e) if e.status == 404 else f"the indexed file cannot be decoded: {e}", 404) from None

    def indexed_image(self, i: int):
        return self.from_index(load_file, i, self.limits.max_image_pixels, self.query_side)

    def thumb_bytes(self, i: int) -> tuple[bytes, str]:
        return self.from_index(thumbnail, i, self.limits.thumb_size, self.limits.max_image_pixels)

    def check_id(self, i: int) -> None:
        if self.index.rel_path(i) is None:
            raise bad_request(404, "no image with that id in the index")

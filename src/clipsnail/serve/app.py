"""The web app: a JSON API under /api/ (OpenAPI schema at /openapi.json) and one static page at /.

Safe by default, because the index is usually someone's private photo collection:
- `run_server` binds 127.0.0.1, and requests must name a loopback host (a web page elsewhere cannot reach the app
  by rebinding its DNS name to 127.0.0.1). The Host header is parsed strictly: a loopback name (127.x.y.z,
  localhost, [::1]) and an optional port of digits, nothing else. A POST whose Origin is not exactly
  http(s)://HOST of the request is refused.
- No third-party script ever runs in the app's origin: the page is the app's own HTML, its Content-Security-Policy
  admits only its own inline script and style (by hash), every HTML response carries a CSP, and FastAPI's
  interactive docs (/docs, /redoc), which load their scripts from a CDN, are off; the schema is at /openapi.json.
- Request bodies are limited while they are read (FastAPI's `max_body_size`: 413 before the rest arrives).
  Numbers must be finite (Python's JSON parser accepts NaN and Infinity; they are a 422).
  Uploads must decode as a common raster image whose header declares at most `max_image_pixels` pixels.
- Decoding memory is bounded: images are decoded on a pool of `max_decoding` threads of its own (waiting requests
  hold no thread and no pixels), at about twice the model's input size rather than full size (images.py).
- No path from a request reaches the filesystem: images are named by their position in the index, and only
  files in the index are ever opened, through `safeio.read_regular` (regular files under the index's root only;
  a FIFO or a device named x.jpg is a 404 at once, never a blocked worker). An image term of a search query
  (clipsnail.inference.query) names an indexed image by its path relative to the index root and uses its stored
  vector; no file is opened for it, and any other term that looks like a path is a 422.
- Text, k, class lists and generation sizes are bounded; generation runs one job at a time behind a short queue.
- Model calls are serialised by a lock (sync routes run in FastAPI's threadpool), so concurrent requests are safe.
"""


import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.resources
import ipaddress
import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, model_validator

from clipsnail.core.display import display_name
from clipsnail.core.errors import ClipsnailError
from clipsnail.data.images import IMAGE_EXTENSIONS
from clipsnail.inference.index import VECTORS
from clipsnail.inference.query import QueryError, combine, looks_like_path, parse_query
from clipsnail.serve.generation import GenerationQueue, QueueFull
from clipsnail.serve.images import BadImage, decode_upload, load_file, thumbnail

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20
    # ~ a 7,700 x 5,200 photo; PIL's own warning starts at 89 M. Not lower for queries: a large JPEG is decoded at
    # 1/8 scale, whatever its size, and other formats (decoded whole, at most max_decoding at a time) cost 4-8
    # bytes a pixel while decoded, 160-320 MB at this limit; refusing 36-Mpx camera photos would save nothing.
    max_image_pixels: int = 40_000_000
    max_query_chars: int = 200
    max_k: int = 100
    max_classes: int = 50
    max_class_chars: int = 100
    max_generate_n: int = 16
    max_waiting_generations: int = 4
    generate_chunk: int = 4  # samples per generator call: the page shows each chunk as it finishes
    generate_wait_s: float = 600.0  # the longest a `wait: true` request blocks
    thumb_size: int = 256
    thumb_cache: int = 1024  # thumbnails kept in memory (about 10-20 kB each)
    max_json_bytes: int = 16 * 2**10
    max_decoding: int = 2  # images decoded at once (each briefly holds its full-size pixels unless a JPEG)


# ----------------------------------------------------------------------------------------------- response models


class Hit(BaseModel):
    id: int = Field(description="position in the index; the only way to name an image")
    name: str = Field(description="file name (no folder)")
    path: str = Field(description="path relative to the index root: names the image as a term of a search query")
    score: float = Field(description="cosine similarity")
    thumb_url: str


class SearchResult(BaseModel):
    hits: list[Hit]
    seconds: float


class Label(BaseModel):
    label: str
    prob: float


class ZeroShotResult(BaseModel):
    labels: list[Label] = Field(description="every class, most likely first")
    seconds: float


class Info(BaseModel):
    images: int
    dim: int
    model: str
    generator: bool
    generator_image_size: int | None
    limits: dict


class GeneratedImage(BaseModel):
    image: str = Field(description="PNG as a data: URL")
    score: float = Field(description="CLIP cosine similarity to the prompt")


class GenerationJob(BaseModel):
    id: str
    status: str = Field(description="queued, running, done or failed")
    position: int = Field(description="place in the queue (0 once running)")
    prompt: str
    n: int
    rerank: int
    guidance: float
    temperature: float
    seed: int
    drawn: int = Field(description="samples finished so far")
    images: list[GeneratedImage] = Field(description="best CLIP score first; when done, the best `rerank` of n")
    error: str | None
    seconds: float | None


def _bad_request(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _parse_classes(text: str, limits: Limits) -> list[str]:
    classes = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    if len(classes) < 2:
        raise _bad_request(422, "give at least two comma-separated classes, e.g. 'cat, dog'")
    if len(classes) > limits.max_classes:
        raise _bad_request(422, f"at most {limits.max_classes} classes, got {len(classes)}")
    if any(len(c) > limits.max_class_chars for c in classes):
        raise _bad_request(422, f"a class name is longer than {limits.max_class_chars} characters")
    return classes


def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: only its own inline script and style (by hash) may run."""
    html = importlib.resources.files("clipsnail.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                        for b in bodies)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
           "base-uri 'none'")
    return html, csp


# CSP of HTML responses that set none of their own (the page at / sets a stricter-by-hash one).
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

# host[:port] as a Host header or an Origin may carry it: a bracketed IPv6 address, or a DNS name / IPv4 address,
# then optionally ':' and digits. Anything else (userinfo, a path, a second colon, trailing junk) does not match.
_HOST = r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::[0-9]{1,5})?"
_HOST_HEADER = re.compile(_HOST)
_ORIGIN = re.compile(rf"https?://(?P<host>{_HOST})")
_IPV4_127 = re.compile(r"127\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")


def _host_name(host: str) -> str | None:
    """The name in a Host header ("[::1]:8000" -> "::1"), lower case; None unless it is exactly host[:port]."""
    match = _HOST_HEADER.fullmatch(host)
    if match is None:
        return None
    return match["name"].lower().removeprefix("[").removesuffix("]")


# The addresses that bind every interface: the host names to answer are then whatever addresses the machine has.
WILDCARD_ADDRESSES = ("0.0.0.0", "::")


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_host_names(bind: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The Host names a server bound to `bind` answers: the loopback names, the bound address itself, and `extra`
    (`serve --allow-host NAME`, lower-cased; a bad name is a ClipsnailError). A DNS name is never admitted unless
    listed: that is what defeats DNS rebinding, where a page on evil.example re-resolves its own name to this
    server and then reads it as same-origin (Host: evil.example)."""
    names = list(LOOPBACK_HOSTS)
    for name in [bind, *extra]:
        name = name.strip().lower().removeprefix("[").removesuffix("]")
        if name and name not in names and name not in WILDCARD_ADDRESSES:
            if _HOST_HEADER.fullmatch(name) is None and not _ip_literal(name):
                raise ClipsnailError(f"--allow-host {name!r}: not a host name or IP address")
            names.append(name)
    return tuple(names)


def _host_allowed(name: str | None, allowed: frozenset[str], any_ip_address: bool) -> bool:
    """The name must be in `allowed` ("127.0.0.1" there admits the whole 127.0.0.0/8 block, which is all loopback),
    or be an IP address when `any_ip_address` (a wildcard bind: an address literal cannot be rebound to another
    machine the way a DNS name can)."""
    if name is None:
        return False
    if name in allowed or (any_ip_address and _ip_literal(name)):
        return True
    octets = _IPV4_127.fullmatch(name)
    return "127.0.0.1" in allowed and octets is not None and all(int(o) <= 255 for o in octets.groups())


def _same_origin(origin: str, host: str) -> bool:
    """Origin is exactly http(s)://HOST of this request ("null", paths, userinfo: no)."""
    match = _ORIGIN.fullmatch(origin)
    return match is not None and match["host"].lower() == host.lower()


def _finite(value):
    """A validation error echoes its input, and JSON has no NaN or Infinity (Starlette refuses to encode them:
    a 500): such numbers are shown as strings ("NaN", "Infinity"; 1e400 was parsed as Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _query_side(model) -> int:
    """The shortest side an image query is decoded at: twice the model's input size (its preprocess resizes the
    shorter side to that size and crops; the margin keeps the resize's antialiasing as good as from full size)."""
    return 2 * model.cfg.image_size


class _LRU:
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


def create_app(index, model, generator=None, limits: Limits | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS, any_ip_address: bool = False) -> FastAPI:
    """The app over a loaded ImageIndex and its CLIP model (and optionally a text-to-image generator).

    allowed_hosts: the host names a request may address (Host header; "127.0.0.1" admits all of 127.0.0.0/8;
    `allowed_host_names` makes the list for a bound address); any_ip_address: also any IP address (for a server
    bound to every interface, reached at whichever address the machine has)."""
    limits = limits or Limits()
    queue = GenerationQueue(generator, limits.max_waiting_generations, limits.generate_chunk) if generator else None
    # Decodes wait for one of these threads without holding a threadpool thread or any pixels; at most
    # max_decoding full-size images exist at once, however many uploads arrive together.
    decoder = ThreadPoolExecutor(max_workers=limits.max_decoding, thread_name_prefix="clipsnail-decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        decoder.shutdown(wait=False, cancel_futures=True)
        if queue is not None:
            queue.close()

    # docs_url / redoc_url off: FastAPI's pages load unpinned scripts from a CDN into this origin.
    app = FastAPI(title="clipsnail", version="1", summary="Search an image collection by text or by image, "
                  "zero-shot labels, text to image.", max_body_size=limits.max_json_bytes, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    upload_body_limit = limits.max_upload_bytes + 64 * 2**10  # the file plus multipart headers and small fields
    lock = threading.Lock()
    page, csp = _page()
    query_side = _query_side(model)
    app.state.generation = queue
    allowed = frozenset(h.lower() for h in allowed_hosts)

    def secure(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        # No other site may embed our answers (thumbnails above all) as images or scripts of its own pages.
        response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", DEFAULT_CSP)
        return response

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if not _host_allowed(_host_name(host), allowed, any_ip_address):
            answered = ", ".join(sorted(allowed)) + (" and IP addresses" if any_ip_address else "")
            message = f"this server answers {answered}; start it with --allow-host NAME to answer another name"
            return secure(JSONResponse({"detail": f"unexpected Host header ({message})"}, status_code=400))
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:  # "null" (sandboxed) too
            if not _same_origin(origin, host):
                return secure(JSONResponse({"detail": "cross-origin request refused"}, status_code=403))
        return secure(await call_next(request))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)

    # ------------------------------------------------------------------------------------------- helpers

    @torch.inference_mode()
    def embed_text(text: str) -> np.ndarray:
        with lock:
            return model.encode_text([text]).float().cpu().numpy()

    @torch.inference_mode()
    def embed_image(image) -> np.ndarray:
        with lock:
            return model.encode_image([image]).float().cpu().numpy()

    def search(queries: np.ndarray, k: int) -> list[Hit]:
        k = min(k, len(index))
        if k == 0:
            return []
        with lock:
            hits = index.search(np.ascontiguousarray(queries, dtype=np.float32), k=k)[0]
        # A name that is not UTF-8 is shown lossily (U+FFFD); JSON cannot carry its bytes, the id still names it.
        return [Hit(id=h.id, name=display_name(Path(h.path).name), path=display_name(index.rel_paths[h.id]),
                    score=round(float(h.score), 4), thumb_url=f"/api/thumb/{h.id}") for h in hits]

    @functools.cache  # built on first use (a text-only server never needs it), whole before any thread sees it
    def ids_by_path() -> dict[str, int]:
        ids = {rel: i for i, rel in enumerate(index.rel_paths)}
        for i, rel in enumerate(index.rel_paths):  # a path as the answers show it names the image too
            ids.setdefault(display_name(rel), i)
        return ids

    def indexed_id(text: str) -> int | None:
        """The position of the indexed image whose path relative to the root is `text` (or ./`text`)."""
        return ids_by_path().get(text.removeprefix("./"))

    def index_image(text: str) -> str | None:
        """parse_query's image terms on a server: an image of the index, never a file of the server. Only names
        with an image extension can be indexed images, so text terms cost no lookup."""
        if not (looks_like_path(text) or text.lower().endswith(IMAGE_EXTENSIONS)):
            return None
        if indexed_id(text) is not None:
            return text
        if looks_like_path(text):
            raise QueryError(f"{text}: not an image of this index (name one by its path relative to the index "
                             "root, as search results show it)")
        return None  # "cat.png" that is not in the index: text, as on the command line

    # Opened now and kept (memory-mapped, one row read per image term): an `index update` while the server runs
    # swaps in a new directory whose rows may be in another order, and this handle still reads the files of the
    # index being served.
    try:
        from safetensors import safe_open

        stored = safe_open(str(index.index_dir / VECTORS), framework="numpy")
        problem = None if stored.get_slice("vectors").get_shape() == [len(index), index.dim] else "wrong shape"
    except Exception as e:  # safetensors' own error types
        stored, problem = None, str(e)

    def stored_vector(i: int) -> np.ndarray:
        """The indexed embedding i [1, D]."""
        if problem is not None:  # the server's data is damaged, not the request
            raise _bad_request(404, f"the index's stored vectors cannot be read ({problem})")
        with lock:
            return np.asarray(stored.get_slice("vectors")[i:i + 1], dtype=np.float32)

    def query_vector(q: str) -> np.ndarray:
        """The embedding of a query in clipsnail.inference.query's grammar; a malformed query is a 422 saying why."""
        try:
            terms = parse_query(q, image=index_image)
            vectors = [torch.from_numpy(stored_vector(indexed_id(t.value)) if t.kind == "image"
                                        else embed_text(t.value)) for t in terms]
            return combine(vectors, [t.weight for t in terms]).numpy()
        except QueryError as e:
            raise _bad_request(422, str(e)) from None

    zero_shot_cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def class_weights(classes: list[str]) -> torch.Tensor:
        from clipsnail.inference.evaluate import default_templates, zero_shot_weights

        found = {c: zero_shot_cache.get(c) for c in classes}
        missing = [c for c, w in found.items() if w is None]
        if missing:
            with lock:
                found.update(zip(missing, zero_shot_weights(model, missing, default_templates())))
            if len(zero_shot_cache) > 4096:  # bounded: users type arbitrary class names
                zero_shot_cache.clear()
            zero_shot_cache.update((c, found[c]) for c in missing)
        return torch.stack([found[c] for c in classes])

    async def decode(function: Callable, *args):
        """function(*args) on the decoding threads; BadImage becomes its HTTP status."""
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, functools.partial(function, *args))
        except BadImage as e:
            raise _bad_request(e.status, str(e)) from None

    def read_and_decode(file: UploadFile):
        # Read here, on a decoding thread, so that waiting uploads hold no copy of their bytes in memory
        # (Starlette spools each one to a temporary file past 1 MB).
        data = file.file.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise BadImage(f"the upload is over {limits.max_upload_bytes // 2**20} MB", 413)
        return decode_upload(data, limits.max_image_pixels, query_side)

    async def read_upload(file: UploadFile):
        return await decode(read_and_decode, file)

    def from_index(function: Callable, i: int, *args):
        """function(path, root, follow_links, *args) on the indexed file i. Whatever is wrong with the file (gone,
        replaced by a FIFO, undecodable) is a fault of the server's data, not of the request: a 404 saying what."""
        try:
            return function(Path(index.paths[i]), index.root, index.follow_links, *args)
        except BadImage as e:
            raise BadImage(str(e) if e.status == 404 else f"the indexed file cannot be decoded: {e}", 404) from None

    def indexed_image(i: int):
        return from_index(load_file, i, limits.max_image_pixels, query_side)

    thumbs = _LRU(limits.thumb_cache)

    def thumb_bytes(i: int) -> tuple[bytes, str]:
        return from_index(thumbnail, i, limits.thumb_size, limits.max_image_pixels)

    def check_text(text: str, what: str) -> str:
        text = text.strip()
        if not text:
            raise _bad_request(422, f"the {what} is empty")
        return text

    k_query = Query(10, ge=1, le=limits.max_k, description="number of results")
    k_form = Form(10, ge=1, le=limits.max_k, description="number of results")
    image_id = PathParam(ge=0, le=2**31, description="position in the index (from a search hit)")

    # ------------------------------------------------------------------------------------------- routes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home():
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    @app.get("/api/info", response_model=Info, tags=["info"])
    def info():
        model_name = display_name(Path(index.model_dir).name) if index.model_dir else "?"
        return Info(images=len(index), dim=index.dim, model=model_name, generator=queue is not None,
                    generator_image_size=generator.config.data.image_size if generator is not None else None,
                    limits=dataclasses.asdict(limits))

    @app.get("/api/search", response_model=SearchResult, tags=["search"])
    def search_text(q: str = Query(min_length=1, max_length=limits.max_query_chars,
                                   description="text, or weighted terms added and subtracted: '2:golden retriever "
                                               "+ trip/pool.jpg - fruit' (an image term is an indexed image's path, "
                                               "as hits show it)"),
                    k: int = k_query):
        start = time.perf_counter()
        hits = search(query_vector(q), k)
        return SearchResult(hits=hits, seconds=round(time.perf_counter() - start, 4))

    @app.post("/api/search/image", response_model=SearchResult, tags=["search"], max_body_size=upload_body_limit)
    async def search_image(file: UploadFile = File(description="an image (PNG, JPEG, GIF, WebP, BMP, TIFF)"),
                           k: int = k_form):
        start = time.perf_counter()
        image = await read_upload(file)
        hits = await run_in_threadpool(lambda: search(embed_image(image), k))
        return SearchResult(hits=hits, seconds=round(time.perf_counter() - start, 4))

    @app.get("/api/similar/{id}", response_model=SearchResult, tags=["search"])
    async def similar(id: int = image_id, k: int = k_query):
        """Images like the indexed image `id` (it comes first, with score ~1)."""
        if id >= len(index):
            raise _bad_request(404, "no image with that id in the index")
        start = time.perf_counter()
        image = await decode(indexed_image, id)
        hits = await run_in_threadpool(lambda: search(embed_image(image), k))
        return SearchResult(hits=hits, seconds=round(time.perf_counter() - start, 4))

    @app.post("/api/zeroshot", response_model=ZeroShotResult, tags=["zero-shot"], max_body_size=upload_body_limit)
    async def zeroshot(file: UploadFile = File(description="an image"),
                       classes: str = Form(min_length=1, max_length=limits.max_classes * (limits.max_class_chars + 2),
                                           description="comma-separated class names, e.g. 'cat, dog, car'")):
        start = time.perf_counter()
        names = _parse_classes(classes, limits)
        image = await read_upload(file)

        def run():
            from clipsnail.inference.evaluate import probability_scale, zero_shot_logits

            probs = zero_shot_logits(torch.from_numpy(embed_image(image)), class_weights(names),
                                     probability_scale(model)).softmax(-1)[0]
            return [Label(label=names[j], prob=round(float(probs[j]), 4)) for j in probs.argsort(descending=True)]

        labels = await run_in_threadpool(run)
        return ZeroShotResult(labels=labels, seconds=round(time.perf_counter() - start, 4))

    @app.get("/api/thumb/{id}", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, 404: {"description": "no such id"}})
    async def thumb(id: int = image_id):
        """A thumbnail of the indexed image `id` (PNG for small images, JPEG otherwise)."""
        if id >= len(index):
            raise _bad_request(404, "no image with that id in the index")
        cached = thumbs.get(id)  # a hit need not wait for a decoding thread
        if cached is None:
            cached = await decode(thumb_bytes, id)
            thumbs.put(id, cached)
        data, media_type = cached
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    class GenerateRequest(BaseModel):
        prompt: str = Field(min_length=1, max_length=limits.max_query_chars)
        n: int = Field(8, ge=1, le=limits.max_generate_n, description="samples to draw")
        rerank: int = Field(4, ge=0, le=limits.max_generate_n, description="keep the best k by CLIP score (0: all)")
        guidance: float = Field(3.0, ge=0.0, le=10.0, allow_inf_nan=False,
                                description="classifier-free guidance scale (1: none)")
        temperature: float = Field(1.0, ge=0.05, le=2.0, allow_inf_nan=False)
        seed: int | None = Field(None, ge=0, le=2**31 - 1, description="random when not given")
        wait: bool = Field(False, description="answer when the job is done instead of at once")

        @model_validator(mode="after")
        def _rerank_at_most_n(self):
            if self.rerank > self.n:
                raise ValueError(f"rerank ({self.rerank}) must be at most n ({self.n})")
            return self

    def require_generator() -> GenerationQueue:
        if queue is None:
            raise _bad_request(404, "generation is disabled: start the server with --generator RUN")
        return queue

    @app.post("/api/generate", response_model=GenerationJob, status_code=202, tags=["generate"],
              responses={200: {"model": GenerationJob, "description": "done (with wait: true)"},
                         404: {"description": "no generator"}, 429: {"description": "queue full"}})
    async def generate(body: GenerateRequest):
        """Queue a text-to-image job; poll GET /api/generate/{id} (images appear as they finish)."""
        q = require_generator()
        try:
            job = q.submit(check_text(body.prompt, "prompt"), body.n, body.rerank, body.guidance, body.temperature,
                           body.seed)
        except QueueFull as e:
            return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "10"})
        if body.wait:
            await run_in_threadpool(job.finished.wait, limits.generate_wait_s)
        return JSONResponse(q.view(job), status_code=200 if job.finished.is_set() else 202)

    @app.get("/api/generate/{job_id}", response_model=GenerationJob, tags=["generate"])
    def generation(job_id: str = PathParam(pattern=r"^[0-9a-f]{16}$")):
        q = require_generator()
        job = q.get(job_id)
        if job is None:
            raise _bad_request(404, "no such generation job (finished jobs are kept for a while only)")
        return q.view(job)

    return app

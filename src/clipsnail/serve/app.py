"""The web app: a JSON API under /api/ (OpenAPI schema at /openapi.json) and one static page at /, assembled from
its parts: `schemas` (limits, request and answer models), `security` (Host and Origin checks, CSP, headers),
`service` (the index and model behind a lock, caches, decoding threads) and `routes`.

Safe by default, because the index is usually someone's private photo collection:
- `run_server` binds 127.0.0.1, and requests must name a loopback host (a web page elsewhere cannot reach the app
  by rebinding its DNS name to 127.0.0.1). The Host header is parsed strictly: a loopback name (127.x.y.z,
  localhost, [::1]) and an optional port of digits, nothing else. A POST whose Origin is not exactly
  http(s)://HOST of the request is refused.
- No third-party script ever runs in the app's origin: the page is the app's own HTML, its Content-Security-Policy
  admits only its own inline script and style (by hash), every HTML response carries a CSP, and FastAPI's
  interactive docs (/docs, /redoc), which load their scripts from a CDN, are off; the schema is at /openapi.json.
- Request bodies are limited while they are read (FastAPI's `max_body_size`: 413 before the rest arrives).
  Under `run_server` (its uvicorn protocol, `LimitedH11` in serve/__init__.py), a request's headers must arrive
  within 10 s and its body within 30 s of them (else 408 and the connection closed), and one client address may
  hold at most 32 connections (`serve --max-connections-per-client`; more are closed at once), so that slow or
  numerous connections from one client cannot take the server's 256 places.
  Numbers must be finite (Python's JSON parser accepts NaN and Infinity; they are a 422).
  Uploads must decode as a common raster image whose header declares at most `max_image_pixels` pixels.
- Decoding memory is bounded: images are decoded on a pool of `max_decoding` threads of its own (waiting requests
  hold no thread and no pixels), at about twice the model's input size rather than full size (images.py).
- No path from a request reaches the filesystem: images are named by their id in the index, and only
  files in the index are ever opened, through `safeio.read_regular` (regular files under the index's root only;
  a FIFO or a device named x.jpg is a 404 at once, never a blocked worker). An image term of a search query
  (clipsnail.inference.query) names an indexed image by its path relative to the index root and uses its stored
  vector; no file is opened for it, and any other term that looks like a path is a 422.
- Text, k, class lists and generation sizes are bounded; generation runs one job at a time behind a short queue.
- Model calls are serialised by a lock (sync routes run in FastAPI's threadpool), so concurrent requests are safe.
"""

import contextlib
from collections.abc import Sequence

from fastapi import FastAPI

from clipsnail.serve.generation import GenerationQueue
from clipsnail.serve.routes import generation_routes, page_routes, search_routes
from clipsnail.serve.schemas import Limits
from clipsnail.serve.security import LOOPBACK_HOSTS, WILDCARD_ADDRESSES, allowed_host_names, install_security
from clipsnail.serve.service import SearchService

__all__ = ["LOOPBACK_HOSTS", "WILDCARD_ADDRESSES", "Limits", "allowed_host_names", "create_app"]


def create_app(index, model, generator=None, limits: Limits | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS, any_ip_address: bool = False) -> FastAPI:
    """The app over a loaded ImageIndex and its CLIP model (and optionally a text-to-image generator).

    allowed_hosts: the host names a request may address (Host header; "127.0.0.1" admits all of 127.0.0.0/8;
    `allowed_host_names` makes the list for a bound address); any_ip_address: also any IP address (for a server
    bound to every interface, reached at whichever address the machine has)."""
    limits = limits or Limits()
    service = SearchService(index, model, limits)
    queue = GenerationQueue(generator, limits.max_waiting_generations, limits.generate_chunk) if generator else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()
        if queue is not None:
            queue.close()

    # docs_url / redoc_url off: FastAPI's pages load unpinned scripts from a CDN into this origin.
    app = FastAPI(title="clipsnail", version="1", summary="Search an image collection by text or by image, "
                  "zero-shot labels, text to image.", max_body_size=limits.max_json_bytes, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service, app.state.generation, app.state.generator = service, queue, generator
    install_security(app, allowed_hosts, any_ip_address)
    for router in (page_routes(), search_routes(limits), generation_routes(limits)):
        app.include_router(router)
    return app

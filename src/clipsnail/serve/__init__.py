"""The web app (`clipsnail serve`): text and image search over an index, zero-shot labels, text to image.

    from clipsnail.serve import create_app      # the FastAPI app, for tests or another ASGI server
    from clipsnail.serve import run_server      # load an index (+ generator) and serve it with uvicorn
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from clipsnail.apps.hub import load
from clipsnail.core.errors import ClipsnailError
from clipsnail.inference.generate import TextToImage
from clipsnail.inference.index import ImageIndex
from clipsnail.serve.app import LOOPBACK_HOSTS, WILDCARD_ADDRESSES, Limits, allowed_host_names, create_app

__all__ = ["Limits", "allowed_host_names", "create_app", "load_generator", "run_server"]

log = logging.getLogger(__name__)

# Connection limits: each open socket is a file descriptor, and a default `ulimit -n` is 1024. A client gets this
# long to send a request's headers (slowloris: headers one byte at a time keep a socket forever) ...
HEADER_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 5  # ... and a kept-alive connection is closed after this long without a new request.
MAX_CONCURRENCY = 256  # connections and running requests; past it a request gets 503 at once


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than HEADER_TIMEOUT_S (uvicorn
    itself waits forever for them; its keep-alive timer is reset by every byte)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._waiting_since_cycle = None
        self._wait_for_headers()

    def _wait_for_headers(self) -> None:
        self._waiting_since_cycle = self.cycle
        self._headers_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._headers_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._headers_timer is not None and self.cycle is not self._waiting_since_cycle:  # headers arrived
            self._headers_timer.cancel()
            self._headers_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._headers_timer is None and not self.transport.is_closing():
            self._wait_for_headers()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        super().connection_lost(exc)


def load_generator(run: str | Path, device: str = "cpu"):
    """A text-to-image run of kind pixelsnail, for the prompt box (kind retrieve draws nothing: refused)."""
    generator = load(run, device=device)
    if not isinstance(generator, TextToImage):
        raise ClipsnailError(f"{run}: --generator needs a text-to-image run of kind pixelsnail "
                             "(`clipsnail t2i train --kind pixelsnail`)")
    return generator


def run_server(index, generator=None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
               limits: Limits | None = None, allow_hosts: Sequence[str] = ()) -> None:
    """Load the index at `index` (a folder from `clipsnail index build`), its CLIP model and optionally a generator
    run, and serve the app with uvicorn until interrupted. Requests must address the server by a loopback name,
    the bound address or one of `allow_hosts` (any IP address too when bound to all interfaces)."""
    import uvicorn

    if not 1 <= port <= 65535:
        raise ClipsnailError(f"--port must be between 1 and 65535, got {port}")
    names = allowed_host_names(host, allow_hosts)
    image_index = ImageIndex.load(index)
    if image_index.model_dir is None or not Path(image_index.model_dir).is_dir():
        raise ClipsnailError(f"{index}: the CLIP run that made this index ({image_index.model_dir}) is not there; "
                             "rebuild the index with `clipsnail index build --model RUN`")
    image_index.check_model(image_index.model_dir)
    model = load(image_index.model_dir, device=device)
    gen = load_generator(generator, device) if generator else None
    if host not in LOOPBACK_HOSTS:
        log.warning("serving on %s: the app has no login; anyone who can reach this address can search and view "
                    "the indexed images", host)
    any_ip_address = host.strip("[]") in WILDCARD_ADDRESSES
    app = create_app(image_index, model, gen, limits, allowed_hosts=names, any_ip_address=any_ip_address)
    log.info("%d images indexed with %s%s; answering Host %s%s", len(image_index), image_index.model_dir,
             f"; generator {generator}" if generator else "", ", ".join(names),
             " and any IP address" if any_ip_address else "")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, http=HeaderTimeoutH11,
                timeout_keep_alive=IDLE_TIMEOUT_S, limit_concurrency=MAX_CONCURRENCY)

"""The web app (`clipsnail serve`): text and image search over an index, zero-shot labels, text to image.

    from clipsnail.serve import create_app      # the FastAPI app, for tests or another ASGI server
    from clipsnail.serve import run_server      # load an index (+ generator) and serve it with uvicorn
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path

try:  # the web stack (FastAPI, uvicorn) is the serve extra: without it, one line naming the pip install
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from clipsnail.serve.app import LOOPBACK_HOSTS, WILDCARD_ADDRESSES, Limits, allowed_host_names, create_app
except ImportError:
    from clipsnail.core.extras import require_extra

    require_extra("serve", "the web app")
    raise

from clipsnail.core.errors import ClipsnailError
from clipsnail.inference.index import ImageIndex
from clipsnail.serve.encoders import OnnxQueries, TorchQueries

__all__ = ["LimitedH11", "Limits", "allowed_host_names", "create_app", "load_generator", "run_server"]

log = logging.getLogger(__name__)

# Connection limits. Each open socket is a file descriptor (a default `ulimit -n` is 1024) and one of uvicorn's
# MAX_CONCURRENCY places, so a client that sends slowly must not keep one for long. A client gets this long to send
# a request's headers (slowloris: headers one byte at a time) ...
HEADER_TIMEOUT_S = 10.0
# ... and this long from the end of the headers to the end of the body (a 10 MB upload, Limits.max_upload_bytes,
# needs about 2.8 Mbit/s); past it the request is answered 408, unless an answer has begun, and the connection closed.
BODY_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 5  # a kept-alive connection is closed after this long without a new request
MAX_CONCURRENCY = 256  # connections and running requests; past it a request gets 503 at once
# Open connections per client address (an IPv6 client: per /64, what one host is usually given). One more is closed
# as soon as it is accepted, before anything is read, so that one client cannot take all MAX_CONCURRENCY places
# (browsers open at most 6 per server). Behind a reverse proxy every client has the proxy's address: raise it there.
MAX_CONNECTIONS_PER_CLIENT = 32


def client_key(host: str) -> str:
    """What the per-client cap counts by: the IP address, or for IPv6 its /64 network (one host may use them all)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with the limits it lacks (it waits forever for headers and bodies: its keep-alive timer
    is reset by every byte): a deadline for a request's headers and one for its body, and at most
    `max_connections_per_client` open connections per client. `configured(...)` makes a variant with other values
    (uvicorn takes a class, and makes one instance per connection)."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT  # 0: no cap
    _last_refusal_logged = -math.inf  # on this class: a flood of refused connections logs a line a minute at most

    @classmethod
    def configured(cls, **limits: float) -> type[LimitedH11]:
        unknown = set(limits) - {"header_timeout_s", "body_timeout_s", "max_connections_per_client"}
        if unknown:
            raise TypeError(f"unknown connection limits: {sorted(unknown)}")
        return type(cls.__name__, (cls,), limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._counted_as = client_key(self.client[0]) if self.client else None
        if self._over_client_cap():
            transport.close()
            return
        self._arm_timers()

    def _over_client_cap(self) -> bool:
        cap = self.max_connections_per_client
        if not cap or self._counted_as is None:
            return False
        # Counted by a scan of uvicorn's own set of open connections (this one included), which holds a few hundred
        # at most: no count of ours to keep in step with it.
        key = self._counted_as
        open_here = sum(1 for c in self.connections
                        if getattr(c, "_counted_as", None) == key and not c.transport.is_closing())
        if open_here <= cap:
            return False
        now = time.monotonic()
        if now - LimitedH11._last_refusal_logged >= 60:
            LimitedH11._last_refusal_logged = now
            log.warning("closing new connections from %s: it has %d open, the most one client may have "
                        "(serve --max-connections-per-client)", key, cap)
        return True

    def _arm_timers(self) -> None:
        """Run the header clock while a request's headers are awaited, and the body clock while its body is; both
        start when their wait does and are never restarted by the bytes that arrive."""
        # (A connection upgraded to a WebSocket has another protocol now, and its own rules.)
        closing = self.transport.is_closing() or self.transport.get_protocol() is not self
        state = self.conn.their_state
        self._headers_timer = self._timer(self._headers_timer, state is h11.IDLE and not closing,
                                          self.header_timeout_s, self._headers_too_slow)
        # The body clock runs until the body's end even when the app has answered already: a 413 is sent before
        # the rest of a large body arrives, and uvicorn then reads that rest, discarding it.
        self._body_timer = self._timer(self._body_timer, state is h11.SEND_BODY and not closing,
                                       self.body_timeout_s, self._body_too_slow)

    def _timer(self, timer: asyncio.TimerHandle | None, wanted: bool, seconds: float, callback):
        if wanted and timer is None:
            return self.loop.call_later(seconds, callback)
        if not wanted and timer is not None:
            timer.cancel()
            return None
        return timer

    def _headers_too_slow(self) -> None:
        self._headers_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and self.conn.our_state is h11.SEND_RESPONSE:
            # Say why (a slow uplink rather than an attack, perhaps). The app, waiting for the body, now reads a
            # disconnect, and whatever it answers goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
            message = f"the request body did not arrive within {self.body_timeout_s:g} s".encode()
            headers = [(b"content-type", b"text/plain; charset=utf-8"),
                       (b"content-length", str(len(message)).encode()), (b"connection", b"close")]
            for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                          h11.Data(data=message), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        self._arm_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_timers()  # the next request's headers, unless the body of this one is still arriving

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._headers_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._headers_timer = self._body_timer = None
        super().connection_lost(exc)


def load_generator(run: str | Path, device: str = "cpu"):
    """A text-to-image run of kind pixelsnail, for the prompt box (kind retrieve draws nothing: refused)."""
    from clipsnail.apps.hub import load
    from clipsnail.inference.generate import TextToImage

    generator = load(run, device=device)
    if not isinstance(generator, TextToImage):
        raise ClipsnailError(f"{run}: --generator needs a text-to-image run of kind pixelsnail "
                             "(`clipsnail t2i train --kind pixelsnail`)")
    return generator


def torch_model(index: ImageIndex, device: str):
    from clipsnail.apps.hub import load

    return load(index.model_dir, device=device)


def query_model(index: ImageIndex, device: str) -> OnnxQueries | TorchQueries:
    """What the app embeds queries with: on the CPU, the index's ONNX query encoder when it has one of its
    weights (onnxruntime alone: PyTorch is never imported), else the run in PyTorch."""
    import importlib.util

    folder = index.query_encoder() if device in ("auto", "cpu") else None
    if folder is not None and all(importlib.util.find_spec(m) for m in ("onnxruntime", "tokenizers")):
        from clipsnail.apps.export import OnnxClip

        onnx_clip = OnnxClip(folder)
        if "logit_bias" in onnx_clip.spec:  # an export before it recorded SigLIP's bias cannot give probabilities
            log.info("answering queries with the ONNX query encoder %s", folder)
            return OnnxQueries(onnx_clip)
    return TorchQueries(torch_model(index, device))


def run_server(index, generator=None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
               limits: Limits | None = None, allow_hosts: Sequence[str] = (),
               max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT, watch: bool = False,
               poll_seconds: float = 60.0) -> None:
    """Load the index at `index` (a folder from `clipsnail index build`), its CLIP model and optionally a generator
    run, and serve the app with uvicorn until interrupted. Requests must address the server by a loopback name,
    the bound address or one of `allow_hosts` (any IP address too when bound to all interfaces). A client address
    may hold `max_connections_per_client` connections at once (0: any number, up to MAX_CONCURRENCY). watch: follow
    the photo folder while serving (`clipsnail.inference.watch`), each new state of the index served at once."""
    import uvicorn

    if not 1 <= port <= 65535:
        raise ClipsnailError(f"--port must be between 1 and 65535, got {port}")
    if max_connections_per_client < 0:
        raise ClipsnailError(f"--max-connections-per-client must be 0 (no cap) or more, got "
                             f"{max_connections_per_client}")
    protocol = LimitedH11.configured(max_connections_per_client=max_connections_per_client)
    names = allowed_host_names(host, allow_hosts)
    image_index = ImageIndex.load(index)
    if image_index.model_dir is None or not Path(image_index.model_dir).is_dir():
        raise ClipsnailError(f"{index}: the CLIP run that made this index ({image_index.model_dir}) is not there; "
                             "rebuild the index with `clipsnail index build --model RUN`")
    image_index.check_model(image_index.model_dir)
    model = query_model(image_index, device)
    gen = load_generator(generator, device) if generator else None
    if host not in LOOPBACK_HOSTS:
        log.warning("serving on %s: the app has no login; anyone who can reach this address can search and view "
                    "the indexed images", host)
    any_ip_address = host.strip("[]") in WILDCARD_ADDRESSES
    app = create_app(image_index, model, gen, limits, allowed_hosts=names, any_ip_address=any_ip_address)
    log.info("%d images indexed with %s%s; answering Host %s%s", len(image_index), image_index.model_dir,
             f"; generator {generator}" if generator else "", ", ".join(names),
             " and any IP address" if any_ip_address else "")
    stop = threading.Event()
    if watch:
        from clipsnail.apps.export import photo_model_of
        from clipsnail.inference.watch import watch_index

        def swap(new_index, stats) -> None:
            app.state.service.swap(new_index)
            log.info("serving the updated index: %s", stats)

        if image_index.meta.get("backend", "torch").startswith("onnx"):
            photos_model = None  # the index's own query encoder encodes its photos
        else:
            photos_model = model.model if isinstance(model, TorchQueries) else torch_model(image_index, device)
        threading.Thread(target=watch_index, args=(photo_model_of(image_index, photos_model), index, stop),
                         name="clipsnail-watch", daemon=True,
                         kwargs={"on_update": swap, "poll_seconds": poll_seconds}).start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, http=protocol,
                    timeout_keep_alive=IDLE_TIMEOUT_S, limit_concurrency=MAX_CONCURRENCY)
    finally:
        stop.set()

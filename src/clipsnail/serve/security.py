"""What keeps the web app to its own user: the Host check against DNS rebinding, same-origin POSTs, the
Content-Security-Policy of the page, headers on every answer, and validation errors that can always be encoded.

A request must name a host the server answers (`allowed_host_names`: loopback names, the bound address, names given
with --allow-host; any IP address on a wildcard bind). The Host header is parsed strictly: a name and an optional
port of digits, nothing else. A POST whose Origin is not exactly http(s)://HOST of the request is refused.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import ipaddress
import json
import math
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from clipsnail.core.errors import ClipsnailError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def page_and_csp() -> tuple[str, str]:
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


def secure(response: Response) -> Response:
    """The headers every answer carries."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    # No other site may embed our answers (thumbnails above all) as images or scripts of its own pages.
    response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if response.headers.get("content-type", "").startswith("text/html"):
        response.headers.setdefault("Content-Security-Policy", DEFAULT_CSP)
    return response


def install_security(app: FastAPI, allowed_hosts: Sequence[str], any_ip_address: bool) -> None:
    """The Host and Origin checks before every route, `secure` headers on every answer, and a 422 for invalid
    requests that JSON can carry."""
    allowed = frozenset(h.lower() for h in allowed_hosts)

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

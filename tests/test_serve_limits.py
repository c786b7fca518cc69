"""The server's connection limits, against a real uvicorn server on a loopback port with the app over a tiny index:
a request body must arrive within the body deadline, and one client address may hold only so many connections.
Other clients are 127.0.0.2 (all of 127.0.0.0/8 is loopback). Header deadlines: tests/test_serve.py."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from clipsnail.inference.index import build_index
from clipsnail.serve import MAX_CONNECTIONS_PER_CLIENT, LimitedH11, create_app
from clipsnail.serve import client_key as key_of

SLOW_UPLOAD = (b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
               b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
               b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")


@pytest.fixture(scope="module")
def app(clip_model, shapes_dir, tmp_path_factory):
    index, _ = build_index(clip_model, shapes_dir / "images", tmp_path_factory.mktemp("limits") / "index",
                           progress=False)
    return create_app(index, clip_model)


@contextlib.contextmanager
def running(app, **limits):
    """uvicorn serving `app` on a free loopback port with our protocol and these limits, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           http=LimitedH11.configured(**limits)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        until(lambda: server.started, "uvicorn did not start")
        yield SimpleNamespace(port=sock.getsockname()[1], connections=server.server_state.connections)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def until(condition, message: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def get(port: int, path: str, client: str = "127.0.0.1") -> int:
    """The status of GET path on a new connection from the address `client`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(client, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def response_status(sock: socket.socket) -> int:
    """Read one whole answer from `sock` -> its status."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response.status


def trickle(port: int, head: bytes, every: float, seconds: float) -> tuple[bytes, float]:
    """Send `head`, then one body byte every `every` s until the server closes the connection (or `seconds` pass)
    -> what the server answered, and the seconds from the start of `head` to the close (the server's clock starts
    later: when the headers have arrived)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        start = time.monotonic()
        s.sendall(head)
        s.settimeout(every)
        answer = b""
        while time.monotonic() - start < seconds:
            try:
                s.sendall(b"a")  # an answer does not stop it: some clients read it only once they are done
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - start


def test_a_body_sent_too_slowly_is_answered_408_and_closed_at_the_deadline(app):
    with running(app, body_timeout_s=1.0) as server:
        answer, seconds = trickle(server.port, SLOW_UPLOAD, every=0.1, seconds=5)
        assert 1.0 <= seconds < 2.5, seconds
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"did not arrive within 1 s" in answer and b"connection: close" in answer.lower()
        assert get(server.port, "/api/info") == 200  # the server itself is fine
        until(lambda: len(server.connections) == 0, "the slow connection is still open")


def test_the_body_deadline_holds_after_an_early_answer(app):
    """A JSON body over the app's limit is answered 413 at once; uvicorn then reads (and drops) the rest of the
    body as it comes, which kept the connection open for as long as the client went on sending."""
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b'{"prompt": "' + b"a" * 20_000)
    with running(app, body_timeout_s=1.0) as server:
        answer, seconds = trickle(server.port, head, every=0.1, seconds=5)
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert 1.0 <= seconds < 2.5, seconds


def test_a_body_in_time_is_answered_and_the_connection_kept(app):
    body = b'{"prompt": "a red circle"}'
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with running(app, body_timeout_s=1.0) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head + body[:10])
        time.sleep(0.5)
        s.sendall(body[10:])
        assert response_status(s) == 404  # generation is off in this app: an answer all the same
        time.sleep(1.2)  # past the body deadline of the finished request: no 408, the connection is still there
        s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert response_status(s) == 200


def test_one_client_cannot_take_every_connection(app):
    with running(app, max_connections_per_client=3) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
        try:
            until(lambda: len(server.connections) == 3, "the server did not take the first three connections")
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as extra:
                try:
                    assert extra.recv(1) == b""  # closed at once, before it has sent anything
                except ConnectionResetError:
                    pass
            assert get(server.port, "/api/info", client="127.0.0.2") == 200  # another client is served meanwhile
            held[0].sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and so are the places held
            assert response_status(held[0]) == 200
            held.pop().close()
            until(lambda: len(server.connections) == 2, "the closed connection is still counted")
            assert get(server.port, "/api/info") == 200  # a place is free again for this address
        finally:
            for s in held:
                s.close()


def test_the_cap_counts_an_address_an_ipv6_host_by_its_64_and_the_cli_default_is_the_servers():
    from clipsnail.cli import build_parser

    assert key_of("127.0.0.1") == "127.0.0.1" != key_of("127.0.0.2")
    assert key_of("::ffff:10.0.0.1") == "10.0.0.1"
    assert key_of("2001:db8::1") == key_of("2001:db8::ffff:1") == "2001:db8::/64" != key_of("2001:db8:0:1::1")
    args = build_parser().parse_args(["serve", "--index", "x"])
    assert args.max_connections_per_client == MAX_CONNECTIONS_PER_CLIENT
    with pytest.raises(TypeError, match="unknown connection limits"):
        LimitedH11.configured(body_timeout=1)

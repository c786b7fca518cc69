"""The web app's JSON API (FastAPI TestClient, no sockets): search by text and by image, zero-shot labels,
thumbnails by index id, generation jobs, and the bad inputs it must refuse with a 4xx (never a 500)."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
from fastapi.responses import HTMLResponse
from fastapi.testclient import TestClient
from helpers import StandInGenerator, run_error, tiny_t2i_args
from PIL import Image

from clipsnail.cli import main
from clipsnail.core.errors import ClipsnailError
from clipsnail.inference.index import ImageIndex, build_index
from clipsnail.serve import Limits, allowed_host_names, create_app
from clipsnail.serve.security import LOOPBACK_HOSTS

BASE = "http://127.0.0.1"  # the app answers loopback host names only


@pytest.fixture(scope="module")
def served(clip_model, shapes_dir, tmp_path_factory):
    index, _ = build_index(clip_model, shapes_dir / "images", tmp_path_factory.mktemp("serve") / "index",
                           progress=False)
    return SimpleNamespace(index=index, model=clip_model)


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(served.index, served.model), base_url=BASE)


def png(size=(16, 16), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def noise_png() -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3)).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid ~100-byte PNG whose header declares width x height pixels (a decompression bomb's signature)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def upload(data: bytes, name="x.png", content_type="image/png"):
    return {"file": (name, data, content_type)}


# ----------------------------------------------------------------------------------------------- the happy paths


def test_info_and_page_and_openapi(client, served):
    info = client.get("/api/info").json()
    assert info["images"] == len(served.index) == 160 and info["dim"] == 16 and info["generator"] is False
    assert info["limits"]["max_upload_bytes"] == 10 * 2**20
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<title>clipsnail</title>" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]  # only the page's own script runs
    schema = client.get("/openapi.json").json()
    for path in ("/api/search", "/api/search/image", "/api/similar/{id}", "/api/zeroshot", "/api/thumb/{id}",
                 "/api/generate", "/api/generate/{job_id}", "/api/info"):
        assert path in schema["paths"], path


def test_text_search_returns_scored_hits_with_thumbnails(client, served):
    r = client.get("/api/search", params={"q": "a red circle", "k": 7})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert len(hits) == 7
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
    for h in hits:
        assert h["thumb_url"] == f"/api/thumb/{h['id']}"
        assert h["name"] == served.index.paths[h["id"]].name and "/" not in h["name"]
    thumb = client.get(hits[0]["thumb_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (16, 16)
    assert client.get(hits[0]["thumb_url"]).content == thumb.content  # from the cache, same bytes
    # k larger than the index gives the whole index
    assert len(client.get("/api/search", params={"q": "a shape", "k": 100}).json()["hits"]) == 100


def test_unicode_and_odd_queries_are_just_text(client):
    # (A term that starts like a path, "../../etc/passwd", is a 422: tests/test_query.py.)
    for q in ["🐌 ein rotes Quadrat — 赤い円", "..\\..\\etc\\passwd", "%00\x00<script>alert(1)</script>", "a" * 200]:
        r = client.get("/api/search", params={"q": q, "k": 3})
        assert r.status_code == 200, (q, r.text)
        assert len(r.json()["hits"]) == 3


def test_image_search_finds_the_same_image_first(client, served):
    path = served.index.paths[5]
    r = client.post("/api/search/image", files=upload(path.read_bytes(), path.name), data={"k": "5"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and hits[0]["score"] > 0.999
    assert 5 in [h["id"] for h in hits if h["score"] > 0.999]  # duplicates of a scene may tie with it
    similar = client.get("/api/similar/5", params={"k": 5}).json()["hits"]
    assert [h["id"] for h in similar] == [h["id"] for h in hits]


def test_an_uploaded_transparent_image_is_decoded_as_when_it_was_indexed(clip_model, tmp_path):
    """Alpha is composited on white by the one decoder that indexing and uploads share: uploading an indexed
    RGBA image gives back its stored vector (score 1), where dropping alpha left black and a different vector."""
    folder = tmp_path / "alpha"
    folder.mkdir()
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((220, 20, 20, 255), (8, 8, 24, 24))  # a red square on a transparent (black underneath) field
    rgba.save(folder / "square.png")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "black.png")
    index, _ = build_index(clip_model, folder, tmp_path / "idx", progress=False)
    client = TestClient(create_app(index, clip_model), base_url=BASE)
    r = client.post("/api/search/image", files=upload((folder / "square.png").read_bytes(), "square.png"))
    hits = r.json()["hits"]
    assert hits[0]["name"] == "square.png" and hits[0]["score"] >= 0.9999, hits


def test_zero_shot_labels(client, served):
    r = client.post("/api/zeroshot", files=upload(served.index.paths[0].read_bytes()),
                    data={"classes": " red shape, blue shape ,green shape, red shape,"})
    assert r.status_code == 200, r.text
    labels = r.json()["labels"]
    assert sorted(lb["label"] for lb in labels) == ["blue shape", "green shape", "red shape"]  # trimmed, deduplicated
    probs = [lb["prob"] for lb in labels]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("params", [{"q": ""}, {"q": "   "}, {}, {"q": "x" * 201}, {"q": "a", "k": 0},
                                    {"q": "a", "k": 101}, {"q": "a", "k": "ten"}, {"q": "a", "k": -5}])
def test_bad_queries_are_422(client, params):
    r = client.get("/api/search", params=params)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("url,status", [
    ("/api/thumb/..%2F..%2Fetc%2Fpasswd", 404), ("/api/thumb/%2Fetc%2Fpasswd", 404), ("/api/thumb/-1", 422),
    ("/api/thumb/..", 404), ("/api/thumb/%2e%2e", 422), ("/api/thumb/0%2F..%2F..%2Fetc%2Fpasswd", 404),
    ("/api/thumb/160", 404), ("/api/thumb/99999999999", 422), ("/api/thumb/1.5", 422), ("/api/thumb/", 404),
    ("/api/thumb/0x01", 422), ("/api/similar/..%2Fx", 404), ("/api/similar/..", 404), ("/api/similar/160", 404),
    ("/static/../../../etc/passwd", 404), ("/..%2F..%2Fetc%2Fpasswd", 404),
])
def test_no_path_from_a_request_reaches_the_filesystem(client, url, status):
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.text)
    assert b"root:" not in r.content


def test_huge_uploads_are_413(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(11 * 2**20)
    assert client.post("/api/search/image", files=upload(big)).status_code == 413
    assert client.post("/api/zeroshot", files=upload(big), data={"classes": "a, b"}).status_code == 413

    # JSON bodies have a small limit of their own
    assert client.post("/api/generate", json={"prompt": "x" * 40_000}).status_code == 413


@pytest.mark.parametrize("data,status", [
    (b"hello, not an image", 415), (b"", 400), (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415),
    (png()[:40], 415), (noise_png()[:400], 400), (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415),
])
def test_non_images_are_4xx(client, data, status):
    for url, extra in (("/api/search/image", {}), ("/api/zeroshot", {"classes": "a, b"})):
        r = client.post(url, files=upload(data), data=extra)
        assert r.status_code == status, (url, data[:20], r.text)


def test_decompression_bomb_is_refused_from_its_header(client):
    r = client.post("/api/search/image", files=upload(bomb_png()))
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    r = client.post("/api/search/image", files=upload(bomb_png(8000, 8000)))  # 64 M pixels: over our 40 M
    assert r.status_code == 413


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damage it skips
def test_damaged_images_of_every_format_are_refused_cleanly():
    """Random byte damage to valid files of each accepted format: an RGB image or BadImage, never anything else."""
    from clipsnail.serve.images import BadImage, decode_upload

    rng = random.Random(0)
    base = Image.frombytes("RGB", (24, 24), rng.randbytes(24 * 24 * 3))
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        out = io.BytesIO()
        base.save(out, format=fmt)
        good = out.getvalue()
        assert decode_upload(good, 10_000).size == (24, 24)
        for _ in range(40):
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randint(8, len(data))] if rng.random() < 0.3 else data)
            try:
                assert decode_upload(data, 10_000).mode == "RGB"
            except BadImage as e:
                assert e.status in (400, 413, 415)


def test_missing_upload_and_bad_classes(client):
    assert client.post("/api/search/image", data={"k": "3"}).status_code == 422
    for classes in ["", "only one", ", ,", ",".join(f"c{i}" for i in range(51)), "a, " + "b" * 101]:
        r = client.post("/api/zeroshot", files=upload(png()), data={"classes": classes})
        assert r.status_code == 422, classes


def test_foreign_hosts_and_origins_are_refused(client):
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends Host: evil.example
    assert client.get("/api/info", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
    for origin in ("https://evil.example", "http://127.0.0.1.evil.example", "null"):
        r = client.post("/api/search/image", files=upload(png()), headers={"origin": origin})
        assert r.status_code == 403, origin
    r = client.post("/api/search/image", files=upload(png()), headers={"origin": "http://127.0.0.1"})
    assert r.status_code == 200


def test_a_server_bound_elsewhere_still_refuses_rebound_names(served):
    """Bound to 127.0.0.2 or to every interface, the Host check stays on: a rebound DNS name is refused, the bound
    address and names given with --allow-host are answered."""
    names = allowed_host_names("127.0.0.2")
    assert names == ("127.0.0.1", "localhost", "::1", "127.0.0.2")
    bound = TestClient(create_app(served.index, served.model, allowed_hosts=names), base_url="http://127.0.0.2")
    assert bound.get("/api/info", headers={"host": "evil.example:8000"}).status_code == 400
    assert bound.get("/api/info", headers={"host": "127.0.0.2:8000"}).status_code == 200
    r = bound.post("/api/search/image", files=upload(png()),
                   headers={"host": "evil.example:8000", "origin": "http://evil.example:8000"})
    assert r.status_code == 400 and "--allow-host" in r.json()["detail"]

    everywhere = TestClient(create_app(served.index, served.model, any_ip_address=True,
                                       allowed_hosts=allowed_host_names("0.0.0.0", ["PhotoBox.local"])))
    assert allowed_host_names("0.0.0.0") == LOOPBACK_HOSTS
    for host, status in [("192.168.1.5:8000", 200), ("[fe80::1]:8000", 200), ("photobox.local:8000", 200),
                         ("evil.example", 400), ("192.168.1.5.evil.example", 400)]:
        assert everywhere.get("/api/info", headers={"host": host}).status_code == status, host
    with pytest.raises(ClipsnailError, match="--allow-host 'bad name': not a host name"):
        allowed_host_names("0.0.0.0", ["bad name"])


def test_answers_cannot_be_embedded_by_other_sites(client):
    r = client.get("/api/thumb/0")
    assert r.status_code == 200 and r.headers["cross-origin-resource-policy"] == "same-origin"


def test_slow_request_headers_are_cut_off():
    """A real uvicorn server with our protocol: a client sending its headers too slowly (slowloris) is
    disconnected; a normal request on another connection is answered. (Bodies: tests/test_serve_limits.py.)"""
    import socket

    import uvicorn

    from clipsnail.serve import LimitedH11

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           http=LimitedH11.configured(header_timeout_s=0.3)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
            time.sleep(0.8)
            assert slow.recv(100) == b""  # closed by the server
        with socket.create_connection(("127.0.0.1", port), timeout=5) as quick:
            quick.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            time.sleep(0.5)  # longer than the header timeout: the answered request must not be cut
            assert quick.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def test_serve_refuses_a_bad_port(capsys, tmp_path):
    line = run_error(capsys, ["serve", "--index", str(tmp_path / "none"), "--port", "99999"])
    assert "--port must be between 1 and 65535, got 99999" in line


def test_thumbnail_of_a_file_gone_since_indexing_is_404(served, tmp_path):
    class Moved:  # an index whose first file has disappeared
        def __init__(self, index):
            self.index = index

        def path_of(self, i):
            return tmp_path / "gone.png" if i == 0 else self.index.path_of(i)

        def __getattr__(self, name):
            return getattr(self.index, name)

        def __len__(self):
            return len(self.index)

    assert isinstance(served.index, ImageIndex)
    c = TestClient(create_app(Moved(served.index), served.model), base_url=BASE)
    assert c.get("/api/thumb/0").status_code == 404
    assert c.get("/api/similar/0").status_code == 404
    assert c.get("/api/thumb/1").status_code == 200


# ----------------------------------------------------------------------------------------------- generation


def test_generation_disabled_is_404(client):
    assert client.post("/api/generate", json={"prompt": "a red circle"}).status_code == 404
    assert client.get("/api/generate/0123456789abcdef").status_code == 404


def test_generation_returns_reranked_images(served):
    generator = StandInGenerator()
    c = TestClient(create_app(served.index, served.model, generator, Limits(generate_chunk=3)), base_url=BASE)
    assert c.get("/api/info").json()["generator"] is True
    r = c.post("/api/generate", json={"prompt": "a red circle", "n": 7, "rerank": 4, "guidance": 2, "seed": 11,
                                      "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and job["drawn"] == 7 and len(job["images"]) == 4
    scores = [im["score"] for im in job["images"]]
    assert scores == sorted(scores, reverse=True)
    assert [n for _, n, *_ in generator.calls] == [3, 3, 1]  # drawn in chunks: the page shows each as it finishes
    assert all(call[2] == 2 and call[5] == 11 + i for i, call in enumerate(generator.calls))
    image = job["images"][0]["image"]
    assert image.startswith("data:image/png;base64,")
    assert c.get(f"/api/generate/{job['id']}").json()["images"] == job["images"]

    # without wait: 202 at once, then poll
    r = c.post("/api/generate", json={"prompt": "a blue square", "n": 2, "rerank": 0})
    assert r.status_code == 202
    job_id = r.json()["id"]
    for _ in range(100):
        job = c.get(f"/api/generate/{job_id}").json()
        if job["status"] == "done":
            break
        time.sleep(0.05)
    assert job["status"] == "done" and len(job["images"]) == 2


@pytest.mark.parametrize("body", [{"prompt": ""}, {"prompt": " "}, {"prompt": "a", "n": 17}, {"prompt": "a", "n": 0},
                                  {"prompt": "a", "n": 4, "rerank": 5}, {"prompt": "a", "guidance": 100},
                                  {"prompt": "a", "temperature": 0}, {"prompt": "a" * 201}, {"n": 2}])
def test_generation_requests_are_bounded(served, body):
    c = TestClient(create_app(served.index, served.model, StandInGenerator()), base_url=BASE)
    assert c.post("/api/generate", json=body).status_code == 422
    assert c.get("/api/generate/..%2F..%2Fetc").status_code in (404, 422)


def test_generation_queue_is_bounded_and_one_at_a_time(served):
    gate = threading.Event()
    generator = StandInGenerator(gate=gate)
    c = TestClient(create_app(served.index, served.model, generator, Limits(max_waiting_generations=1)),
                   base_url=BASE)
    first = c.post("/api/generate", json={"prompt": "one", "n": 1, "rerank": 0}).json()
    for _ in range(100):  # the worker picks it up; it blocks in generate
        if c.get(f"/api/generate/{first['id']}").json()["status"] == "running":
            break
        time.sleep(0.02)
    second = c.post("/api/generate", json={"prompt": "two", "n": 1, "rerank": 0})
    assert second.status_code == 202 and second.json()["position"] == 1
    third = c.post("/api/generate", json={"prompt": "three", "n": 1, "rerank": 0})
    assert third.status_code == 429 and "Retry-After" in third.headers
    assert len(generator.calls) == 1  # never two at once
    gate.set()
    for job_id in (first["id"], second.json()["id"]):
        for _ in range(200):
            if (job := c.get(f"/api/generate/{job_id}").json())["status"] == "done":
                break
            time.sleep(0.02)
        assert job["status"] == "done"
    r = c.post("/api/generate", json={"prompt": "four", "n": 1, "rerank": 0, "wait": True})
    assert r.status_code == 200 and r.json()["status"] == "done"  # room again once the queue drained


@pytest.mark.slow
def test_generation_with_a_tiny_trained_text_to_image_run(served, clip_run, shapes_dir, tmp_path):
    from clipsnail.serve import load_generator

    run = tmp_path / "t2i"
    assert main(tiny_t2i_args(clip_run, shapes_dir, run, "data.eval_prompts=1")) == 0
    c = TestClient(create_app(served.index, served.model, load_generator(run)), base_url=BASE)
    assert c.get("/api/info").json()["generator_image_size"] == 8
    r = c.post("/api/generate", json={"prompt": "a red circle", "n": 3, "rerank": 2, "guidance": 2, "seed": 0,
                                      "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and len(job["images"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(job["images"][0]["image"].split(",", 1)[1])))
    assert image.size == (8, 8) and image.mode == "RGB"


def test_a_clip_run_is_not_a_generator(clip_run):
    from clipsnail.core.errors import ClipsnailError
    from clipsnail.serve import load_generator

    with pytest.raises(ClipsnailError, match="kind pixelsnail"):
        load_generator(clip_run)


# ----------------------------------------------------------------------------------------------- hostile inputs


def strict_json(text: str):
    """JSON as a browser parses it: NaN / Infinity literals are an error."""
    def refuse(literal):
        raise ValueError(f"non-standard JSON literal {literal}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("field", ["guidance", "temperature", "n", "seed", "rerank", "wait", "prompt"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_in_generate_are_422(served, field, literal):
    """Python's json parser accepts NaN and Infinity (and reads 1e400 as Infinity); echoing them in the 422 used to
    fail to encode: a 500, with or without a generator."""
    for generator in (None, StandInGenerator()):
        c = TestClient(create_app(served.index, served.model, generator), base_url=BASE)
        body = f'{{"prompt": "a red circle", "{field}": {literal}}}'
        r = c.post("/api/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (field, literal, r.text)
        detail = strict_json(r.text)["detail"]
        assert detail[0]["loc"] == ["body", field]
    assert not generator.calls


@pytest.mark.parametrize("value", ["NaN", "nan", "Infinity", "inf", "-inf", "1e400", "1" + "0" * 400])
def test_non_finite_numbers_in_queries_forms_and_paths_are_422(client, value):
    responses = [client.get("/api/search", params={"q": "a", "k": value}),
                 client.post("/api/search/image", files=upload(png()), data={"k": value}),
                 client.get(f"/api/similar/{value}"), client.get(f"/api/thumb/{value}"),
                 client.get("/api/similar/0", params={"k": value})]
    for r in responses:
        assert r.status_code == 422, (r.url, r.text)
        strict_json(r.text)


def test_api_docs_load_no_third_party_script_and_html_has_a_csp(served, client):
    """FastAPI's /docs and /redoc load unpinned scripts from a CDN into the app's origin: they are off."""
    for url in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = client.get(url)
        assert r.status_code == 404 and "cdn" not in r.text.lower(), url
    assert client.get("/openapi.json").json()["info"]["title"] == "clipsnail"
    page = client.get("/")
    assert "<script src" not in page.text and "<link rel=\"stylesheet\"" not in page.text
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert all(s.startswith("'sha256-") for s in csp["script-src"].split()), csp["script-src"]
    assert csp["img-src"] == "'self' data: blob:"  # thumbnails, generated images (data: URLs), the upload preview
    assert "http" not in page.headers["content-security-policy"]
    # any other HTML the app may ever send gets a strict default policy
    app = create_app(served.index, served.model)
    app.get("/other")(lambda: HTMLResponse("<p>hi</p>"))
    other = TestClient(app, base_url=BASE).get("/other")
    assert other.headers["content-security-policy"].startswith("default-src 'none'")
    # nosniff on every response, refusals included
    responses = [page, client.get("/openapi.json"), client.get("/api/info"), client.get("/api/thumb/0"),
                 client.get("/api/thumb/99999"), client.get("/api/search", params={"k": "x"}),
                 client.get("/api/info", headers={"host": "evil.example"}),
                 client.post("/api/search/image", files=upload(png()), headers={"origin": "https://evil.example"})]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 422, 400, 403]
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", r.url


@pytest.mark.parametrize("host", ["127.0.0.1:8000@evil.example", "127.0.0.1:P@evil.example", "[::1]evil",
                                  "[::1]:80evil", "::1", "", "127.0.0.1:", "127.0.0.1:80:80", "localhost.",
                                  "localhost:8000/x", "user@localhost", "127.0.0.256", "127.1", "127.0.0.1 x",
                                  "127.0.0.1.evil.example", "localhost.evil.example", "[::1]:123456", "[::2]"])
def test_host_header_is_parsed_strictly(client, host):
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == 400, (host, r.text)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "127.9.8.7:1", "localhost", "LocalHost:65535",
                                  "[::1]", "[::1]:8000"])
def test_loopback_hosts_are_accepted(client, host):
    assert client.get("/api/info", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8000@evil.example", "http://127.0.0.1:8000/", "null",
                                    "http://evil.example@127.0.0.1:8000", "ftp://127.0.0.1:8000",
                                    "http://127.0.0.1:8000 ", "http://127.0.0.1:8001", "127.0.0.1:8000"])
def test_origin_must_be_exactly_this_host(client, origin):
    headers = {"host": "127.0.0.1:8000", "origin": origin}
    assert client.post("/api/search/image", files=upload(png()), headers=headers).status_code == 403, origin
    headers["origin"] = "http://127.0.0.1:8000"
    assert client.post("/api/search/image", files=upload(png()), headers=headers).status_code == 200


# ----------------------------------------------------------------------------------------------- decoding memory


def jpeg(size, orientation: int | None = None) -> bytes:
    """A smooth (small) JPEG of `size` pixels, optionally with an EXIF orientation tag."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, format="JPEG", quality=80, exif=exif.tobytes())
    return out.getvalue()


class Recording:
    """The served CLIP model, noting the size of each image it is given to encode."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def encode_image(self, images, **kw):
        self.sizes += [im.size for im in images]
        return self.model.encode_image(images, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_large_uploads_are_decoded_near_the_model_input_size(served):
    """A query needs the model's input size (16 here); a 3000x2000 photo used to be decoded whole (and copied)."""
    model = Recording(served.model)
    c = TestClient(create_app(served.index, model), base_url=BASE)
    big_png = io.BytesIO()
    Image.linear_gradient("L").resize((1200, 900)).save(big_png, format="PNG")
    for data, portrait in ((jpeg((3000, 2000)), False), (jpeg((3000, 2000), orientation=6), True),
                           (big_png.getvalue(), False)):
        r = c.post("/api/search/image", files=upload(data), data={"k": "3"})
        assert r.status_code == 200, r.text
        width, height = model.sizes[-1]
        assert 32 <= min(width, height) < 64, model.sizes[-1]  # twice the input size, at least
        assert (height > width) == portrait  # EXIF orientation still applied
    assert c.post("/api/zeroshot", files=upload(jpeg((3000, 2000))), data={"classes": "a, b"}).status_code == 200
    assert max(model.sizes[-1]) < 100


def test_decoding_runs_at_most_max_decoding_at_once(served, monkeypatch):
    import clipsnail.serve.service as service_module

    running, peak, lock = [0], [0], threading.Lock()
    real = service_module.decode_upload

    def slow_decode(*args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.2)
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(service_module, "decode_upload", slow_decode)
    statuses = []
    with TestClient(create_app(served.index, served.model, limits=Limits(max_decoding=2)), base_url=BASE) as c:
        threads = [threading.Thread(target=lambda: statuses.append(
            c.post("/api/search/image", files=upload(png()), data={"k": "2"}).status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert statuses == [200] * 6
    assert 1 <= peak[0] <= 2  # six uploads at once, two decodes at a time


def test_memory_is_given_back_after_a_large_decode(monkeypatch):
    from clipsnail.serve import images

    trims = []
    monkeypatch.setattr(images, "_malloc_trim", lambda pad: trims.append(pad) or 1)
    large = io.BytesIO()
    Image.linear_gradient("L").resize((2500, 2000)).save(large, format="PNG")
    assert 64 <= min(images.decode_upload(large.getvalue(), 10**8, min_side=64).size) < 128
    assert trims == [0]
    images.decode_upload(png(), 10**8)
    assert trims == [0]  # small decodes are left to the allocator


# ----------------------------------------------------------------------------------------------- indexed files


def answer_within(c, url, seconds=10.0, fifo=None):
    """c.get(url), failing (not hanging) when no answer comes in time; a FIFO the server blocks on is released."""
    result = []
    thread = threading.Thread(target=lambda: result.append(c.get(url)), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive() and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the blocked open() return
    assert result, f"{url}: no answer within {seconds} s"
    return result[0]


@pytest.mark.parametrize("follow_links", [False, True])
def test_indexed_files_replaced_by_fifos_devices_or_outside_links_are_refused_at_once(served, shapes_dir, tmp_path,
                                                                                       follow_links):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((shapes_dir / "images").glob("*.png"))[:5]
    for source in sources:
        shutil.copy(source, folder / source.name)
    index, _ = build_index(served.model, folder, tmp_path / "index", progress=False, follow_links=follow_links)
    outside = tmp_path / "private.png"
    outside.write_bytes(png(color=(1, 2, 3)))
    by_name = {p.name: i for i, p in enumerate(index.paths)}
    fifo, zero, leak, folder_instead = (folder / source.name for source in sources[:4])
    for path in (fifo, zero, leak):
        path.unlink()
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    leak.symlink_to(outside)
    folder_instead.unlink()
    folder_instead.mkdir()
    c = TestClient(create_app(index, served.model), base_url=BASE)
    expected = {fifo: "FIFO", zero: "device" if follow_links else "symbolic link",
                leak: "outside" if follow_links else "symbolic link", folder_instead: "folder"}
    for path, reason in expected.items():
        for url in (f"/api/thumb/{by_name[path.name]}", f"/api/similar/{by_name[path.name]}"):
            r = answer_within(c, url, fifo=fifo)
            assert r.status_code == 404, (url, r.text)
            detail = r.json()["detail"]
            assert reason in detail and "cannot be read" in detail, detail
            assert str(tmp_path) not in detail  # the server's folders stay private
    assert c.get(f"/api/thumb/{by_name[sources[4].name]}").status_code == 200


def test_every_link_on_the_page_is_answered(client):
    import re

    page = client.get("/").text
    links = sorted(set(re.findall(r'href="(/[^"]*)"', page)))
    assert links, "the page links to the API schema"
    for link in links:
        assert client.get(link).status_code == 200, link

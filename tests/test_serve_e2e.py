"""End to end: the real server (uvicorn on a loopback port) driven by a real browser (Debian's Chromium through
Playwright): type a query and see the grid, search by an uploaded image with zero-shot labels, generate.

Skipped, saying why, only when Playwright or a Chromium binary cannot be found (`make browser` installs Chromium).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from helpers import StandInGenerator

from clipsnail.inference.index import build_index
from clipsnail.serve import Limits, create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                               "(pip install -e '.[test]')")


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary found (apt-get install chromium, "
                                "or `make browser`; or set CHROMIUM=/path/to/chrome)")


@pytest.fixture(scope="module")
def server(shapes_dir, clip_model, tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("serve_e2e")
    index, _ = build_index(clip_model, shapes_dir / "images", root / "index", progress=False)
    # noise drawn a little slowly, so the page shows chunks arriving
    app = create_app(index, clip_model, StandInGenerator(delay=0.3), Limits(generate_chunk=2))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", port=sock.getsockname()[1], index=index)
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def test_type_a_query_and_see_the_grid(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server.url)
    sync_api.expect(page.locator("#info")).to_contain_text("160 images")
    page.fill("#k", "12")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    cards = page.locator("#results .card")
    sync_api.expect(cards).to_have_count(12)
    sync_api.expect(page.locator("#status")).to_contain_text("“a red circle”: 12 images")
    # every thumbnail actually loaded (served by id, decoded by the browser)
    loaded = "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    for _ in range(100):  # (wait_for_function would eval() a string in the page, which the page's CSP forbids)
        if page.evaluate(loaded):
            break
        time.sleep(0.05)
    assert page.evaluate(loaded), "thumbnails did not load"
    scores = [float(s) for s in cards.locator(".score span").first.all_inner_texts()]
    assert scores and -1 <= scores[0] <= 1
    assert page.url.endswith("?q=a%20red%20circle")  # the address names the search...

    linked = browser.new_page()  # ... and opening it runs the search
    linked.goto(f"{server.url}/?q=a%20blue%20square")
    sync_api.expect(linked.locator("#q")).to_have_value("a blue square")
    sync_api.expect(linked.locator("#status")).to_contain_text("“a blue square”")
    linked.close()

    # search by image: the file picker path (drag and drop ends in the same handler), with zero-shot labels
    page.fill("#classes", "red shape, green shape, blue shape")
    page.set_input_files("#file", str(server.index.paths[3]))
    sync_api.expect(page.locator("#status")).to_contain_text(f"Like {server.index.paths[3].name}")
    sync_api.expect(page.locator("#labels .label")).to_have_count(3)

    # generation: images appear, best first, and the job finishes with the best `keep` of n
    page.fill("#prompt", "a blue square")
    page.fill("#n", "6")
    page.fill("#rerank", "3")
    page.click("#gen-go")
    sync_api.expect(page.locator("#gen-status")).to_contain_text("Done", timeout=20_000)
    sync_api.expect(page.locator("#gen-grid .card")).to_have_count(3)

    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("CLIPSNAIL_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["CLIPSNAIL_SCREENSHOT"])
    assert not problems, problems  # no script errors, no Content-Security-Policy violations
    page.close()


def test_an_oversized_streamed_upload_is_cut_off_while_reading(server):
    """No Content-Length (chunked): the answer 413 comes after ~10 MB, not after the whole 64 MB body."""
    answered_after = None
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
        head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        s.sendall(b"%x\r\n" % len(head) + head + b"\r\n")
        chunk = b"%x\r\n" % 2**20 + bytes(2**20) + b"\r\n"
        try:
            for mib in range(1, 65):
                s.sendall(chunk)
                if select.select([s], [], [], 0.02 if mib > 9 else 0)[0]:
                    answered_after = mib
                    break
        except (BrokenPipeError, ConnectionResetError):
            answered_after = mib
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert answered_after is not None and answered_after <= 16, answered_after

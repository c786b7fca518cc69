"""File names from a hostile folder, shown safely: terminal escapes and newlines escaped in log and CLI lines,
names that are not UTF-8 shown lossily in web answers (and still usable as query terms)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from fastapi.testclient import TestClient
from helpers import noise_image

from clipsnail.core.display import PrintableFilter, display_name, printable
from clipsnail.inference.index import build_index
from clipsnail.serve import create_app

CLEAR_SCREEN = "\x1b[2J\x1b[HAll good, 0 skipped"
NOT_UTF8 = os.fsdecode(b"bad\xff.png")  # what os.listdir gives for such a name


def test_printable_escapes_controls_and_undecodable_bytes():
    assert printable(f"x/{CLEAR_SCREEN}.jpg") == "x/\\x1b[2J\\x1b[HAll good, 0 skipped.jpg"
    assert printable("a\nINFO forged") == "a\\x0aINFO forged"
    assert printable("a\nb\tc\rd", keep_lines=True) == "a\nb\tc\\x0dd"
    assert printable(NOT_UTF8) == "bad\\xff.png"
    assert printable("caf\u00e9 \u2603 \U0001F600") == "caf\u00e9 \u2603 \U0001F600"  # printable text is kept
    printable(NOT_UTF8).encode("utf-8")  # printable on any terminal


def test_display_name_is_valid_unicode():
    assert display_name(NOT_UTF8) == "bad\ufffd.png"
    assert display_name("\ud800x") == "?x"
    assert display_name("photo.jpg") == "photo.jpg"


def test_log_records_are_escaped_args_and_all():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(PrintableFilter())
    log = logging.getLogger("clipsnail.test_display")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("%s: cannot read (%s), %d skipped", f"/p/{CLEAR_SCREEN}", OSError("bad\nline"), 3)
        log.warning(f"f-string {CLEAR_SCREEN}")
    finally:
        log.removeHandler(handler)
    assert records[0] == "/p/\\x1b[2J\\x1b[HAll good, 0 skipped: cannot read (bad\\x0aline), 3 skipped"
    assert "\x1b" not in records[1]


def test_cli_warnings_about_hostile_names_are_escaped(clip_run, tmp_path):
    """An unreadable file named with terminal escapes: the WARNING line of `index build` shows them escaped."""
    photos = tmp_path / "photos"
    noise_image(photos / "ok.png", 0)
    (photos / f"{CLEAR_SCREEN}.jpg").write_bytes(b"not a jpeg")
    proc = subprocess.run([sys.executable, "-m", "clipsnail", "index", "build", "--model", str(clip_run), "--images",
                           str(photos), "--out", str(tmp_path / "idx"), "--no-progress", "--no-onnx"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\x1b" not in proc.stdout
    assert "\\x1b[2J" in proc.stderr  # the warning is there, escaped
    assert "Could not load library" not in proc.stderr  # faiss's INFO lines only with -v


def test_a_name_that_is_not_utf8_is_served_lossily_and_still_names_the_image(clip_model, tmp_path):
    photos = tmp_path / "photos"
    noise_image(photos / "ok.png", 0)
    noise_image(photos / NOT_UTF8, 1)
    index, _ = build_index(clip_model, photos, tmp_path / "idx", progress=False)
    client = TestClient(create_app(index, clip_model), base_url="http://127.0.0.1")
    r = client.get("/api/search", params={"q": "a red circle", "k": 24})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert sorted(h["name"] for h in hits) == ["bad\ufffd.png", "ok.png"]
    bad = next(h for h in hits if h["name"] == "bad\ufffd.png")
    assert client.get(bad["thumb_url"]).status_code == 200
    r = client.get("/api/search", params={"q": f"./{bad['path']}", "k": 1})
    assert r.status_code == 200 and r.json()["hits"][0]["id"] == bad["id"]  # the image finds itself

"""Phone photos in HEIC/HEIF: decoded and their EXIF read through the heic extra (pillow-heif); without it they are
skipped with one line naming what to install, and the other photos are indexed as ever."""

import logging

import numpy as np
import pytest
from helpers import photo_exif
from PIL import Image

from clipsnail.core.errors import DataError
from clipsnail.data import images
from clipsnail.data.images import list_images, load_image
from clipsnail.data.photo_facts import read_photo_facts
from clipsnail.inference.index import build_index

pillow_heif = pytest.importorskip("pillow_heif")


def heic_photo(path, seed=0):
    images.heif_enabled()  # registers pillow-heif's opener (and so its writer) with Pillow
    rng = np.random.default_rng(seed)
    pixels = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC)
    pixels.save(path, format="HEIF", exif=photo_exif("Apple", "iPhone 15", "2024:05:01 10:00:00"), quality=90)
    return pixels


def test_a_heic_photo_decodes_with_its_exif(tmp_path):
    pixels = heic_photo(tmp_path / "IMG_0001.HEIC")
    assert [p.name for p in list_images(tmp_path)] == ["IMG_0001.HEIC"]
    decoded = load_image(tmp_path / "IMG_0001.HEIC")
    assert decoded.size == (64, 48)
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(pixels, dtype=float)).mean() < 12  # lossy, close
    facts = read_photo_facts(tmp_path / "IMG_0001.HEIC")
    assert (facts.taken, facts.model, facts.width) == ("2024-05-01T10:00:00", "iPhone 15", 64)


def test_without_the_extra_heic_photos_are_skipped_with_one_line(tmp_path, clip_model, monkeypatch, caplog):
    (tmp_path / "photos").mkdir()
    heic_photo(tmp_path / "photos" / "a.heic")
    heic_photo(tmp_path / "photos" / "b.heif", seed=1)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "photos" / "c.jpg")
    monkeypatch.setattr(images, "_heif", False)  # as if pillow-heif were not installed
    monkeypatch.setattr(images, "_heif_said", False)
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "photos" / "a.heic")
    assert str(info.value) == f"{tmp_path / 'photos' / 'a.heic'}: a HEIC/HEIF photo, which needs the heic extra " \
                              f"(pip install 'clipsnail[heic]')"
    monkeypatch.setattr(images, "_heif_said", False)  # a new process: the build below says it once
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        index, stats = build_index(clip_model, tmp_path / "photos", tmp_path / "index", progress=False, workers=0)
    assert [p.name for p in index.paths] == ["c.jpg"] and stats["unreadable"] == 2
    said = [r for r in caplog.records if "heic extra" in r.getMessage() and "skipped" in r.getMessage()]
    assert len(said) == 1


def test_the_web_app_takes_a_heic_upload(tmp_path, clip_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipsnail.serve import create_app

    (tmp_path / "photos").mkdir()
    for i in range(3):
        heic_photo(tmp_path / "photos" / f"{i}.heic", seed=i)
    index, _ = build_index(clip_model, tmp_path / "photos", tmp_path / "index", progress=False)
    client = TestClient(create_app(index, clip_model), base_url="http://127.0.0.1")
    data = (tmp_path / "photos" / "1.heic").read_bytes()
    answer = client.post("/api/search/image", files={"file": ("IMG_0001.HEIC", data, "image/heic")},
                         data={"k": "1"})
    assert answer.status_code == 200 and answer.json()["hits"][0]["name"] == "1.heic"

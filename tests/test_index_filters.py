"""Searches filtered by date taken, camera, folder and place, inside the search: against a brute-force ranking of
the same vectors, on photos whose EXIF this test writes."""

import json

import numpy as np
import pytest
from helpers import Counting, noise_image, photo_exif, run_error
from PIL import Image

from clipsnail.cli import main
from clipsnail.inference.catalogue import parse_filters
from clipsnail.inference.index import ImageIndex, build_index, update_index

# name: (folder, EXIF date, make, model, (lat, lon) or None)
PHOTOS = {
    "a": ("trips/2019", "2019:06:15 10:00:00", "Apple", "iPhone 12", (48.858, 2.294)),  # Paris
    "b": ("trips/2019", "2019:07:01 12:00:00", "Apple", "iPhone 12", (48.853, 2.350)),
    "c": ("trips/2020", "2020:01:05 09:00:00", "Canon", "Canon EOS R5", (51.507, -0.128)),  # London
    "d": ("trips/2020", "2020:02:29 23:59:59", "Canon", "Canon EOS R5", None),
    "e": ("home", "2018:12:31 23:00:00", "NIKON CORPORATION", "NIKON D750", (48.860, 2.337)),
    "f": ("home", None, None, None, None),  # no EXIF: dated by its file time (the test run's day)
    "g": ("home/cats", "2019:06:20 08:00:00", "Apple", "iPhone 8", (48.900, 2.400)),
    "h": ("", "2017:03:03 03:03:03", "Canon", "Canon PowerShot", (-33.857, 151.215)),  # Sydney
}


def dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    degrees, minutes = int(value), int(value * 60 % 60)
    return float(degrees), float(minutes), round((value * 3600) % 60, 4)


def write_photo(path, seed, taken, make, model, place):
    noise_image(path.with_suffix(".png"), seed)  # the pixels of the shared helper, saved again as a JPEG with EXIF
    image = Image.open(path.with_suffix(".png")).convert("RGB")
    path.with_suffix(".png").unlink()
    gps = None
    if place:
        lat, lon = place
        gps = ("N" if lat >= 0 else "S", dms(lat), "E" if lon >= 0 else "W", dms(lon))
    image.save(path, exif=photo_exif(make, model, taken, gps=gps), quality=95)


@pytest.fixture(scope="module")
def library(tmp_path_factory, clip_model):
    root = tmp_path_factory.mktemp("library") / "photos"
    for seed, (name, (folder, taken, make, model, place)) in enumerate(PHOTOS.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        write_photo(root / folder / f"{name}.jpg", seed, taken, make, model, place)
    index, _ = build_index(clip_model, root, root.parent / "index", progress=False)
    return index


def names(hits):
    return [h.path.stem for h in hits]


def brute_force(index, query, k, keep):
    """The k best of the photos named in `keep`, by exact cosine over all stored vectors."""
    scores = index.vectors().numpy() @ query
    ranked = [index.paths[i].stem for i in np.argsort(-scores, kind="stable")]
    return [n for n in ranked if n in keep][:k]


@pytest.mark.parametrize("flags, keep", [
    ({"after": "2019-06", "before": "2020"}, "abg"),
    ({"before": "2019"}, "eh"),
    ({"camera": "iphone"}, "abg"),
    ({"camera": "canon eos"}, "cd"),
    ({"folder": "trips"}, "abcd"),
    ({"folder": "home"}, "efg"),
    ({"near": "48.857,2.35,10km"}, "abeg"),
    ({"near": "48.8584,2.2945,200m"}, "a"),
    ({"near": "-33.86,151.2,5"}, "h"),
    ({"camera": "apple", "folder": "trips", "after": "2019-06-16"}, "b"),
    ({"camera": "leica"}, ""),
])
def test_a_filtered_search_is_the_brute_force_ranking_of_the_photos_that_pass(library, clip_model, flags, keep):
    query = clip_model.encode_text(["a red circle"])[0].detach().numpy()
    for k in (1, 3, 8):
        hits = library.search(query, k, parse_filters(**flags))[0]
        assert names(hits) == brute_force(library, query, k, set(keep))
        assert len(hits) == min(k, len(keep))  # k whenever k pass: the filter is in the search, not after it
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_the_cli_filters_and_index_info(library, clip_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["search", "--index", str(library.index_dir), "a red circle", "-k", "9", "--camera", "canon",
                 "--folder", "trips"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(p.rsplit("/", 1)[-1] for p in (h["path"] for h in hits)) == ["c.jpg", "d.jpg"]
    assert main(["index", "info", "--index", str(library.index_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["photos"] == len(PHOTOS) and info["with_position"] == 6 and info["taken"]["from_exif"] == 7
    assert info["taken"]["first"] == "2017-03-03T03:03:03"
    assert info["cameras"][0] == {"camera": "apple iphone 12", "photos": 2}
    msg = run_error(capsys, ["search", "--index", str(library.index_dir), "a red circle", "--near", "91,0,1km"])
    assert msg.startswith("clipsnail: error: --near '91,0,1km'") and "\n" not in msg
    msg = run_error(capsys, ["search", "--index", str(library.index_dir), "x", "--after", "2019-02-30"])
    assert "--after '2019-02-30': not a date" in msg


def test_a_renamed_moved_or_copied_photo_is_not_encoded_again(library, clip_model, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(library.root, root)
    index_dir = tmp_path / "index"
    build_index(clip_model, root, index_dir, progress=False)
    built = ImageIndex.load(index_dir)
    before = {p.name: v for p, v in zip(built.paths, built.vectors())}
    eiffel_id = built.id_of("trips/2019/a.jpg")
    (root / "trips" / "2019" / "a.jpg").rename(root / "trips" / "2019" / "eiffel.jpg")  # renamed
    (root / "elsewhere").mkdir()
    (root / "home" / "e.jpg").rename(root / "elsewhere" / "e.jpg")  # moved to another folder
    shutil.copyfile(root / "h.jpg", root / "home" / "h_copy.jpg")  # copied

    counting = Counting(clip_model)
    index, stats = update_index(counting, index_dir, progress=False)
    assert counting.images == 0 and stats["encoded"] == 0
    assert {k: stats[k] for k in ("added", "removed", "moved", "changed", "total")} == {
        "added": 1, "removed": 0, "moved": 2, "changed": 0, "total": len(PHOTOS) + 1}
    after = {p.name: v for p, v in zip(index.paths, index.vectors())}
    assert after["eiffel.jpg"].equal(before["a.jpg"]) and after["h_copy.jpg"].equal(before["h.jpg"])
    assert "a.jpg" not in after and after["e.jpg"].equal(before["e.jpg"])
    assert index.id_of("trips/2019/eiffel.jpg") == eiffel_id  # a moved photo keeps its id (and its row)
    query = clip_model.encode_text(["a red circle"])[0].detach().numpy()
    assert [h.path.name for h in index.search(query, 9, parse_filters(folder="elsewhere"))[0]] == ["e.jpg"]


def test_the_web_api_filters_and_offers_the_catalogue(library, clip_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipsnail.serve import create_app

    client = TestClient(create_app(library, clip_model), base_url="http://127.0.0.1")
    answer = client.get("/api/search", params={"q": "a red circle", "k": 9, "camera": "iphone", "after": "2019-06-16"})
    assert answer.status_code == 200
    assert sorted(h["name"] for h in answer.json()["hits"]) == ["b.jpg", "g.jpg"]
    answer = client.get("/api/search", params={"q": "a red circle", "near": "48.8584,2.2945,200m"})
    assert [h["name"] for h in answer.json()["hits"]] == ["a.jpg"]
    for params, named in [({"near": "91,0,1km"}, "--near '91,0,1km'"), ({"after": "2019-13"}, "not a date"),
                          ({"folder": "../up"}, "--folder '../up'"), ({"camera": "x" * 65}, "at most 64")]:
        answer = client.get("/api/search", params={"q": "a red circle", **params})
        assert answer.status_code == 422 and named in json.dumps(answer.json())
    catalogue = client.get("/api/info").json()["catalogue"]
    assert catalogue["photos"] == len(PHOTOS) and catalogue["cameras"][0]["camera"] == "apple iphone 12"


def test_index_duplicates_groups_exact_and_near_copies_and_nothing_else(clip_model, tmp_path, capsys):
    import shutil

    root = tmp_path / "photos"
    for seed in range(6):  # six distinct photos: smooth random blobs, so their low frequencies differ
        rng = np.random.default_rng(seed)
        small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC)
        (root / "a").mkdir(parents=True, exist_ok=True)
        small.save(root / "a" / f"p{seed}.jpg", quality=95)
    shutil.copyfile(root / "a" / "p0.jpg", root / "p0_copy.jpg")  # the same bytes
    original = Image.open(root / "a" / "p1.jpg")
    original.resize((48, 48)).save(root / "p1_half.jpg", quality=95)  # a near copy, twice
    original.save(root / "p1_q40.jpg", quality=40)
    index, _ = build_index(clip_model, root, tmp_path / "index", progress=False)
    capsys.readouterr()
    assert main(["index", "duplicates", "--index", str(index.index_dir), "--grids", str(tmp_path / "grids")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["exact"] == [["a/p0.jpg", "p0_copy.jpg"]]
    assert [g["paths"] for g in found["near"]] == [["a/p1.jpg", "p1_half.jpg", "p1_q40.jpg"]]
    assert len(found["grids"]) == 2 and all((tmp_path / "grids" / g).is_file() for g in
                                            ("exact_0000.png", "near_0001.png"))
    assert "--max-bits 64" in run_error(capsys, ["index", "duplicates", "--index", str(index.index_dir),
                                                 "--max-bits", "64"])

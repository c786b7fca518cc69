"""A photo's EXIF facts (`data.photo_facts`) and the SQLite catalogue with its search filters
(`inference.catalogue`): facts read from files this test writes, hostile EXIF taken as absent, and every filter
against a brute-force reading of the same rows."""

import datetime as dt
import os
import random
import sqlite3

import pytest
from helpers import photo_exif
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from clipsnail.core.errors import ClipsnailError
from clipsnail.data.photo_facts import PhotoFacts, read_photo_facts
from clipsnail.inference.catalogue import (
    Catalogue,
    Filters,
    camera_of,
    distance_km,
    parse_filters,
)


def photo(path, make=None, model=None, taken=None, offset=None, gps=None, orientation=None, size=(40, 30)):
    """A flat red JPEG with the given EXIF (`photo_exif`)."""
    Image.new("RGB", size, "red").save(path, exif=photo_exif(make, model, taken, offset, gps, orientation))
    return path


def test_facts_of_a_phone_photo(tmp_path):
    path = photo(tmp_path / "a.jpg", "Apple", "iPhone 12", "2019:06:15 14:30:05", "+02:00",
                 ("N", (48.0, 51.0, 30.0), "W", (2.0, 21.0, 0.0)), orientation=6)
    facts = read_photo_facts(path)
    assert facts == PhotoFacts(taken="2019-06-15T14:30:05", taken_offset="+02:00", taken_source="exif",
                               make="Apple", model="iPhone 12", latitude=48.8583333, longitude=-2.35, width=40,
                               height=30, orientation=6, phash="0" * 16)  # a flat image has no pattern


def test_facts_read_while_decoding_for_the_model_are_those_of_the_file(tmp_path):
    # Indexing reads a photo's facts from the decode made for the model (a reduced draft): the same facts as
    # read_photo_facts, the perceptual hash within a few bits (rounding at another decode size)
    import numpy as np

    from clipsnail.data.datasets import ImageListDataset
    rng = np.random.default_rng(0)
    pattern = Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")).resize((1600, 1200), Image.BICUBIC)
    path = tmp_path / "big.jpg"
    pattern.save(path, quality=90, exif=photo_exif("Canon", "EOS R5", "2021:01:02 03:04:05", None, None, 6))
    index, (image, facts) = ImageListDataset([path], lambda im: im.size, min_side=224, with_facts=True)[0]
    expected = read_photo_facts(path)
    assert image == (300, 400)  # drafted to an eighth, turned upright
    assert facts.phash != "0" * 16 and bin(int(facts.phash, 16) ^ int(expected.phash, 16)).count("1") <= 4
    assert facts == PhotoFacts(**{**expected.__dict__, "phash": facts.phash})


def test_a_photo_without_exif_is_dated_by_its_file_time(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    os.utime(path, (0, 1_560_609_000))  # 2019-06-15T14:30:00 UTC
    facts = read_photo_facts(path)
    assert (facts.taken, facts.taken_offset, facts.taken_source) == ("2019-06-15T14:30:00", "+00:00", "file")
    assert facts.make is None and facts.latitude is None and (facts.width, facts.height) == (8, 8)


@pytest.mark.parametrize("taken, offset, expected", [
    ("0000:00:00 00:00:00", None, None),  # a camera whose clock was never set
    ("2019:02:30 10:00:00", None, None),  # not in the calendar
    ("yesterday", None, None),
    ("2019:06:15 14:30:00", "+25:00", ("2019-06-15T14:30:00", None, "exif_local")),  # no such offset
    ("2019:06:15 14:30:00", None, ("2019-06-15T14:30:00", None, "exif_local")),
])
def test_a_bad_exif_date_is_absent_not_an_error(tmp_path, taken, offset, expected):
    path = photo(tmp_path / "a.jpg", taken=taken, offset=offset)
    os.utime(path, (0, 0))
    facts = read_photo_facts(path)
    assert (facts.taken, facts.taken_offset, facts.taken_source) == (expected or ("1970-01-01T00:00:00", "+00:00",
                                                                                  "file"))


@pytest.mark.parametrize("gps", [
    ("N", (95.0, 0.0, 0.0), "E", (2.0, 0.0, 0.0)),  # latitude off the globe
    ("X", (48.0, 0.0, 0.0), "E", (2.0, 0.0, 0.0)),  # no hemisphere
    ("N", (48.0, 0.0), "E", (2.0, 0.0, 0.0)),  # two numbers, not three
    ("N", (IFDRational(48, 0), 1.0, 0.0), "E", (2.0, 0.0, 0.0)),  # a zero denominator
])
def test_a_bad_latitude_is_absent(tmp_path, gps):
    facts = read_photo_facts(photo(tmp_path / "a.jpg", gps=gps))
    assert facts.latitude is None and facts.longitude == 2.0


def test_a_file_that_is_not_an_image_still_has_a_date(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"not an image at all")
    facts = read_photo_facts(path)
    assert facts.taken_source == "file" and facts.width is None


def test_camera_names_are_matched_in_one_form():
    assert camera_of("Canon", "Canon EOS R5") == "canon eos r5"
    assert camera_of("Apple", "iPhone 12") == "apple iphone 12"
    assert camera_of(None, None) is None and camera_of("NIKON", None) == "nikon"


def test_distance_is_the_great_circle():
    assert distance_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=1)  # Paris-London
    assert distance_km(0, 179.9, 0, -179.9) == pytest.approx(22.24, abs=0.05)  # across the antimeridian


# ----------------------------------------------------------------------------------------------- filters


CAMERAS = [("Apple", "iPhone 12"), ("Canon", "Canon EOS R5"), ("NIKON CORPORATION", "NIKON D750"), (None, None)]
FOLDERS = ["", "trips", "trips/2019", "trips2", "home/cats"]


def random_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        start = dt.datetime(2017, 1, 1) + dt.timedelta(seconds=rng.randrange(4 * 365 * 86400))
        make, model = rng.choice(CAMERAS)
        placed = rng.random() < 0.7
        # places around Paris (some within a few hundred metres), astride the antimeridian, near the pole, anywhere
        lat, lon = rng.choice([(rng.gauss(48.85, 0.3), rng.gauss(2.35, 0.3)),
                               (rng.gauss(48.85, 0.003), rng.gauss(2.35, 0.003)),
                               (rng.gauss(0, 0.2), rng.gauss(179.95, 0.2)),
                               (rng.uniform(89, 90), rng.uniform(-180, 180)),
                               (rng.uniform(-89, 89), rng.uniform(-180, 180))])
        lat, lon = max(-90.0, min(90.0, lat)), ((lon + 180) % 360) - 180
        facts = PhotoFacts(taken=start.isoformat(), taken_offset=None, taken_source="exif_local", make=make,
                           model=model, latitude=round(lat, 6) if placed else None,
                           longitude=round(lon, 6) if placed else None)
        folder = rng.choice(FOLDERS)
        rows.append((i, ROW + i, f"{folder}/p{i}.jpg".lstrip("/"), 100, 1, f"{i:040x}", facts))
    return rows


ROW = 1000  # a photo's vector row is not its id


def put(cat, rows):
    """Insert (id, vector row, path, size, mtime_ns, sha1, facts) rows in one transaction."""
    with cat.transaction():
        cat.insert(rows)


def brute_force(rows, f: Filters) -> list[int]:
    keep = []
    for _, i, rel, _, _, _, facts in rows:
        folder = rel.rpartition("/")[0]
        if f.after and not facts.taken >= f.after or f.before and not facts.taken < f.before:
            continue
        if f.camera and f.camera.lower() not in (camera_of(facts.make, facts.model) or ""):
            continue
        if f.folder is not None and not (folder == f.folder or folder.startswith(f.folder + "/")):
            continue
        if f.near and (facts.latitude is None or distance_km(f.near[0], f.near[1], facts.latitude,
                                                             facts.longitude) > f.near[2]):
            continue
        keep.append(i)
    return keep


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    rows = random_rows(600)
    cat = Catalogue.create(tmp_path_factory.mktemp("cat") / "catalogue.sqlite")
    put(cat, rows)
    assert len(cat) == 600
    yield cat, rows
    cat.close()


@pytest.mark.parametrize("flags", [
    {}, {"after": "2019-06"}, {"before": "2018"}, {"after": "2018-02-28", "before": "2018-03-01T12:00"},
    {"camera": "iphone"}, {"camera": "CANON eos"}, {"camera": "nikon d"}, {"folder": "trips"},
    {"folder": "trips/2019"}, {"folder": "./home/cats/"}, {"near": "48.85,2.35,10km"}, {"near": "48.85,2.35,800m"},
    {"near": "0,-179.99,40km"}, {"near": "89.5,0,200"},
    {"after": "2019", "camera": "apple", "folder": "trips", "near": "48.85,2.35,60km"},
])
def test_every_filter_selects_what_brute_force_does(catalogue, flags):
    cat, rows = catalogue
    filters = parse_filters(**flags)
    expected = brute_force(rows, filters)
    assert cat.select_rows(filters).tolist() == expected
    assert bool(filters) == bool(flags)
    if flags.get("near") or flags.get("folder") == "trips":
        assert 0 < len(expected) < len(rows)  # each of these selects something, not everything


def test_paths_and_summary(catalogue):
    cat, rows = catalogue
    assert cat.photos([0, 5, 999]) == {0: (ROW, rows[0][2]), 5: (ROW + 5, rows[5][2])}
    assert cat.photos_at([ROW + 5, 7]) == {ROW + 5: (5, rows[5][2])}
    assert cat.id_of(rows[3][2]) == 3 and cat.id_of("nowhere.jpg") is None
    summary = cat.summary()
    assert summary["photos"] == 600 and summary["taken"]["first"] == min(r[6].taken for r in rows)
    assert {c["camera"] for c in summary["cameras"]} == {"apple iphone 12", "canon eos r5",
                                                         "nikon corporation nikon d750"}
    assert summary["with_position"] == sum(r[6].latitude is not None for r in rows)


@pytest.mark.parametrize("flags, message", [
    ({"after": "2019-13"}, "--after '2019-13': not a date"),
    ({"before": "last week"}, "--before 'last week': expected a date"),
    ({"near": "100,2,1km"}, "--near '100,2,1km': expected LATITUDE,LONGITUDE,RADIUS"),
    ({"near": "48,2,-1"}, "--near '48,2,-1'"),
    ({"near": "48,2,0km"}, "--near '48,2,0km'"),
    ({"near": "nan,2,1"}, "--near 'nan,2,1'"),
    ({"near": "48,2"}, "--near '48,2'"),
    ({"folder": "../outside"}, "--folder '../outside'"),
    ({"camera": "  "}, "--camera: empty"),
])
def test_a_bad_filter_is_one_line_naming_it(flags, message):
    with pytest.raises(ClipsnailError) as info:
        parse_filters(**flags)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_catalogue_of_a_newer_schema_or_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "catalogue.sqlite"
    Catalogue.create(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE catalogue_info SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ClipsnailError, match="schema version '99' is not one this clipsnail reads"):
        Catalogue.open(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"garbage" * 100)
    with pytest.raises(ClipsnailError, match="not a catalogue"):
        Catalogue.open(junk)


def test_a_failed_write_leaves_the_catalogue_as_it_was(tmp_path):
    cat = Catalogue.create(tmp_path / "c.sqlite")
    put(cat, random_rows(5))
    bad = [(10, 10, "x.jpg", 1, 1, "s", PhotoFacts()), (11, 11, "y.jpg", None, 1, "t", PhotoFacts())]  # no size
    with pytest.raises(sqlite3.IntegrityError):
        put(cat, bad)
    assert len(cat) == 5 and len(Catalogue.open(tmp_path / "c.sqlite")) == 5  # nor did x.jpg go in


def test_a_name_that_is_not_utf8_keeps_its_bytes(tmp_path):
    from clipsnail.inference.catalogue import facts_by_path

    rel = b"caf\xe9/\xff.jpg".decode("utf-8", "surrogateescape")  # a Latin-1 folder name, as Linux hands it over
    cat = Catalogue.create(tmp_path / "c.sqlite")
    put(cat, [(0, 4, rel, 1, 1, "s", PhotoFacts(taken="2020-01-01T00:00:00"))])
    assert cat.photos([0]) == {0: (4, rel)} and list(facts_by_path(cat)) == [rel] and cat.id_of(rel) == 0
    assert cat.select_rows(parse_filters(folder="caf\ufffd")).tolist() == [4]  # the folder as text, odd byte replaced
